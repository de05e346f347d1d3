"""Resuming to_zarr after a crash or an interruption, on a local path and on gs:// (a real
fake-gcs-server): finished blocks are never recomputed, no block recorded done holds
incomplete data, and the resumed store equals an uninterrupted run and the in-memory
influences().

The crash is real: resume_run.py runs a dask to_zarr (its own LocalCluster of single-threaded
worker processes, slowed by a sleeping converter) in a process group of its own, and the test
SIGKILLs the whole group once the store's completion records show some, not all, blocks done.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from compute_problems import make_problem
from kinfluence.compute import (
    DaskInfluenceCalculator,
    OutputSelection,
    SequentialInfluenceCalculator,
    StoreMismatchError,
    TorchNumpyConverter,
    open_influence_store,
)
from kinfluence.compute.store import StoreHandle
from kinfluence.influence import DirectInfluence
from torch.utils.data import DataLoader, TensorDataset

HERE = pathlib.Path(__file__).resolve().parent
K = 3
ALL = OutputSelection(full_matrix=True, top_k=K, values="mean")  # what resume_run.py writes
TEST_CHUNK, TRAIN_CHUNK = 4, 7  # 11 test x 40 train points: 3 x 6 = 18 blocks
TOTAL = 18
ANON = {"token": "anon"}


class Interrupted(Exception):
    """Raised by a progress callback to stop a run part-way."""


def _interrupt_after(n: int):  # type: ignore[no-untyped-def]
    def on_progress(done: int, total: int) -> None:
        if done >= n:
            raise Interrupted(f"stopped at {done}/{total}")

    return on_progress


def _handle(url: str, storage_options: Mapping[str, Any] | None = None) -> StoreHandle:
    return StoreHandle(url, dict(storage_options or {}))


def _block_records(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[tuple[int, int], dict]:
    """Completion records of blocks, by (test chunk, train chunk)."""
    return {(int(name.split("-")[1]), int(name.split("-")[2])): body
            for name, body in _handle(url, storage_options).records().items() if name.startswith("block-")}


def _slices(i: int, j: int) -> tuple[slice, slice]:
    return slice(i * TEST_CHUNK, (i + 1) * TEST_CHUNK), slice(j * TRAIN_CHUNK, (j + 1) * TRAIN_CHUNK)


def _check_done_blocks_hold_their_data(url: str, done: set[tuple[int, int]], reference: np.ndarray,
                                       storage_options: Mapping[str, Any] | None = None) -> None:
    """Every block recorded done holds exactly its data in every output it feeds: the influence
    block, its top-k candidates and its share of the values sums."""
    store = open_influence_store(url, storage_options)
    assert not store.is_complete and store.completed_blocks == done
    influences = np.asarray(store.influences[...])
    partial = np.asarray(store.group["_work/values_partial"][...])
    cand = np.asarray(store.group["_work/candidates_helpful_indices"][...])
    cand_values = np.asarray(store.group["_work/candidates_helpful_values"][...])
    harmful = np.asarray(store.group["_work/candidates_harmful_indices"][...])
    for i, j in done:
        ts, trs = _slices(i, j)
        expected = reference[ts, trs]
        assert np.abs(influences[ts, trs] - expected).max() <= 1e-10, (i, j)
        assert np.abs(partial[i, trs] - expected.sum(0)).max() <= 1e-10, (i, j)
        block = torch.from_numpy(expected)
        top = block.topk(K, 1)
        np.testing.assert_array_equal(cand[ts, j * K:(j + 1) * K], top.indices.numpy() + trs.start)
        np.testing.assert_allclose(cand_values[ts, j * K:(j + 1) * K], top.values.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_array_equal(harmful[ts, j * K:(j + 1) * K],
                                      block.topk(K, 1, largest=False).indices.numpy() + trs.start)


def _check_complete(url: str, reference: np.ndarray, storage_options: Mapping[str, Any] | None = None,
                    uninterrupted: str | None = None, uninterrupted_options: Mapping[str, Any] | None = None) -> None:
    """The finished store against the in-memory influences() and, if given, an uninterrupted run."""
    store = open_influence_store(url, storage_options)
    assert store.is_complete and len(store.completed_blocks) == store.total_blocks == TOTAL
    influences = np.asarray(store.influences[...])
    assert not np.isnan(influences).any()
    assert np.abs(influences - reference).max() <= 1e-10
    full = torch.from_numpy(reference)
    top = {name: np.asarray(a[...]) for name, a in store.top_k.items()}
    np.testing.assert_array_equal(top["helpful_indices"], full.topk(K, 1).indices.numpy())
    np.testing.assert_array_equal(top["harmful_indices"], full.topk(K, 1, largest=False).indices.numpy())
    np.testing.assert_allclose(top["helpful_values"], full.topk(K, 1).values.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(top["harmful_values"], full.topk(K, 1, largest=False).values.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(store.values[...]), reference.mean(0), rtol=0, atol=1e-10)
    if uninterrupted is not None:
        other = open_influence_store(uninterrupted, uninterrupted_options)
        assert np.abs(influences - np.asarray(other.influences[...])).max() <= 1e-12
        for name, a in other.top_k.items():
            np.testing.assert_allclose(top[name], np.asarray(a[...]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(store.values[...]), np.asarray(other.values[...]), rtol=0, atol=1e-12)
        for key in ("method", "parameters", "mode", "model_fingerprint", "data_fingerprint", "layout", "outputs"):
            assert store.attrs[key] == other.attrs[key], key


def _check_resume_summary(summary: Any, before: Mapping[tuple[int, int], dict], after: Mapping[tuple[int, int], dict],
                          done_factors: set[int]) -> None:
    """The resumed run computed exactly the blocks (and factor chunks) not recorded before it,
    and left the earlier records alone: a recomputed block would carry the new run's id."""
    missing = {(i, j) for i in range(3) for j in range(6)} - set(before)
    assert (summary.total_blocks, summary.skipped_blocks, summary.computed_blocks) == (TOTAL, len(before), len(missing))
    assert summary.computed_factor_chunks == len({i for i, _ in missing} - done_factors)
    assert set(after) == {(i, j) for i in range(3) for j in range(6)}
    for block, record in before.items():
        assert after[block] == record, f"block {block} was recomputed"
    assert {after[b]["run_id"] for b in missing} == {summary.run_id}


