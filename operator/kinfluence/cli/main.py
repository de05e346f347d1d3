"""The `kinfluence` command: run | inspect | validate | crd | operator | runner.

Bad input ends with one line `kinfluence: error: ...` naming the field or file, and a
non-zero exit status (2: invalid job, input or arguments; 1: the job failed; 130: interrupted).
A failed job is reported the same way; KINFLUENCE_DEBUG=1 shows its Python traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a pod being stopped): stop like Ctrl-C, keeping every finished block."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _error(message: str, code: int) -> int:
    print(f"kinfluence: error: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------ commands


def cmd_crd(args: argparse.Namespace) -> int:
    """Print (or write) the InfluenceJob CRD generated from the spec model."""
    from kinfluence.job.crd import crd_yaml

    text = crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate job files against the spec model (no data or model is loaded)."""
    from kinfluence.job import read_job

    for path in args.jobs:
        job = read_job(path)
        print(f"{path}: valid InfluenceJob {job.metadata.name!r} (method {job.spec.method.name}, output {job.spec.output.url})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job on a local dask cluster of single-threaded worker processes."""
    from kinfluence.job import JobError, read_job, resolve_relative_paths

    path = Path(args.job)
    job = resolve_relative_paths(read_job(path), path.parent)  # spec errors before torch is imported
    from kinfluence.job.local import run_locally

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run_locally(job, job_dir=path.parent, workers=args.workers, output=args.output, preview=args.preview)
    except JobError as err:  # a field of this file: say which file
        if str(err).startswith("spec."):
            raise type(err)(f"{path}: {err}") from None
        raise


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarize an output store; optionally plot test points with their top train points."""
    from kinfluence.job.inspect import inspect_store

    return inspect_store(args.url, test_indices=args.test_index, top=args.top, plot_path=args.plot)


def _delegate(module: str, function: str) -> Callable[[list[str]], int]:
    """A subcommand implemented elsewhere (the operator), imported only when used."""

    def run(argv: list[str]) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            return _error(f"{module} is not available in this installation ({err})", EXIT_FAILED)
        return int(getattr(mod, function)(argv) or 0)

    return run


DELEGATED: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "operator": (_delegate("kinfluence.operator.entry", "operator_main"), "run the Kubernetes operator (kopf)"),
    "runner": (_delegate("kinfluence.operator.entry", "runner_main"), "run one InfluenceJob inside a cluster"),
}


# ------------------------------------------------------------------------------ parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(EXIT_INVALID, f"kinfluence: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kinfluence", description="Influence functions (data attribution) at scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="run a job on this machine (a local dask cluster)")
    p.add_argument("job", help="InfluenceJob YAML file")
    p.add_argument("--workers", type=_positive, default=None, help="worker processes (default: the machine's cores)")
    p.add_argument("--output", default=None, help="output URL, replacing spec.output.url")
    p.add_argument("--preview", type=int, default=3, help="test points shown in the top-k preview (default: 3)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="summarize an output store")
    p.add_argument("url", help="output store URL (local path, gs://, ...)")
    p.add_argument("--test-index", type=int, nargs="+", default=None, metavar="I", help="test points to show")
    p.add_argument("--top", type=_positive, default=5, help="training points shown per test point (default: 5)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a figure of test and top train points")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("validate", help="validate job files")
    p.add_argument("jobs", nargs="+", help="InfluenceJob YAML files")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the InfluenceJob CustomResourceDefinition")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][0](argv[1:])
    args = build_parser().parse_args(argv)
    from kinfluence.job.errors import JobError

    try:
        return args.func(args)
    except JobError as err:
        return _error(str(err), EXIT_INVALID)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(f"kinfluence: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as err:  # the job failed (e.g. a task raised on a worker): one line, no traceback
        if os.environ.get("KINFLUENCE_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return _error(f"{args.command} failed: {type(err).__name__}{': ' + first if first else ''} "
                      "(set KINFLUENCE_DEBUG=1 to see the traceback)", EXIT_FAILED)


if __name__ == "__main__":
    raise SystemExit(main())
