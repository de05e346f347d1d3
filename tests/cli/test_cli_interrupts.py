"""A `kinfluence run` stopped part way: killed outright (SIGKILL to its process group, workers
included), one of its dask workers killed, or Ctrl-C (SIGINT). Finished blocks survive, a rerun
resumes from them, and the result equals the exact answer."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from clitools import (
    assert_exact,
    cli_env,
    completed_blocks,
    finish,
    kinfluence,
    start_kinfluence,
    wait_for_blocks,
    worker_processes,
)
from jobproblem import Problem, make_problem

TOTAL = 18  # 6 test chunks of 1 point x 3 train chunks of 8 points
#: each per-sample gradient pass sleeps this long: blocks finish over a few seconds
SLOW = cli_env(KINFLUENCE_TEST_DELAY="0.3")
FAST = cli_env(KINFLUENCE_TEST_DELAY="0")


@pytest.fixture()
def slow_job(tmp_path: Path) -> tuple[Problem, Path]:
    """The small job with test chunks of one point and a loss that sleeps per chunk."""
    problem = make_problem(tmp_path, n_train=24, n_test=6)
    job = problem.write_job(tmp_path / "job.yaml", loss="climodels:slow_per_sample_cross_entropy",
                            chunks={"train": 8, "test": 1})
    return problem, job


def test_killed_run_resumes_and_equals_the_exact_answer(slow_job: tuple[Problem, Path], tmp_path: Path) -> None:
    problem, job = slow_job
    url = problem.doc["spec"]["output"]["url"]
    proc = start_kinfluence("run", str(job), "--workers", "2", cwd=tmp_path, env=SLOW)
    wait_for_blocks(proc, url, at_least=3)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes: nothing cleans up
    assert finish(proc).returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive
    done = completed_blocks(url)
    assert 3 <= done < TOTAL

    inspect = kinfluence("inspect", url, cwd=tmp_path).check()
    assert f"blocks   {done}/{TOTAL}" in inspect.stdout and "INCOMPLETE (run the job again to resume)" in inspect.stdout

    again = kinfluence("run", str(job), "--workers", "1", "--preview", "0", cwd=tmp_path, env=FAST).check()
    assert again.summary() == (TOTAL - done, done)
    assert_exact(problem, url)


def test_run_survives_the_death_of_a_worker(slow_job: tuple[Problem, Path], tmp_path: Path) -> None:
    problem, job = slow_job
    url = problem.doc["spec"]["output"]["url"]
    proc = start_kinfluence("run", str(job), "--workers", "2", "--preview", "0", cwd=tmp_path, env=SLOW)
    wait_for_blocks(proc, url, at_least=3)
    workers = worker_processes(proc)
    assert len(workers) == 2, workers
    workers[0].kill()  # SIGKILL: the nanny starts a new worker, the scheduler reruns its tasks
    assert completed_blocks(url) < TOTAL
    result = finish(proc).check()
    assert result.summary() == (TOTAL, 0)
    assert completed_blocks(url) == TOTAL
    assert_exact(problem, url)


@pytest.mark.parametrize(("stop", "code", "word"), [
    (lambda pid: os.killpg(pid, signal.SIGINT), 130, "interrupted"),  # Ctrl-C: the whole foreground group
    (lambda pid: os.kill(pid, signal.SIGTERM), 143, "terminated"),  # `kill PID`: the run process alone
], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_the_next_run_resumes(
        slow_job: tuple[Problem, Path], tmp_path: Path, stop: Any, code: int, word: str) -> None:
    problem, job = slow_job
    url = problem.doc["spec"]["output"]["url"]
    proc = start_kinfluence("run", str(job), "--workers", "2", cwd=tmp_path, env=SLOW)
    wait_for_blocks(proc, url, at_least=3)
    workers = worker_processes(proc)
    stop(proc.pid)
    stopped = finish(proc, timeout=60)
    assert stopped.returncode == code, stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stderr.rstrip().endswith(f"kinfluence: {word}"), stopped.stderr
    assert "finished blocks are kept: run the same job again to resume" in stopped.log
    assert stopped.stdout == ""
    _, alive = psutil.wait_procs(workers, timeout=10)  # the workers went with it
    assert not alive
    done = completed_blocks(url)
    assert 1 <= done < TOTAL

    again = kinfluence("run", str(job), "--workers", "1", "--preview", "0", cwd=tmp_path, env=FAST).check()
    assert again.summary() == (TOTAL - done, done)
    assert_exact(problem, url)
