"""The README stays true: its first commands are the example and the tests, its job is the
example's job, and the names it imports exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from kinfluence.job import parse_job

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def test_first_commands_install_and_run_the_example_then_the_tests() -> None:
    first = [line for line in _blocks("bash")[0].splitlines() if line and not line.startswith("#")]
    assert len(first) == 2
    install_and_run, tests = first
    assert "pip install torch==2.13.0" in install_and_run
    assert install_and_run.endswith("python examples/digits/prepare.py && kinfluence run examples/digits/job.yaml")
    assert tests == "bash .ci/run"
    assert (ROOT / "examples/digits/prepare.py").is_file()


def test_readme_job_is_the_example_job() -> None:
    (shown,) = [yaml.safe_load(b) for b in _blocks("yaml")]
    example = yaml.safe_load((ROOT / "examples/digits/job.yaml").read_text())
    assert parse_job(shown) == parse_job(example)


def test_readme_python_imports_exist() -> None:
    for module, names in re.findall(r"^from (kinfluence[\w.]*) import (.+)$", README, flags=re.MULTILINE):
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"
