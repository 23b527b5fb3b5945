#!/usr/bin/env bash
# The oldest versions pyproject.toml allows, checked: a fresh virtualenv gets the project with the
# lower bound of every library the exactness tests exercise (transformers, numpy, pydantic: ">=X"
# installed as "==X"; tokenizers follows transformers), then runs every test marked `exactness`:
# packed against padded scoring for every model family, the chunked head against whole logits,
# dropout off, the start-up packing check, and the 2-rank FSDP trainings of
# tests/integration/test_architectures.py (packed + chunked against padded + whole logits).
#
#     scripts/check_lower_bounds.sh [VENV_DIR]     # default /tmp/trdpo-lower-bounds, rebuilt each time
#
# torch is the one the Makefile installs (TORCH_SPEC, this machine's CPU build): PyPI's other torch
# builds for Linux are multi-GB CUDA wheels. On a GPU box, TORCH_SPEC=torch==2.6.0 checks torch's
# lower bound too. Everything else comes from pyproject.toml, resolved by pip under those pins.
# Exit status: pytest's. Takes ~10 min on 2 cores (install ~4, the architecture trainings most of the rest).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/trdpo-lower-bounds}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$torch_spec"

# "name>=X,<Y" -> "name==X" for the libraries whose behaviour the exactness tests pin down.
pins="$venv/lower-bounds.txt"
"$venv/bin/python" - "$repo/pyproject.toml" > "$pins" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = {"transformers", "numpy", "pydantic"}
found = {}
for spec in project["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([^,;\s]+).*", spec)
    if match and match.group(1).lower() in wanted:
        found[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
missing = wanted - set(found)
if missing:
    sys.exit(f"pyproject.toml gives no lower bound for {sorted(missing)}")
print(*found.values(), sep="\n")
PY
echo "[lower-bounds] pinned: $(tr '\n' ' ' < "$pins")"
# The project without its dev extra (TRL there asks for a newer transformers), plus the test runner.
"$venv/bin/python" -m pip install -q -c "$pins" -e "$repo" "pytest>=8,<10" "pytest-timeout>=2.3,<3"
"$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|pydantic|numpy)==' | sed 's/^/[lower-bounds] installed /'

cd "$repo"
mapfile -t files < <(grep -rlE "pytest\.mark\.exactness" tests --include='test_*.py' | sort)
echo "[lower-bounds] running the exactness tests of ${#files[@]} files"
PYTHONPATH="$repo" "$venv/bin/python" -m pytest -p no:cacheprovider -q -m exactness "${files[@]}"
