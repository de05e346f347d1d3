"""The worker image's Dockerfile agrees with the package and the chart (it cannot be built here)."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from helm_chart import CHART, REPO, load_yaml

DOCKERFILE = (REPO / "worker_image" / "Dockerfile").read_text()
README = (REPO / "worker_image" / "README.md").read_text()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def build_args() -> dict[str, str]:
    """Every `ARG NAME=default` of the Dockerfile (quotes stripped)."""
    return {
        name: default.strip('"')
        for name, default in re.findall(r"^ARG\s+([A-Z_]+)=(\S*)\s*$", DOCKERFILE, flags=re.MULTILINE)
    }


def test_default_torch_satisfies_the_package_range() -> None:
    (torch,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch"]
    assert Version(build_args()["TORCH_VERSION"]) in torch.specifier
    # The package is installed under a constraint that keeps that torch build.
    assert 'torch==${TORCH_VERSION}" > /tmp/constraints.txt' in DOCKERFILE
    assert "--constraint /tmp/constraints.txt /src" in DOCKERFILE


def test_default_python_satisfies_requires_python() -> None:
    assert Version(build_args()["PYTHON_VERSION"]) in SpecifierSet(PROJECT["requires-python"])


def test_image_user_is_the_charts_non_root_user() -> None:
    uid = int(build_args()["UID"])
    assert uid > 0
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", DOCKERFILE, flags=re.MULTILINE)
    pod = load_yaml(CHART / "values.yaml")["podSecurityContext"]
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == uid


def test_every_build_arg_is_documented_with_its_default() -> None:
    args = build_args()
    assert set(args) == {"PYTHON_VERSION", "TORCH_VERSION", "TORCH_INDEX_URL", "UID"}
    for name, default in args.items():
        shown = f"`{default}`" if default else "*(empty)*"
        assert re.search(rf"^\| `{name}`\s*\| {re.escape(shown)}\s*\|", README, flags=re.MULTILINE), name


def test_the_charts_default_image_is_this_image() -> None:
    repository = load_yaml(CHART / "values.yaml")["image"]["repository"]
    version = PROJECT["version"]
    assert f"-t {repository}:{version} ." in README
    assert f"-t {repository}:{version} ." in DOCKERFILE


def test_build_context_holds_what_pip_install_needs() -> None:
    text = (REPO / "worker_image" / "Dockerfile.dockerignore").read_text()
    patterns = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert patterns[:4] == ["*", "!pyproject.toml", "!README.md", "!operator/"]
    assert "COPY pyproject.toml README.md /src/" in DOCKERFILE
    assert "COPY operator /src/operator" in DOCKERFILE
    assert PROJECT["readme"] == "README.md"
