"""`kinfluence run | inspect | validate | crd`, run as a user types them: the store a run writes
holds the exact influences (DirectInfluence computed here), a rerun resumes, --output redirects,
inspect summarizes and draws, validate and crd read the spec model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from climodels import IMAGE_SIDE, build_image_model
from clitools import Finished, assert_exact, error_line, kinfluence, read_store
from jobproblem import make_problem
from kinfluence.compute import open_influence_store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def listed(stdout: str, test_index: int, which: str) -> list[int]:
    """Training point numbers on a `most helpful`/`most harmful` line of the preview or inspect."""
    block = re.search(rf"^test {test_index}:\n  most helpful  (.*)\n  most harmful  (.*)$", stdout, re.M)
    assert block, stdout
    return [int(j) for j in re.findall(r"#(\d+)", block.group(1 if which == "helpful" else 2))]


def test_run_writes_the_exact_influences_and_previews_them(finished: Finished) -> None:
    assert_exact(finished.problem, finished.output)
    assert finished.run.summary() == (15, 0)  # 3 test chunks x 5 train chunks, all computed
    out = finished.run.stdout
    assert f"output: {finished.output}" in out
    assert "blocks   15/15 (100.0%), complete" in out
    exact = finished.problem.direct()
    for i in range(3):  # --preview defaults to 3 test points, 5 training points each
        assert listed(out, i, "helpful") == list(np.argsort(-exact[i], kind="stable")[:5])
        assert listed(out, i, "harmful") == list(np.argsort(exact[i], kind="stable")[:5])
    assert f"kinfluence inspect {finished.output}" in out


def test_running_again_resumes_and_changes_nothing(finished: Finished) -> None:
    before = read_store(finished.output)
    again = kinfluence("run", str(finished.job), "--workers", "1", "--preview", "0", cwd=finished.job.parent).check()
    assert again.summary() == (0, 15)
    assert "reused the fitted state of an earlier run" in again.log
    after = read_store(finished.output)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)


def test_output_option_replaces_the_spec_url(tmp_path: Path) -> None:
    problem = make_problem(tmp_path / "job", n_train=16, n_test=4)
    job = problem.write_job(tmp_path / "job" / "job.yaml")
    result = kinfluence("run", str(job), "--workers", "1", "--output", "elsewhere.zarr", cwd=tmp_path).check()
    where = tmp_path / "elsewhere.zarr"  # a relative --output is relative to the current directory
    assert f"output: {where}" in result.stdout
    assert not Path(problem.doc["spec"]["output"]["url"]).exists()
    assert_exact(problem, str(where))


TILES_JOB = """\
apiVersion: kinfluence.dev/v1alpha1
kind: InfluenceJob
metadata: {name: tiles}
spec:
  model: {entrypoint: "climodels:build_image_model", weights: weights.pt, dtype: float64}
  loss: cross_entropy
  data:
    train: {url: tiles.zarr, features: x_train, targets: y_train}
    test: {url: tiles.zarr, features: x_test, targets: y_test}
  method: {name: direct, regularization: 0.1}
  chunks: {train: 12, test: 3}
  output: {url: out/tiles.zarr, topK: 3}
"""


def write_tiles_job(folder: Path) -> Path:
    """A job on 4x4 images stored as 16-vectors, with the group's `image_shape` attribute
    saying so (relative paths in the job file are relative to its folder)."""
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(30, IMAGE_SIDE * IMAGE_SIDE))
    y = (x[:, : IMAGE_SIDE * 2].mean(axis=1) > x[:, IMAGE_SIDE * 2 :].mean(axis=1)).astype(np.int64)
    group = zarr.open_group(str(folder / "tiles.zarr"), mode="w")
    group.attrs["image_shape"] = [IMAGE_SIDE, IMAGE_SIDE]
    for name, a in (("x_train", x[:24]), ("y_train", y[:24]), ("x_test", x[24:]), ("y_test", y[24:])):
        group.create_array(name, data=a, chunks=(12,) + a.shape[1:])
    torch.manual_seed(0)
    torch.save(build_image_model().state_dict(), folder / "weights.pt")
    job = folder / "job.yaml"
    job.write_text(TILES_JOB)
    return job


def assert_png(path: Path) -> np.ndarray:
    """The figure decoded (it is a PNG, and not blank)."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels.std() > 0
    return pixels