# ------------------------------------------------------------------------------------------- kill


class KilledRun:
    """resume_run.py in a process group of its own: start() boots its cluster (the test does
    other work meanwhile), kill_after(n) lets it write and SIGKILLs the whole group (client,
    scheduler and worker processes) once at least n block records exist."""

    def __init__(self, url: str, log: pathlib.Path, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url, self.log, self.storage_options = url, log, dict(storage_options or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KilledRun:
        cmd = [sys.executable, str(HERE / "resume_run.py"), self.url, "--test-chunk", str(TEST_CHUNK),
               "--train-chunk", str(TRAIN_CHUNK), "--delay", "0.3", "--wait-for-go",
               "--storage-options", json.dumps(self.storage_options)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def _lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"resume_run.py ended (rc {self.proc.returncode}) before {what}:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"resume_run.py: not {what} within {timeout} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.05)

    def kill_after(self, n_blocks: int, timeout: float = 180.0) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self._wait(lambda: "ready" in self._lines(), "ready", timeout)
            assert not _block_records(self.url, self.storage_options)
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
            self._wait(lambda: len(_block_records(self.url, self.storage_options)) >= n_blocks,
                       f"{n_blocks} blocks done", timeout)
        finally:
            self.stop()
        workers = next((line.split()[1:] for line in self._lines() if line.startswith("workers ")), [])
        assert len(workers) == 2, self.log.read_text()
        _wait_gone([int(pid) for pid in workers])
        assert not any(line.startswith("complete") for line in self._lines())

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    """Wait until the killed worker processes no longer run (a zombie no longer writes)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker process {pid} survived SIGKILL of its process group")


@pytest.mark.parametrize("where", ["local", pytest.param("gs", marks=pytest.mark.slow)])
def test_dask_resume_after_sigkill_skips_finished_blocks(where, dask_client, gcs_emulator_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL a dask to_zarr run (client and workers) part-way, then resume it here on another
    cluster: the blocks done at the kill are kept as they are, the rest are computed, and the
    store equals an uninterrupted run and the exact in-memory influences."""
    if where == "gs":
        bucket = _bucket(gcs_emulator_process, "kinf-kill")
        url, uninterrupted, options = f"gs://{bucket}/killed.zarr", f"gs://{bucket}/uninterrupted.zarr", ANON
    else:
        url, uninterrupted, options = str(tmp_path / "killed.zarr"), str(tmp_path / "uninterrupted.zarr"), {}
    run = KilledRun(url, tmp_path / "run.log", options).start()
    try:
        # while its cluster boots: the exact answer and an uninterrupted run of the same problem
        p = make_problem("direct")
        reference = p.reference()
        calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
        calc.to_zarr(*p.dask_arrays(TEST_CHUNK, TRAIN_CHUNK), uninterrupted, outputs=ALL, storage_options=options)
        run.kill_after(5)
    finally:
        run.stop()

    before = _block_records(url, options)
    assert 5 <= len(before) < TOTAL, f"{len(before)} blocks done at the kill"
    assert len({r["run_id"] for r in before.values()}) == 1
    _check_done_blocks_hold_their_data(url, set(before), reference, options)
    done_factors = _handle(url, options).completed_factors()
    assert {i for i, _ in before} <= done_factors  # a block is only written after its test factors
    chunk = lambda b: tmp_path / "killed.zarr" / "influences" / "c" / str(b[0]) / str(b[1])
    mtimes = {b: chunk(b).stat().st_mtime_ns for b in before} if where == "local" else {}

    progress: list[tuple[int, int]] = []
    summary = calc.to_zarr(*p.dask_arrays(TEST_CHUNK, TRAIN_CHUNK), url, outputs=ALL, resume=True,
                           storage_options=options, on_progress=lambda d, t: progress.append((d, t)))
    after = _block_records(url, options)
    _check_resume_summary(summary, before, after, done_factors)
    assert progress[0] == (len(before), TOTAL) and progress[-1] == (TOTAL, TOTAL)
    assert len(progress) == TOTAL - len(before) + 1
    for b, mtime in mtimes.items():  # finished blocks' data was not even rewritten
        assert chunk(b).stat().st_mtime_ns == mtime, f"block {b} rewritten"

    _check_complete(url, reference, options, uninterrupted=uninterrupted, uninterrupted_options=options)
    fs, root = _handle(url, options).fs()
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_work/factors/0")  # scratch dropped at the end

    again = calc.to_zarr(*p.dask_arrays(TEST_CHUNK, TRAIN_CHUNK), url, outputs=ALL, resume=True, storage_options=options)
    assert (again.skipped_blocks, again.computed_blocks, again.computed_factor_chunks) == (TOTAL, 0, 0)
    assert _block_records(url, options) == after


# ------------------------------------------------------------------------------------------- gs://


def _bucket(gcs_emulator_process: Any, name: str) -> str:
    gcs_emulator_process.create_bucket(name)
    return name


def _wait_quiet(client: Any, url: str, storage_options: Mapping[str, Any], settle: float = 1.0,
                timeout: float = 60.0) -> None:
    """After an interrupted run: wait until no worker runs a task of it any more (a cancelled
    task already running finishes and records its block) and the records stopped changing."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        busy = sum(client.run(lambda dask_worker: len(dask_worker.state.executing)).values())
        records = set(_block_records(url, storage_options))
        if records != last or busy:
            last, since = records, time.monotonic()
        elif time.monotonic() - since >= settle:
            return
        time.sleep(0.1)
    pytest.fail("the interrupted run's tasks did not settle")


def test_gcs_write_interrupt_resume_and_refusal(dask_client, gcs_emulator_process) -> None:  # type: ignore[no-untyped-def]
    """On gs:// through the emulator: a store reads back equal to influences(); a run stopped
    part-way (its progress callback raising) resumes skipping the finished blocks and ends equal
    to the uninterrupted store; resuming with another method or other parameters is refused,
    naming what differs, and leaves the store as it was."""
    import gcsfs

    bucket = _bucket(gcs_emulator_process, "kinf-resume")
    p = make_problem("direct")
    reference = p.reference()
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    arrays = p.dask_arrays(TEST_CHUNK, TRAIN_CHUNK)

    full = f"gs://{bucket}/full.zarr"
    first = calc.to_zarr(*arrays, full, outputs=ALL, storage_options=ANON)
    assert (first.computed_blocks, first.skipped_blocks) == (TOTAL, 0)
    _check_complete(full, reference, ANON)
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/full.zarr/_completion/finalized.json")
    assert fs.exists(f"{bucket}/full.zarr/influences/zarr.json")

    url = f"gs://{bucket}/partial.zarr"
    with pytest.raises(Interrupted):
        calc.to_zarr(*arrays, url, outputs=ALL, storage_options=ANON, on_progress=_interrupt_after(7),
                     max_columns_in_flight=1)
    _wait_quiet(dask_client, url, ANON)
    before = _block_records(url, ANON)
    assert 7 <= len(before) < TOTAL, f"{len(before)} blocks done when stopped"
    _check_done_blocks_hold_their_data(url, set(before), reference, ANON)
    done_factors = _handle(url, ANON).completed_factors()

    # another method, then other parameters: refused, naming the differences; nothing touched
    cg = make_problem("cg")
    with pytest.raises(StoreMismatchError) as refused:
        DaskInfluenceCalculator(cg.model, TorchNumpyConverter(), dask_client).to_zarr(
            *cg.dask_arrays(TEST_CHUNK, TRAIN_CHUNK), url, outputs=ALL, storage_options=ANON, resume=True)
    message = str(refused.value)
    assert "method: store has 'DirectInfluence', this run has 'CgInfluence'" in message
    assert "model_fingerprint" in message and url in message and "overwrite=True" in message
    assert "data_fingerprint" not in message and "layout" not in message  # same data, same chunks
    assert set(refused.value.differences) >= {"method", "model_fingerprint"}
    reg = DirectInfluence(p.model.model, p.model.loss, regularization=0.2).fit(
        DataLoader(TensorDataset(p.x, p.y), batch_size=16))
    with pytest.raises(StoreMismatchError, match=r"parameters\.regularization: store has \{'model': 0\.1\}, this run has \{'model': 0\.2\}") as refused:
        DaskInfluenceCalculator(reg, TorchNumpyConverter(), dask_client).to_zarr(
            *arrays, url, outputs=ALL, storage_options=ANON, resume=True)
    assert "method" not in refused.value.differences
    with pytest.raises(StoreMismatchError, match=r"mode: store has 'up', this run has 'perturbation'"):
        calc.to_zarr(*arrays, url, outputs=OutputSelection(values="mean"), mode="perturbation",
                     storage_options=ANON, resume=True)
    assert _block_records(url, ANON) == before

    summary = calc.to_zarr(*arrays, url, outputs=ALL, storage_options=ANON, resume=True)
    _check_resume_summary(summary, before, _block_records(url, ANON), done_factors)
    _check_complete(url, reference, ANON, uninterrupted=full, uninterrupted_options=ANON)
    ds = open_influence_store(url, ANON).to_xarray()
    assert ds["influences"].dims == ("test", "train")
    assert np.abs(ds["influences"].values - reference).max() <= 1e-10


# ------------------------------------------------------------------------------------------- sequential


def test_sequential_resume_skips_finished_blocks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Sequential to_zarr stopped after 8 of 18 blocks (train chunks outer: columns 0 and 1 and
    two blocks of column 2) resumes computing only the other 10 blocks and no factors again,
    counted on the model itself."""
    p = make_problem("direct")
    reference = p.reference()
    calls = {"factors": 0, "blocks": 0}
    factors, blocks = p.model.influence_factors, p.model.influences_from_representations

    def counted_factors(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["factors"] += 1
        return factors(*args, **kwargs)

    def counted_blocks(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["blocks"] += 1
        return blocks(*args, **kwargs)

    monkeypatch.setattr(p.model, "influence_factors", counted_factors)
    monkeypatch.setattr(p.model, "influences_from_representations", counted_blocks)
    calc = SequentialInfluenceCalculator(p.model)
    url = str(tmp_path / "seq.zarr")

    with pytest.raises(Interrupted):
        calc.influences(*p.loaders(TEST_CHUNK, TRAIN_CHUNK)).to_zarr(url, outputs=ALL, on_progress=_interrupt_after(8))
    assert calls == {"factors": 3, "blocks": 8}
    before = _block_records(url)
    assert set(before) == {(i, j) for j in (0, 1) for i in range(3)} | {(0, 2), (1, 2)}
    _check_done_blocks_hold_their_data(url, set(before), reference)

    calls.update(factors=0, blocks=0)
    summary = calc.influences(*p.loaders(TEST_CHUNK, TRAIN_CHUNK)).to_zarr(url, outputs=ALL, resume=True)
    assert calls == {"factors": 0, "blocks": TOTAL - 8}
    _check_resume_summary(summary, before, _block_records(url), done_factors={0, 1, 2})

    calls.update(factors=0, blocks=0)
    uninterrupted = str(tmp_path / "uninterrupted.zarr")
    calc.influences(*p.loaders(TEST_CHUNK, TRAIN_CHUNK)).to_zarr(uninterrupted, outputs=ALL)
    assert calls == {"factors": 3, "blocks": TOTAL}
    _check_complete(url, reference, uninterrupted=uninterrupted)


# ------------------------------------------------------------------------------------------- factor rewrites


def test_rewriting_test_factors_never_exposes_incomplete_factors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A test chunk's factors can be written again while blocks read them: a cancelled run's
    store-factors task still running when the resumed run starts, or dask rerunning the task
    after a worker is lost. Readers must see the complete factors throughout, never a missing
    array or fill values (a block computed from those would be recorded done with wrong data)."""
    import threading

    p = make_problem("direct")
    url = str(tmp_path / "factors.zarr")
    SequentialInfluenceCalculator(p.model).influences(*p.loaders(TEST_CHUNK, TRAIN_CHUNK)).to_zarr(
        url, outputs=ALL, keep_factors=True)
    store = open_influence_store(url)
    handle = StoreHandle(url, {}, store.layout, store.outputs, run_id="stray")
    factors = handle.read_factors(0)
    expected = p.model.influence_factors(p.x_test[:TEST_CHUNK], p.y_test[:TEST_CHUNK]).numpy()
    assert np.abs(factors - expected).max() <= 1e-12

    stop = threading.Event()
    writes = [0]

    def rewrite() -> None:
        while not stop.is_set():
            handle.write_factors(0, factors)
            writes[0] += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    wrong: list[str] = []
    reads = 0
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and (reads < 300 or writes[0] < 30):
            reads += 1
            try:
                got = handle.read_factors(0)
                if not np.array_equal(got, factors):
                    wrong.append(f"wrong values ({int(np.isnan(got).sum())} NaN, {int((got == 0).sum())} zero)")
            except Exception as e:  # noqa: BLE001
                wrong.append(repr(e))
    finally:
        stop.set()
        writer.join()
    assert writes[0] >= 5 and reads >= 50
    assert not wrong, f"{len(wrong)} of {reads} reads during {writes[0]} rewrites saw incomplete factors: {wrong[:3]}"
    assert np.array_equal(handle.read_factors(0), factors)
