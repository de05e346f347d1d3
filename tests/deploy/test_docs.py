"""docs/deployment.md: its job and its Helm settings are valid, the commands it relies on exist."""

from __future__ import annotations

import re
import shlex
from typing import Any

import helm_python as helm
import pytest
import yaml
from kinfluence.job.spec import InfluenceJob

from helm_chart import CHART, REPO, crd_validator

DOC = (REPO / "docs" / "deployment.md").read_text()
YAML_BLOCKS = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC, flags=re.DOTALL)]
DOC_JOBS = [b for b in YAML_BLOCKS if isinstance(b, dict) and b.get("kind") == "InfluenceJob"]


def _helm_sets() -> list[str]:
    """Every `--set`/`--set-string` argument of the shell examples (continuation lines joined)."""
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", DOC, flags=re.DOTALL)).replace("\\\n", " ")
    sets: list[str] = []
    for line in shell.splitlines():
        if line.lstrip().startswith("helm "):
            words = shlex.split(line.replace('"$GSA"', "kinfluence@p.iam.gserviceaccount.com"), comments=True)
            sets += [f"{w}={v}" for w, v in zip(words, words[1:]) if w in ("--set", "--set-string")]
    return sets


def test_the_guide_has_a_complete_job() -> None:
    assert len(DOC_JOBS) == 1


@pytest.mark.parametrize("job", DOC_JOBS, ids=lambda j: j["metadata"]["name"])
def test_guide_job_satisfies_the_crd_and_the_spec_model(job: dict[str, Any]) -> None:
    errors = list(crd_validator().iter_errors(job))
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    InfluenceJob.model_validate(job)
    assert all(u.startswith("gs://") for u in re.findall(r"url: (\S+?)[,}\n]", yaml.safe_dump(job)))


def test_guide_helm_settings_parse_and_satisfy_the_values_schema() -> None:
    sets = _helm_sets()
    assert {s.split("=")[0] for s in sets} == {"--set", "--set-string"}
    with helm.Chart.load(CHART) as chart:
        for s in sets:
            flag, expression = s.split("=", 1)
            parse = helm.parse_set_string if flag == "--set" else helm.parse_set_string_values
            values = parse(expression)
            chart.validate_schema(chart.merge_values(values))
            if "runnerServiceAccount" in expression:
                assert values["jobs"]["runnerServiceAccount"]["annotations"] == {
                    "iam.gke.io/gcp-service-account": "kinfluence@p.iam.gserviceaccount.com"
                }


def test_guide_covers_watching_and_upgrading() -> None:
    for needle in (
        "kubectl get influencejobs -n ml-team -w",
        "kubectl describe influencejob",
        "kubectl apply --server-side -f charts/kinfluence/crds/",
        "nvidia.com/gpu",
        "Workload Identity",
        "secretKeyRef",
    ):
        assert needle in DOC, needle
    assert (REPO / "charts" / "kinfluence" / "crds").is_dir()