def test_inspect_summarizes_and_draws_test_images_beside_training_images(tmp_path: Path) -> None:
    job = write_tiles_job(tmp_path)
    kinfluence("run", str(job), "--workers", "1", "--preview", "0", cwd=tmp_path).check()
    result = kinfluence("inspect", "out/tiles.zarr", "--test-index", "0", "4", "--top", "3", "--plot", "fig.png",
                        cwd=tmp_path).check()
    out = result.stdout
    assert "job      tiles" in out
    assert "method   DirectInfluence (mode up, regularization" in out
    assert "shape    test 6 x train 24, float64; chunks 3 x 12" in out
    assert "outputs  influences, top-3" in out
    assert "blocks   4/4 (100.0%), complete" in out
    matrix = np.asarray(open_influence_store(str(tmp_path / "out/tiles.zarr")).influences[...])
    for i in (0, 4):
        assert listed(out, i, "helpful") == list(np.argsort(-matrix[i], kind="stable")[:3])
        assert listed(out, i, "harmful") == list(np.argsort(matrix[i], kind="stable")[:3])
    assert "figure   fig.png: test images beside their most helpful and most harmful training images" in out
    assert_png(tmp_path / "fig.png")


def test_inspect_draws_bar_charts_for_data_that_are_not_images(finished: Finished, tmp_path: Path) -> None:
    result = kinfluence("inspect", finished.output, "--plot", "bars.png", cwd=tmp_path).check()
    assert "figure   bars.png: bar charts of the most helpful and most harmful" in result.stdout
    assert_png(tmp_path / "bars.png")


@pytest.mark.parametrize(
    "args, names",
    [
        (["--test-index", "12"], ["--test-index", "12"]),
        (["--plot", "no/such/folder/fig.png"], ["--plot", "no/such/folder/fig.png"]),
        (["--plot", "fig.txt"], ["--plot", ".png"]),
    ],
    ids=["test-index-out-of-range", "plot-folder-missing", "plot-format-unknown"],
)
def test_inspect_refuses_bad_options(finished: Finished, tmp_path: Path, args: list[str], names: list[str]) -> None:
    line = error_line(kinfluence("inspect", finished.output, *args, cwd=tmp_path))
    assert all(n in line for n in names), line


def test_inspect_of_a_path_without_a_store(tmp_path: Path) -> None:
    result = kinfluence("inspect", str(tmp_path / "nothing.zarr"), cwd=tmp_path)
    assert result.returncode == 2
    assert "url: no kinfluence output store at" in error_line(result)


def test_validate(finished: Finished, tmp_path: Path) -> None:
    ok = kinfluence("validate", str(finished.job), cwd=tmp_path).check()
    assert ok.stdout.strip() == (f"{finished.job}: valid InfluenceJob 'small' (method direct, output {finished.output})")

    bad = tmp_path / "bad.yaml"
    bad.write_text(finished.job.read_text().replace("regularization: 0.1", "regularization: -1"))
    result = kinfluence("validate", str(finished.job), str(bad), cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"kinfluence: error: {bad}: spec.method.regularization:"), line


def test_crd_prints_the_custom_resource_definition_with_the_spec_schema(tmp_path: Path) -> None:
    result = kinfluence("crd", cwd=tmp_path).check()
    crd = yaml.safe_load(result.stdout)
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "influencejobs.kinfluence.dev"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"model", "loss", "data", "method", "chunks", "output", "workers"} <= set(schema["properties"])
    assert {"model", "loss", "data", "method", "output"} <= set(schema["required"])
    train = schema["properties"]["data"]["properties"]["train"]["properties"]
    assert {"url", "features", "targets"} <= set(train)
    checked_in = Path(__file__).resolve().parents[2] / "crds" / "influencejobs.kinfluence.dev.yaml"
    assert result.stdout == checked_in.read_text()
