"""Entry points of `kinfluence operator` (kopf, namespaced or cluster-wide, with a liveness endpoint)
and `kinfluence runner` (inside the runner pod of a DaskJob: runs its InfluenceJob on the job's
dask cluster and patches progress into the InfluenceJob's status)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
PROGRESS_INTERVAL = 5.0  # seconds between progress patches of one job (at most)


def _operator_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kinfluence operator", description="Run the InfluenceJob operator (kopf).")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; globs like 'team-*' allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (the default)")
    parser.add_argument("--liveness", default=DEFAULT_LIVENESS,
                        help=f"liveness endpoint URL (default {DEFAULT_LIVENESS}); 'none' disables it")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


async def serve(
    namespaces: Sequence[str] = (),
    liveness: str | None = DEFAULT_LIVENESS,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator until `stop_flag` is set: cluster-wide without namespaces, else only those."""
    import kopf

    import kinfluence.operator.handlers  # noqa: F401  (registers the handlers)

    await kopf.operator(
        clusterwide=not namespaces, namespaces=list(namespaces), standalone=True,
        liveness_endpoint=liveness, stop_flag=stop_flag, ready_flag=ready_flag)


def operator_main(argv: list[str]) -> int:
    """`kinfluence operator [-n NS ...|-A] [--liveness URL]`."""
    args = _operator_parser().parse_args(argv)
    import kopf

    kopf.configure(verbose=args.verbose)
    liveness = None if args.liveness.lower() == "none" else args.liveness
    env_namespaces = [n for n in os.environ.get("KINFLUENCE_NAMESPACES", "").split(",") if n]
    namespaces = [] if args.all_namespaces else (args.namespace or env_namespaces)
    try:
        asyncio.run(serve(namespaces, liveness))
    except KeyboardInterrupt:
        return 130
    return 0


# ------------------------------------------------------------------------------------- runner


def _runner_parser() -> argparse.ArgumentParser:
    from kinfluence.operator.manifests import ENV_JOB_NAME, ENV_JOB_NAMESPACE

    parser = argparse.ArgumentParser(prog="kinfluence runner",
                                     description="Run one InfluenceJob on the dask cluster of its DaskJob.")
    parser.add_argument("--name", default=os.environ.get(ENV_JOB_NAME), help=f"InfluenceJob name (${ENV_JOB_NAME})")
    parser.add_argument("--namespace", default=os.environ.get(ENV_JOB_NAMESPACE),
                        help=f"its namespace (${ENV_JOB_NAMESPACE})")
    parser.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
                        help="dask scheduler address ($DASK_SCHEDULER_ADDRESS, set by dask-kubernetes)")
    return parser


def progress_patcher(namespace: str, name: str) -> Any:
    """A CallbackReporter that patches status.progress of the InfluenceJob, at most once per 5 s."""
    from kinfluence.job import CallbackReporter
    from kinfluence.operator import kube

    log = logging.getLogger("kinfluence.runner")

    def send(snapshot: Any) -> None:
        try:
            kube.patch_influencejob_status(namespace, name, {"progress": snapshot.to_status()})
        except Exception as err:  # progress is best effort: never fail the computation for it
            log.warning("progress patch of %s/%s failed: %s", namespace, name, err)

    return CallbackReporter(send, min_interval=PROGRESS_INTERVAL)


def runner_main(argv: list[str]) -> int:
    """`kinfluence runner`: read the InfluenceJob through the API, run it on DASK_SCHEDULER_ADDRESS."""
    args = _runner_parser().parse_args(argv)
    missing = [flag for flag, value in (("--name", args.name), ("--namespace", args.namespace),
                                        ("--scheduler", args.scheduler)) if not value]
    if missing:
        print(f"kinfluence runner: error: missing {', '.join(missing)} (or their environment variables)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from kinfluence.operator import kube
    from kinfluence.operator.accepted import effective_spec

    body = kube.get_influencejob(args.namespace, args.name)
    spec, error, _ = effective_spec(body)
    if spec is None:
        print(f"kinfluence runner: error: {error}", file=sys.stderr)
        return 2
    from distributed import Client

    from kinfluence.job import JobError
    from kinfluence.job.runner import run_job

    reporter = progress_patcher(args.namespace, args.name)
    try:
        with Client(args.scheduler, timeout="120s") as client:
            result = run_job(spec, client, reporter, name=args.name)
    except JobError as err:
        print(f"kinfluence runner: error: {err}", file=sys.stderr)
        return 1
    print(f"kinfluence runner: {result.computed_blocks} blocks computed, {result.skipped_blocks} resumed; "
          f"output {result.output}")
    return 0
