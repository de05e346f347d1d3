"""InfluenceJob: the spec (one pydantic model, source of the CRD), loading of what it names,
and the runner that executes it on any dask Client."""

from .document import dump_job, format_validation_error, parse_job, parse_spec, read_job, resolve_relative_paths
from .errors import JobError, LoadError, MethodUnavailableError, OutputConflictError, SpecError
from .progress import CallbackReporter, NullReporter, ProgressReporter, ProgressSnapshot, ProgressTracker, TerminalReporter
from .spec import InfluenceJob, InfluenceJobSpec, InfluenceJobStatus, Phase

__all__ = [
    "CallbackReporter",
    "InfluenceJob",
    "InfluenceJobSpec",
    "InfluenceJobStatus",
    "JobError",
    "LoadError",
    "MethodUnavailableError",
    "NullReporter",
    "OutputConflictError",
    "Phase",
    "ProgressReporter",
    "ProgressSnapshot",
    "ProgressTracker",
    "SpecError",
    "TerminalReporter",
    "dump_job",
    "format_validation_error",
    "parse_job",
    "parse_spec",
    "read_job",
    "resolve_relative_paths",
]
