"""The `kinfluence` command line (console script `kinfluence = kinfluence.cli.main:main`)."""

from .main import main

__all__ = ["main"]
