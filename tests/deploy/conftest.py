"""Fixtures of the deployment checks: the chart with its optional subchart vendored."""

from __future__ import annotations

from pathlib import Path

import pytest

from helm_chart import vendor_chart


@pytest.fixture(scope="session")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart as `helm dependency build` leaves it: dask-kubernetes-operator in charts/."""
    return vendor_chart(tmp_path_factory.mktemp("chart"))
