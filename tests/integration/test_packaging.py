"""The package as users get it: build a wheel, install it into a fresh virtualenv, and use it from a
directory outside the repository, so nothing can be found through the source tree.

Offline: the wheel is built with ``--no-build-isolation`` from this environment's setuptools, and the
fresh venv sees this environment's site-packages (for torch, ray, ...) through a ``.pth`` line, which
does not run the editable install's finder: ``evaluation``, ``trainers`` and ``orchestrator`` come
from the wheel or not at all.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("evaluation", "trainers", "orchestrator")


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 180) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _package_files() -> set[str]:
    """Every file the packages hold in the source tree, as wheel paths."""
    files = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(REPO).as_posix())
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, fresh venv's bin directory) with the wheel installed."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"  # a copy: building in the repo would leave build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(source)], root)
    (wheel,) = wheels.glob("trdpo-*.whl")
    fresh = root / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip())
    (purelib / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)], root)
    return wheel, fresh / "bin"


def test_the_wheel_holds_every_file_of_the_packages(installed):
    """Templates, default configs and anything added later: a file in a package ships with it."""
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_package_files() - names)
    assert not missing, f"in the source packages but not in the wheel (add them to package-data in pyproject.toml): {missing}"


def _imported_modules(module: str, source: str, known: set[str], is_package: bool) -> set[str]:
    """The package modules ``module`` imports anywhere in its body (function-level imports too),
    or names as a whole string (the dotted path Ray or torchrun is handed)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            found.add(node.value)
    return found & known


def test_the_wheel_holds_no_module_only_tests_use(installed):
    """Every module in the wheel is reached from what users run (the console script, the modules
    run with ``python -m``) through imports; a module nothing reaches is test scaffolding or dead
    code, and belongs under tests/ or nowhere (a fault hook and a loopback judge once shipped)."""
    wheel, _ = installed
    archive = zipfile.ZipFile(wheel)
    sources, packages = {}, set()
    for name in archive.namelist():
        if name.endswith(".py") and name.split("/")[0] in PACKAGES:
            module = name[:-3].replace("/", ".").removesuffix(".__init__")
            sources[module] = archive.read(name).decode()
            if name.endswith("/__init__.py"):
                packages.add(module)
    entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
    scripts = [line.split("=", 1)[1].strip().split(":")[0] for line in archive.read(entry_points).decode().splitlines() if "=" in line]
    roots = set(scripts) | {m for m, text in sources.items() if 'if __name__ == "__main__"' in text}
    assert "orchestrator.cli" in roots
    reached, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        parts = module.split(".")
        # importing a.b.c runs a and a.b (where they are regular packages, not namespace ones)
        todo += [parent for parent in (".".join(parts[:i]) for i in range(1, len(parts))) if parent in sources]
        todo += _imported_modules(module, sources[module], set(sources), module in packages)
    assert not sorted(set(sources) - reached), f"in the wheel but reached by nothing users run: {sorted(set(sources) - reached)}"


def test_installed_trdpo_eval_with_a_local_judge_that_needs_a_template(installed, tmp_path):
    """Before the templates were package data, every `openai` and `hf` judge failed when installed."""
    _, bin_dir = installed
    work = tmp_path / "elsewhere"  # not the repo: nothing may be imported from the source tree
    work.mkdir()
    # RAY_ADDRESS=local: start a Ray of its own, never join one that another process runs here.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"RAY_ADDRESS": "local"}
    templates = sorted(p.stem for p in (REPO / "evaluation" / "templates").glob("*.txt"))
    check = (
        "import evaluation, json; from evaluation.judges import load_template, shipped_templates; "
        "names = shipped_templates(); [load_template(n) for n in names]; "
        "print(json.dumps({'file': evaluation.__file__, 'templates': names}))"
    )
    found = json.loads(_run([str(bin_dir / "python"), "-c", check], work, env).strip().splitlines()[-1])
    assert found["file"].startswith(str(bin_dir.parent)) and found["templates"] == templates

    # `trdpo eval` with the hf judge (the template rendered and scored by a tiny local LM). One
    # template only: each judge pool starts actors that import torch (~8 s each on 2 cores).
    # The models are inputs, not what is tested: built here, not in a third interpreter importing torch.
    from trainers.config import TinyModelConfig
    from trainers.model.build import build_tiny_model, make_byte_tokenizer
    from mlflow_store import sqlite_store

    for seed, name in enumerate(("policy", "baseline", "judge")):
        tokenizer = make_byte_tokenizer()
        build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_heads=2, seed=seed), len(tokenizer),
                         tokenizer.pad_token_id).save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    sqlite_store(work / "mlflow.db")  # the store the file names, relative to it: made once a session (tests/mlflow_store.py)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Review {i}:"}) + "\n" for i in range(2)))
    (work / "eval.yaml").write_text(yaml.safe_dump({
        "name": "installed",
        "evaluation": {
            "policies": [{"name": "policy", "path": "policy"}], "baseline": {"name": "baseline", "path": "baseline"},
            "prompts_path": "prompts.jsonl", "num_prompts": 2, "bootstrap_resamples": 100,
            "sampling": {"max_new_tokens": 6, "num_samples": 1, "batch_size": 2},
            "judge": {"backend": "hf", "model": "judge", "template": "hh"}, "cache_path": "judgments.sqlite",
        },
        "tracking": {"tracking_uri": "sqlite:///mlflow.db", "output_dir": "out", "experiment_name": "installed"},
    }))
    out = _run([str(bin_dir / "trdpo"), "eval", "eval.yaml"], work, env, timeout=240)
    assert "policy vs baseline: win rate" in out and "parse failures 0, API errors 0" in out  # every judgment made
