"""The InfluenceJob spec model: defaults, and every bad input refused with a message naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest

from kinfluence.job import InfluenceJobSpec, SpecError, parse_job, read_job, resolve_relative_paths
from kinfluence.job.spec import CgMethod, DirectMethod

ROOT = Path(__file__).resolve().parents[2]


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"entrypoint": "pkg.mod:build", "weights": "w.pt"},
        "loss": "cross_entropy",
        "data": {"train": {"url": "d.zarr", "features": "x", "targets": "y"}, "test": {"url": "gs://b/d.zarr"}},
        "method": {"name": "cg", "rtol": 1e-5},
        "output": {"url": "out.zarr"},
    }
    base.update(spec)
    return {"apiVersion": "kinfluence.dev/v1alpha1", "kind": "InfluenceJob", "metadata": {"name": "j"}, "spec": base}


def refused(change: Callable[[dict[str, Any]], None]) -> str:
    doc = job()
    change(doc)
    with pytest.raises(SpecError) as info:
        parse_job(doc, "job.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("job.yaml: ")
    return message


def test_defaults_and_method_options() -> None:
    spec = parse_job(job()).spec
    assert isinstance(spec.method, CgMethod)
    assert spec.method.options()["rtol"] == 1e-5 and spec.method.options()["pre_conditioner"] is None
    assert spec.method.common_kwargs() == {"regularization": 0.0, "second_order_mode": "hessian", "block_structure": "full"}
    assert (spec.mode, spec.chunks.train, spec.chunks.test) == ("up", 1024, 256)
    assert (spec.output.on_existing, spec.output.matrix, spec.output.top_k) == ("resume", True, None)
    assert spec.workers.replicas == 2 and spec.run_policy.backoff_limit == 3


def test_every_method_parses_with_its_options() -> None:
    methods = [
        {"name": "direct", "maxParameters": 100},
        {"name": "cg", "maxiter": 5, "useBlockCg": True, "preconditioner": "nystroem", "preconditionerRank": 4},
        {"name": "lissa", "maxiter": 10, "dampen": 0.1, "scale": 20, "samples": 2, "rtol": 1e-3},
        {"name": "arnoldi", "rank": 4, "krylovDimension": 8},
        {"name": "nystroem", "rank": 4, "seed": 1},
        {"name": "ekfac", "updateDiagonal": False},
    ]
    for m in methods:
        spec = parse_job(job(method={**m, "secondOrder": "gauss_newton", "regularization": {"a": 0.1}, "blocks": {"a": ["w"]}})).spec
        assert spec.method.name == m["name"]
        assert spec.method.common_kwargs()["block_structure"] == {"a": ["w"]}
    cg = parse_job(job(method=methods[1])).spec.method
    assert type(cg.options()["pre_conditioner"]).__name__ == "NystroemPreconditioner"
    assert cg.options()["pre_conditioner"].rank == 4


def test_unknown_method() -> None:
    msg = refused(lambda d: d["spec"]["method"].update(name="newton"))
    assert "spec.method.name: unknown method 'newton'" in msg and "direct, cg, lissa" in msg


def test_option_not_valid_for_the_method() -> None:
    msg = refused(lambda d: d["spec"]["method"].update(rank=3))
    assert "spec.method.rank: not an option of method 'cg'" in msg and "useBlockCg" in msg
    msg = refused(lambda d: d["spec"].update(method={"name": "cg", "preconditionerRank": 3}))
    assert "preconditionerRank: only used with preconditioner: nystroem" in msg


def test_missing_method_name() -> None:
    assert "spec.method.name: missing" in refused(lambda d: d["spec"]["method"].pop("name"))


@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("size", [0, -5])
def test_chunk_size_must_be_positive(which: str, size: int) -> None:
    msg = refused(lambda d: d["spec"].update(chunks={which: size}))
    assert f"spec.chunks.{which}: Input should be greater than 0 (got {size})" in msg


@pytest.mark.parametrize(
    "field, change",
    [
        ("spec.data.train.url", lambda d: d["spec"]["data"]["train"].update(url="htp://x/d.zarr")),
        ("spec.data.test.url", lambda d: d["spec"]["data"]["test"].update(url="nosuch://d.zarr")),
        ("spec.model.weights", lambda d: d["spec"]["model"].update(weights="ftps2://w.pt")),
        ("spec.output.url", lambda d: d["spec"]["output"].update(url="bogus://b/out.zarr")),
    ],
)
def test_unsupported_url_scheme(field: str, change: Callable[[dict[str, Any]], None]) -> None:
    msg = refused(change)
    assert f"{field}: unsupported URL scheme" in msg


def test_supported_urls() -> None:
    for url in ("/abs/d.zarr", "rel/d.zarr", "file:///x/d.zarr", "gs://b/d.zarr", "s3://b/d.zarr", "memory://d"):
        doc = job()
        doc["spec"]["data"]["train"]["url"] = url
        assert parse_job(doc).spec.data.train.url == url


def test_cross_field_rules() -> None:
    assert "start (5) must be smaller than stop (3)" in refused(lambda d: d["spec"]["data"]["train"].update(start=5, stop=3))
    assert "spec.model: give exactly one of entrypoint" in refused(lambda d: d["spec"]["model"].update(program="p.pt2"))
    assert "spec.model: give exactly one of entrypoint" in refused(lambda d: d["spec"]["model"].pop("entrypoint"))
    assert "spec.output: nothing to write" in refused(lambda d: d["spec"]["output"].update(matrix=False))
    msg = refused(lambda d: d["spec"].update(mode="perturbation", output={"url": "o.zarr", "topK": 3}))
    assert "topK and values are only defined for mode: up" in msg
    assert "krylovDimension (2) must be >= rank (4)" in refused(
        lambda d: d["spec"].update(method={"name": "arnoldi", "rank": 4, "krylovDimension": 2})
    )


def test_field_values_and_names() -> None:
    assert "spec.output.top_k: unknown field" in refused(lambda d: d["spec"]["output"].update(top_k=3))
    assert "spec.loss: invalid value 'hinge'" in refused(lambda d: d["spec"].update(loss="hinge"))
    assert "spec.loss: required field is missing" in refused(lambda d: d["spec"].pop("loss"))
    assert "spec.method.regularization: invalid value -1" in refused(lambda d: d["spec"]["method"].update(regularization=-1))
    assert "spec.method.blocks: invalid value 'rows'" in refused(lambda d: d["spec"]["method"].update(blocks="rows"))
    assert "spec.model.entrypoint: invalid value 'no-colon'" in refused(lambda d: d["spec"]["model"].update(entrypoint="no-colon"))
    assert "spec.workers.cpu: invalid value 'lots'; expected a Kubernetes quantity" in refused(
        lambda d: d["spec"].update(workers={"cpu": "lots"})
    )
    assert "spec.workers.tolerations[0].effect" in refused(lambda d: d["spec"].update(workers={"tolerations": [{"effect": "X"}]}))
    assert "metadata.name: invalid value 'Bad_Name'" in refused(lambda d: d["metadata"].update(name="Bad_Name"))
    assert "spec.runPolicy.backoffLimit" in refused(lambda d: d["spec"].update(runPolicy={"backoffLimit": -1}))


def test_workers_and_run_policy_parse() -> None:
    spec = parse_job(job(
        workers={"replicas": 4, "cpu": 2, "memory": "4Gi", "gpus": 1, "image": "img:1", "nodeSelector": {"pool": "gpu"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        runPolicy={"backoffLimit": 0, "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 0, "suspend": True},
    )).spec
    assert spec.workers.cpu == "2" and spec.workers.tolerations[0].key == "nvidia.com/gpu"
    assert spec.workers.env[1].value_from == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert spec.run_policy.suspend and spec.run_policy.active_deadline_seconds == 60


def test_computation_ignores_how_it_runs() -> None:
    a = parse_job(job()).spec
    b = parse_job(job(workers={"replicas": 9}, runPolicy={"suspend": True})).spec
    c = parse_job(job(method={"name": "cg", "rtol": 1e-3})).spec
    assert a.computation() == b.computation() != c.computation()
    assert "workers" not in a.computation() and "url" not in a.computation()["output"]


def test_python_names_and_frozen() -> None:
    spec = InfluenceJobSpec(
        model={"entrypoint": "m:f"}, loss="mse", data={"train": {"url": "a"}, "test": {"url": "b"}},
        method=DirectMethod(name="direct"), output={"url": "o", "top_k": 2},
    )
    assert spec.output.top_k == 2
    with pytest.raises(Exception):
        spec.mode = "perturbation"  # type: ignore[misc]


def test_read_job_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="nope.yaml: no such file"):
        read_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [1, 2\n")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML at line \d+"):
        read_job(bad)
    two = tmp_path / "two.yaml"
    two.write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(SpecError, match="expected exactly one YAML document, found 2"):
        read_job(two)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SpecError, match="expected an InfluenceJob mapping"):
        read_job(scalar)


def test_relative_paths_resolve_against_the_job_file() -> None:
    example = read_job(ROOT / "examples/digits/job.yaml")
    moved = resolve_relative_paths(example, ROOT / "examples/digits")
    assert moved.spec.data.train.url == str(ROOT / "examples/digits/artifacts/digits.zarr")
    assert moved.spec.output.url == str(ROOT / "examples/digits/out/influences.zarr")
    assert moved.spec.model.weights == str(ROOT / "examples/digits/artifacts/weights.pt")
    doc = copy.deepcopy(job())
    doc["spec"]["output"]["url"] = "gs://bucket/out.zarr"
    kept = resolve_relative_paths(parse_job(doc), "/somewhere")
    assert kept.spec.output.url == "gs://bucket/out.zarr" and kept.spec.data.test.url == "gs://b/d.zarr"


def test_x_and_y_keys_get_a_hint() -> None:
    """kubectl's YAML 1.1 reads a bare `y:` key as true: the message says what to write."""
    msg = refused(lambda d: d["spec"]["data"]["train"].update({"true": "labels"}))
    assert "spec.data.train.true: unknown field" in msg and "use `targets:`" in msg
    assert "name the features array with `features:`" in refused(lambda d: d["spec"]["data"]["test"].update(x="f"))
