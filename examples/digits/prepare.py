"""Prepare the digits example: train a small MLP on sklearn's bundled digits data and write
its weights (a state_dict, artifacts/weights.pt) and the data (a zarr group, artifacts/digits.zarr)
that job.yaml names.

    python examples/digits/prepare.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_model import build  # noqa: E402

N_TEST = 297  # the last 297 of the 1,797 digits; the first 1,500 train


def load(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], shuffled with a fixed seed, split into train and test."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int64)
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


def train(x: np.ndarray, y: np.ndarray, epochs: int = 400, seed: int = 0) -> torch.nn.Module:
    """Full-batch Adam with a little weight decay: a few seconds on a CPU."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "artifacts", help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load()
    model = train(x_train, y_train)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    torch.save(model.state_dict(), args.out / "weights.pt")

    group = zarr.open_group(str(args.out / "digits.zarr"), mode="w")
    for name, arr in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
        group.create_array(name, data=arr, chunks=(256,) + arr.shape[1:])
    group.attrs["description"] = "sklearn digits, 8x8 images flattened to 64 pixels in [0, 1]"
    group.attrs["image_shape"] = [8, 8]
    print(f"trained MLP: test accuracy {acc:.3f}; wrote {args.out / 'weights.pt'} and {args.out / 'digits.zarr'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
