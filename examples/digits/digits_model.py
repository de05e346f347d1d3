"""The digits example's network: an MLP on sklearn's 8x8 digit images (64 pixels -> 10 classes).

`kinfluence` builds it through the entrypoint `digits_model:build` named in job.yaml and loads
the weights that prepare.py trained into it.
"""

from torch import nn

N_FEATURES = 64
N_CLASSES = 10
HIDDEN = 16


def build() -> nn.Module:
    """An untrained MLP 64 -> 16 -> 10 (tanh): 1,210 parameters."""
    return nn.Sequential(nn.Linear(N_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, N_CLASSES))
