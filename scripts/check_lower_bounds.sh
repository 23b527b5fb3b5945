#!/usr/bin/env bash
# The oldest versions pyproject.toml allows, checked: a fresh virtualenv gets the lower bound of
# every dependency the exactness tests import (torch, transformers, tokenizers, pydantic, numpy,
# pytest, pytest-timeout: ">=X" installed as "==X"), then runs every test marked `exactness`:
# packed against padded scoring for every model family, the chunked head against whole logits,
# dropout off, the start-up packing check, and the 2-rank FSDP trainings of
# tests/integration/test_architectures.py (packed + chunked against padded + whole logits, 1e-5).
#
#     scripts/check_lower_bounds.sh [VENV_DIR]     # default /tmp/trdpo-lower-bounds, rebuilt each time
#
# torch is installed first and alone (as the Makefile does), so pip never pulls another build.
# Exit status: pytest's. Takes ~5 min on 2 cores, most of it the architecture trainings.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/trdpo-lower-bounds}
python=${PYTHON:-python3}

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip

# "name>=X,<Y" -> "name==X" for the packages the exactness tests import.
mapfile -t pins < <("$venv/bin/python" - "$repo/pyproject.toml" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = {"torch", "transformers", "tokenizers", "pydantic", "numpy", "pytest", "pytest-timeout"}
found = {}
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([^,;\s]+).*", spec)
    if match and match.group(1).lower() in wanted:
        found[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
missing = wanted - set(found)
if missing:
    sys.exit(f"pyproject.toml gives no lower bound for {sorted(missing)}")
print(found.pop("torch"))
print(*found.values(), sep="\n")
PY
)
echo "[lower-bounds] installing ${pins[*]}"
"$venv/bin/python" -m pip install -q "${pins[0]}"
"$venv/bin/python" -m pip install -q "${pins[@]:1}"
"$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|pydantic|numpy)==' | sed 's/^/[lower-bounds] installed /'

cd "$repo"
mapfile -t files < <(grep -rlE "pytest\.mark\.exactness" tests --include='test_*.py' | sort)
echo "[lower-bounds] running the exactness tests of ${#files[@]} files"
PYTHONPATH="$repo" "$venv/bin/python" -m pytest -p no:cacheprovider -q -m exactness "${files[@]}"
