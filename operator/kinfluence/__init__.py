"""kinfluence: influence functions (data attribution) at scale, as Kubernetes jobs."""

__version__ = "0.1.0"
