"""`kinfluence run`: a job on this machine — a LocalCluster of single-threaded worker processes,
a progress bar, and a short top-k preview of the result."""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import SpecError
from .inspect import describe, open_store
from .progress import TerminalReporter
from .runner import check_output, prepare_job, run_job
from .spec import InfluenceJob, OutputSpec


def make_importable(folder: Path) -> None:
    """Put the job file's folder on the path of this process and of the worker processes it
    starts, so an entrypoint module next to the job file can be imported everywhere."""
    folder_s = str(folder.resolve())
    if folder_s not in sys.path:
        sys.path.insert(0, folder_s)
    current = os.environ.get("PYTHONPATH", "")
    if folder_s not in current.split(os.pathsep):
        os.environ["PYTHONPATH"] = folder_s + (os.pathsep + current if current else "")


def with_output(job: InfluenceJob, url: str) -> InfluenceJob:
    """The job writing to another URL (the --output option), validated like the spec field; a
    relative local path is relative to the current directory (the workers get it absolute)."""
    from pydantic import ValidationError

    from .spec import url_scheme

    data = job.spec.output.model_dump(by_alias=True)
    data["url"] = str(Path(url).resolve()) if url.strip() and url_scheme(url) == "" else url
    try:
        output = OutputSpec.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(f"--output: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return job.model_copy(update={"spec": job.spec.model_copy(update={"output": output})})


class IgnoreInterrupts(WorkerPlugin):
    """Workers ignore SIGINT: Ctrl-C stops the job through the client, and the workers are closed
    by their nannies instead of dying with a traceback each (also for restarted workers)."""

    name = "kinfluence-ignore-interrupts"

    def setup(self, worker: Any) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def log_level() -> int:
    """The level of dask's own log messages in a local run. A failure reaches the user as one
    line from the client, so dask's messages (a failed task's traceback on its worker, a
    heartbeat lost while the cluster shuts down) are shown only with KINFLUENCE_DEBUG=1."""
    return logging.WARNING if os.environ.get("KINFLUENCE_DEBUG") else logging.CRITICAL


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """SIGINT ignored while worker processes are spawned (they inherit the disposition)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_locally(
    job: InfluenceJob,
    job_dir: Path,
    workers: Optional[int] = None,
    output: Optional[str] = None,
    preview: int = 3,
    out: TextIO = sys.stdout,
) -> int:
    """Run `job` on a fresh LocalCluster; returns the exit status."""
    from distributed import Client, LocalCluster

    if output:
        job = with_output(job, output)
    make_importable(job_dir)
    prepared = prepare_job(job.spec)  # bad input fails here, before any process starts
    check_output(prepared)
    n = workers or os.cpu_count() or 1
    reporter = TerminalReporter()
    reporter.console.print(f"[bold]kinfluence[/bold] job {job.metadata.name!r}: starting {n} worker process(es)")
    with interrupts_ignored():
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=log_level()
        )
    with cluster, Client(cluster) as client:
        client.register_plugin(IgnoreInterrupts())
        if client.dashboard_link:
            reporter.console.print(f"dashboard: {client.dashboard_link}")
        result = run_job(prepared, client, reporter, name=job.metadata.name)
    print(f"output: {result.output}", file=out)
    if preview > 0:
        store = open_store(result.output, job.spec.output.storage_options or None)
        if store.outputs.top_k is not None or (store.outputs.full_matrix and not store.layout.feature_shape):
            describe(store, list(range(min(preview, store.layout.n_test))), top=min(5, store.layout.n_train), out=out)
    print(f"inspect: kinfluence inspect {result.output} --test-index 0 --plot influence.png", file=out)
    return 0
