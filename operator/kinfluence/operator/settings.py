"""Operator configuration (from the environment) and the kopf settings it implies.

kopf lessons applied: watch requests carry a server-side timeout and a longer client timeout so
a silently dropped watch reconnects (kopf issues #204, #698); kinfluence's own finalizer and
annotation prefix so it never collides with another kopf operator (dask-kubernetes' controller
runs beside it); standalone (no peering CRDs needed); short API request timeouts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import kopf

from kinfluence.job.spec import API_GROUP

FINALIZER = f"{API_GROUP}/finalizer"
ANNOTATION_PREFIX = API_GROUP
DEFAULT_IMAGE = "ghcr.io/kinfluence/worker:0.1.0"


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs to know beyond the InfluenceJob itself."""

    default_image: str = DEFAULT_IMAGE  # runner/worker image when spec.workers.image is not set
    runner_service_account: str | None = None  # needs get/patch on influencejobs(/status)
    reconcile_interval: float = 10.0  # seconds between periodic reconciles of a live job
    watch_server_timeout: float = 120.0
    watch_client_timeout: float = 150.0
    request_timeout: float = 30.0

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """KINFLUENCE_DEFAULT_IMAGE, KINFLUENCE_RUNNER_SERVICE_ACCOUNT, KINFLUENCE_RECONCILE_INTERVAL, ..."""
        return cls(
            default_image=os.environ.get("KINFLUENCE_DEFAULT_IMAGE") or DEFAULT_IMAGE,
            runner_service_account=os.environ.get("KINFLUENCE_RUNNER_SERVICE_ACCOUNT") or None,
            reconcile_interval=_float_env("KINFLUENCE_RECONCILE_INTERVAL", 10.0),
            watch_server_timeout=_float_env("KINFLUENCE_WATCH_SERVER_TIMEOUT", 120.0),
            watch_client_timeout=_float_env("KINFLUENCE_WATCH_CLIENT_TIMEOUT", 150.0),
            request_timeout=_float_env("KINFLUENCE_REQUEST_TIMEOUT", 30.0),
        )


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Apply the operator's kopf settings (called from the startup handler)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = config.request_timeout
    settings.peering.standalone = True
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "kinfluence-operator"
    settings.posting.event_name_prefix = "kinfluence-"
