"""Fixtures for the operator tests: a Kubernetes API emulator on 127.0.0.1 and a kubeconfig for it."""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from k8s_emulator import EmulatorThread


@pytest.fixture
def k8s(tmp_path: pathlib.Path) -> Iterator[EmulatorThread]:
    """A fresh, empty API emulator (plus the 'default' namespace) serving on a random port."""
    with EmulatorThread() as emulator:
        yield emulator


@pytest.fixture
def kubeconfig(k8s: EmulatorThread, tmp_path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig file pointing at the emulator."""
    return k8s.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def kubectl(kubeconfig: pathlib.Path):  # type: ignore[no-untyped-def]
    """Run /usr/bin/kubectl against the emulator; returns the CompletedProcess (check=False)."""

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["kubectl", f"--kubeconfig={kubeconfig}", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
