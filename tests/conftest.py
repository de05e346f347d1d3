"""Shared fixtures: a real GCS API emulator process and a real dask LocalCluster with
single-threaded worker processes, each started once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before anything imports gcsfs

import pytest  # noqa: E402

from gcs_emulator import GcsEmulator  # noqa: E402

#: environment every dask worker process starts with
WORKER_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """The endpoint URL of a running fake-gcs-server; STORAGE_EMULATOR_HOST points gcsfs at it.
    Create buckets with gcsfs (`GCSFileSystem(token="anon").mkdir("bucket")`) or
    `gcs_emulator_process.create_bucket(name)`; use storage_options={"token": "anon"}."""
    emulator = GcsEmulator().start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.endpoint
    WORKER_ENV["STORAGE_EMULATOR_HOST"] = emulator.endpoint
    _EMULATORS.append(emulator)
    try:
        yield emulator.endpoint
    finally:
        _EMULATORS.remove(emulator)
        emulator.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


_EMULATORS: list[GcsEmulator] = []


@pytest.fixture(scope="session")
def gcs_emulator_process(gcs_emulator: str) -> GcsEmulator:
    """The GcsEmulator object behind `gcs_emulator` (to create buckets directly)."""
    return _EMULATORS[-1]


def _local_cluster(n_workers: int, threads_per_worker: int):  # type: ignore[no-untyped-def]
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                        dashboard_address=":0", env=dict(WORKER_ENV), silence_logs=40)


@pytest.fixture(scope="session")
def dask_client(gcs_emulator: str) -> Iterator["distributed.Client"]:  # type: ignore[name-defined]  # noqa: F821
    """A Client of a LocalCluster with 2 single-threaded worker processes (workers see the GCS
    emulator), shared by the whole session."""
    from distributed import Client

    with _local_cluster(2, 1) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def multithreaded_dask_client(gcs_emulator: str) -> Iterator["distributed.Client"]:  # type: ignore[name-defined]  # noqa: F821
    """A Client of a LocalCluster with one worker process running 2 threads (for the
    thread-safety check), shared by the session."""
    from distributed import Client

    with _local_cluster(1, 2) as cluster, Client(cluster, set_as_default=False) as client:
        yield client
