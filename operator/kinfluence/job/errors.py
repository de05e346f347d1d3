"""Errors of the job layer; every message names the field or file at fault."""

from __future__ import annotations


class JobError(ValueError):
    """A job cannot run as specified (bad spec, unreadable input, conflicting output)."""


class SpecError(JobError):
    """An InfluenceJob document is not valid; the message names the field(s)."""


class LoadError(JobError):
    """A model, loss, weights file or data set named by the spec cannot be loaded."""


class OutputConflictError(JobError):
    """The output store holds the result of a different job (or exists with onExisting: fail)."""


class MethodUnavailableError(JobError):
    """The spec names an influence method this installation does not provide."""
