"""Running the real `kinfluence` console script as a subprocess, and reading what it wrote."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import psutil

from jobproblem import Problem
from kinfluence.compute import open_influence_store

HERE = Path(__file__).resolve().parent
#: the console script installed next to this interpreter (pyproject's [project.scripts])
KINFLUENCE = str(Path(sys.executable).with_name("kinfluence"))
#: folders of the test models (`jobmodels:build`, `climodels:...`) the processes must import
MODEL_PATHS = (str(HERE.parent / "job"), str(HERE))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `kinfluence` process: test models importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*MODEL_PATHS, *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    env.pop("KINFLUENCE_DEBUG", None)
    env.update(extra)
    return env


@dataclass(frozen=True)
class Result:
    """What a finished `kinfluence` process returned and printed."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def log(self) -> str:
        """stderr (progress, messages) with rich's line wrapping undone."""
        return " ".join(self.stderr.split())

    def summary(self) -> tuple[int, int]:
        """(blocks computed, blocks resumed) from the run's last line on stderr."""
        found = re.findall(r"done: (\d+) blocks computed, (\d+) resumed", self.log)
        assert found, f"no 'done:' line in:\n{self.stderr}"
        return int(found[-1][0]), int(found[-1][1])

    def check(self) -> "Result":
        """Itself, after asserting that the command succeeded."""
        assert self.returncode == 0, f"kinfluence {' '.join(self.args)} exited {self.returncode}:\n{self.stderr}"
        return self


@dataclass(frozen=True)
class Finished:
    """A small job that `kinfluence run` completed: its problem, job file, run and output URL."""

    problem: Problem
    job: Path
    run: Result
    output: str


def kinfluence(*args: str, cwd: Path, env: Optional[dict[str, str]] = None, timeout: float = 180) -> Result:
    """Run `kinfluence ARGS...` to its end."""
    proc = subprocess.run([KINFLUENCE, *args], cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    return Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def start_kinfluence(*args: str, cwd: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen[str]:
    """Start `kinfluence ARGS...` in a process group of its own (its worker processes join it),
    with SIGINT at its default (even where this process ignores it), as a shell starts a
    foreground job."""
    return subprocess.Popen([KINFLUENCE, *args], cwd=cwd, env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> Result:
    """Wait for a started process; kill its whole group if it outlives `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"kinfluence did not finish within {timeout} s:\n{err}") from None
    return Result(tuple(proc.args[1:]), proc.returncode, out, err)  # type: ignore[index]


def completed_blocks(url: str) -> int:
    """Blocks recorded done in a store (its completion records), 0 before it exists."""
    return len(list(Path(url, "_completion").glob("block-*.json")))


def wait_for_blocks(proc: subprocess.Popen[str], url: str, at_least: int, timeout: float = 120) -> int:
    """Poll the store until `at_least` blocks are done; returns the count seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = completed_blocks(url)
        if done >= at_least:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"kinfluence exited {proc.returncode} before {at_least} blocks were done:\n"
                                 f"{proc.communicate()[1]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"fewer than {at_least} blocks done after {timeout} s")


def worker_processes(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """The dask worker processes of a `kinfluence run` (its multiprocessing-spawned children)."""
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if any("spawn_main" in part for part in c.cmdline())]


def error_line(result: Result) -> str:
    """The one `kinfluence: error: ...` line of a failed command; asserts there is nothing else."""
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kinfluence: error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_store(url: str) -> dict[str, np.ndarray]:
    """All arrays of a complete store written by a job of `jobproblem` (matrix, top-k, values)."""
    store = open_influence_store(url)
    assert store.is_complete, f"{url} is not complete"
    out = {"influences": np.asarray(store.influences[...]), "values": np.asarray(store.values[...])}
    out.update({k: np.asarray(v[...]) for k, v in (store.top_k or {}).items()})
    return out


def assert_exact(problem: Problem, url: str, regularization: float = 0.1) -> None:
    """The store holds DirectInfluence's influences, computed here in float64, and what follows
    from them: per-train-point means and the top-3 most helpful/harmful training points."""
    exact = problem.direct(regularization)
    got = read_store(url)
    np.testing.assert_allclose(got["influences"], exact, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got["values"], exact.mean(axis=0), rtol=1e-8, atol=1e-10)
    k = got["helpful_indices"].shape[1]
    np.testing.assert_array_equal(got["helpful_indices"], np.argsort(-exact, axis=1, kind="stable")[:, :k])
    np.testing.assert_array_equal(got["harmful_indices"], np.argsort(exact, axis=1, kind="stable")[:, :k])
