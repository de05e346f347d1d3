"""Core costs of kinfluence's influence methods, measured side by side in ONE run.

What it prints, and why:

1. Per-sample gradients: torch.func (vmap over grad, kinfluence.influence.functional) against
   a Python loop of single-sample backward passes, on an MLP of ~100k parameters. DESIGN.md
   forbids such loops; the ratio says what they would cost.
2. Hessian- (and Gauss-Newton-) vector products per second on the same MLP, one vector and
   several vmapped at once (every CG iteration and every Lanczos step is made of these).
3. Per method (Arnoldi, Nystroem sketch, EK-FAC, and CG / Direct for reference): fit time,
   factor time (influence_factors of one test batch) and the time of one influence block
   (influences_from_factors of one train batch), at two parameter counts, with the growth
   ratio large/small: how each cost scales with p.

Sizes (defaults; `--quick` shrinks everything to a ~15 s smoke run):
    MLP 32 -> h -> h -> 10 (tanh), h chosen for ~10k and ~100k parameters (float32);
    random inputs, labels of a random teacher MLP; fit on 512 points (batches of 256);
    test batch 32, train batch 256; rank 10 for the low-rank methods; Gauss-Newton
    curvature for all (Nystroem needs PSD curvature; CG converges on it); CG capped at
    20 iterations; Direct only where p <= --direct-max-p (it builds a p x p matrix).

Timings are wall-clock on whatever the machine gives (it may be shared): read ratios, not
absolute numbers. Run:  python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kinfluence.influence import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InfluenceFunctionModel,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from kinfluence.influence.functional import FunctionalModel, ParamLayout, trainable_parameters

T = TypeVar("T")
GN = SecondOrderMode.GAUSS_NEWTON
LOSS = nn.functional.cross_entropy
D_IN, N_CLASSES = 32, 10


# ------------------------------------------------------------------------------ shared helpers
# (bench_calculators.py imports these; they run in the client process only)


def hidden_for_parameters(p: int, d_in: int = D_IN, n_classes: int = N_CLASSES) -> int:
    """Width h of a d_in -> h -> h -> n_classes MLP with about p parameters:
    p = h^2 + (d_in + n_classes + 2) h + n_classes."""
    b = d_in + n_classes + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * max(p - n_classes, 1))) / 2))


def make_mlp(p: int, seed: int = 0) -> nn.Sequential:
    """A float32 tanh MLP 32 -> h -> h -> 10 with about p parameters."""
    torch.manual_seed(seed)
    h = hidden_for_parameters(p)
    return nn.Sequential(nn.Linear(D_IN, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, N_CLASSES))


def n_parameters(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters() if t.requires_grad)


def make_data(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """n Gaussian inputs and the labels a fixed random teacher MLP gives them (learnable structure)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    teacher_g = torch.Generator().manual_seed(12345)
    w1 = torch.randn(D_IN, 64, generator=teacher_g) / math.sqrt(D_IN)
    w2 = torch.randn(64, N_CLASSES, generator=teacher_g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x, y


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """A fixed-order loader of (x, y) batches."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` runs after one warm-up run: the least disturbed by other load."""
    fn()
    return min(timed(fn)[1] for _ in range(repeats))


def fmt_s(seconds: Optional[float]) -> str:
    """Seconds in a width-stable form; '-' when not measured."""
    if seconds is None or seconds != seconds:
        return "-"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    """a / b as 'N.NNx', '-' when either is missing."""
    if a is None or b is None or b <= 0 or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    for r in [header, None, *rows]:
        if r is None:
            print(line)
            continue
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells))
    print(line)


# ------------------------------------------------------------------------------ 1 and 2


def loop_per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The forbidden baseline: one backward pass per sample, flattened into (n, p)."""
    params = [t for t in model.parameters() if t.requires_grad]
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(LOSS(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def bench_gradients_and_products(p: int, n: int, n_vectors: int, batch: int, repeats: int) -> None:
    """Per-sample gradients (torch.func vs loop) and HVP/GNVP throughput on one MLP."""
    model = make_mlp(p)
    x, y = make_data(max(n, batch))
    fm = FunctionalModel(model, LOSS)
    params = trainable_parameters(model)
    layout = ParamLayout.of(params)
    p_real = layout.n_parameters

    def vmapped() -> Tensor:
        return layout.flatten(fm.per_sample_gradients(params, x[:n], y[:n]), batch_dims=1)

    t_vmap = best_of(vmapped, repeats)
    t_loop = best_of(lambda: loop_per_sample_gradients(model, x[:n], y[:n]), 1)
    check = float((vmapped()[:4] - loop_per_sample_gradients(model, x[:4], y[:4])).abs().max())
    print_table(
        f"Per-sample gradients: MLP p={p_real:,}, {n} samples, float32",
        ["how", "time", "samples/s", "loop / torch.func"],
        [
            ["torch.func (vmap of grad)", fmt_s(t_vmap), f"{n / t_vmap:,.0f}", ""],
            ["loop of single backward", fmt_s(t_loop), f"{n / t_loop:,.0f}", ratio(t_loop, t_vmap)],
        ],
    )
    print(f"(max |difference| between the two on 4 samples: {check:.2e})")

    xb, yb = x[:batch], y[:batch]
    rows = []
    for label, product in (("HVP  (Hessian)", fm.batch_hvp), ("GNVP (Gauss-Newton)", fm.batch_gnvp)):
        for k in (1, n_vectors):
            v = layout.unflatten(torch.randn(k, p_real))
            t = best_of(lambda: product(params, xb, yb, v), repeats)
            rows.append([f"{label}, {k} vector{'s' if k > 1 else ''} vmapped", fmt_s(t), f"{k / t:,.1f}",
                         f"{k * batch / t:,.0f}"])
    print_table(
        f"Curvature-vector products on a batch of {batch} points: MLP p={p_real:,}",
        ["product", "time / call", "products/s", "vector-points/s"],
        rows,
    )


# ------------------------------------------------------------------------------ 3


@dataclass
class MethodTiming:
    """What one method costs at one parameter count (seconds; None = not run)."""

    fit: Optional[float]
    factors: Optional[float]
    block: Optional[float]
    note: str = ""


@dataclass(frozen=True)
class Sizes:
    n_fit: int
    fit_batch: int
    test_batch: int
    train_batch: int
    rank: int
    cg_maxiter: int
    arnoldi_max_iter: int
    direct_max_p: int
    regularization: float


def build_methods(model: nn.Module, s: Sizes) -> dict[str, Callable[[], InfluenceFunctionModel]]:
    """Constructors of every benchmarked method, lazily (Direct refuses large p itself)."""
    reg = s.regularization
    return {
        "ArnoldiInfluence": lambda: ArnoldiInfluence(model, LOSS, reg, rank=s.rank, tol=1e-4,
                                                     max_iter=s.arnoldi_max_iter, second_order_mode=GN),
        "NystroemSketchInfluence": lambda: NystroemSketchInfluence(model, LOSS, reg, rank=s.rank, second_order_mode=GN),
        "EkfacInfluence": lambda: EkfacInfluence(model, "cross_entropy", hessian_regularization=reg),
        "CgInfluence": lambda: CgInfluence(model, LOSS, reg, rtol=1e-4, atol=1e-8, maxiter=s.cg_maxiter,
                                           warn_on_max_iteration=False, second_order_mode=GN),
        "DirectInfluence": lambda: DirectInfluence(model, LOSS, reg, second_order_mode=GN,
                                                   max_parameters=s.direct_max_p),
    }


def time_method(make: Callable[[], InfluenceFunctionModel], p: int, s: Sizes,
                data: tuple[Tensor, Tensor], repeats: int) -> MethodTiming:
    """Fit once, then the best of `repeats` factor and block computations."""
    name = make.__name__
    x, y = data
    fit_loader = loader(x[: s.n_fit], y[: s.n_fit], s.fit_batch)
    x_test, y_test = x[s.n_fit : s.n_fit + s.test_batch], y[s.n_fit : s.n_fit + s.test_batch]
    x_tr, y_tr = x[: s.train_batch], y[: s.train_batch]
    if "Direct" in name and p > s.direct_max_p:
        return MethodTiming(None, None, None, f"skipped: p > {s.direct_max_p:,}")
    method = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # capped iterations are reported below
        _, t_fit = timed(lambda: method.fit(fit_loader))
        factors, t_factors = timed(lambda: method.influence_factors(x_test, y_test))
        if repeats > 1 and not isinstance(method, CgInfluence):
            t_factors = min(t_factors, best_of(lambda: method.influence_factors(x_test, y_test), repeats - 1))
    t_block = best_of(lambda: method.influences_from_factors(factors, x_tr, y_tr), repeats)
    note = ""
    if isinstance(method, CgInfluence):
        info = method.last_solve_info["model"]
        note = f"{info['iterations']} CG iterations, worst rel. residual {info['max_relative_residual']:.1e}"
    elif isinstance(method, ArnoldiInfluence):
        info = method.fit_info["model"]
        note = f"{info['matvecs']} matvecs, converged={info['converged']}"
    elif isinstance(method, NystroemSketchInfluence):
        note = f"rank {s.rank}: one pass of {s.rank} vmapped products"
    return MethodTiming(t_fit, t_factors, t_block, note)


def warm_up(s: Sizes, methods: Sequence[str]) -> None:
    """Run every method once on a tiny MLP: torch.func's first calls of each kind are slow
    (dispatch and tracing set-up), which would otherwise be charged to the first size timed."""
    tiny = Sizes(n_fit=16, fit_batch=16, test_batch=2, train_batch=4, rank=2, cg_maxiter=2,
                 arnoldi_max_iter=8, direct_max_p=s.direct_max_p, regularization=s.regularization)
    data = make_data(tiny.n_fit + tiny.test_batch)
    makers = build_methods(make_mlp(300), tiny)
    for m in methods:
        make = makers[m]
        make.__name__ = m
        time_method(make, 300, tiny, data, repeats=1)


def bench_methods(p_values: Sequence[int], s: Sizes, methods: Sequence[str], repeats: int) -> None:
    """Fit / factor / block times per method at each parameter count, and their growth."""
    warm_up(s, methods)
    data = make_data(s.n_fit + s.test_batch)
    results: dict[str, list[MethodTiming]] = {m: [] for m in methods}
    p_real = []
    for p in p_values:
        model = make_mlp(p)
        p_real.append(n_parameters(model))
        makers = build_methods(model, s)
        for m in methods:
            make = makers[m]
            make.__name__ = m
            results[m].append(time_method(make, p_real[-1], s, data, repeats))
    lo, hi = p_real[0], p_real[-1]
    header = ["method", "p", "fit", "factors", "block", "note"]
    rows = []
    for m in methods:
        for p, t in zip(p_real, results[m]):
            rows.append([m, f"{p:,}", fmt_s(t.fit), fmt_s(t.factors), fmt_s(t.block), t.note])
    print_table(
        f"Methods: fit on {s.n_fit} points (batches of {s.fit_batch}); factors = influence_factors of "
        f"{s.test_batch} test points; block = influences_from_factors on {s.train_batch} train points",
        header, rows,
    )
    growth = []
    for m in methods:
        a, b = results[m][0], results[m][-1]
        growth.append([m, ratio(b.fit, a.fit), ratio(b.factors, a.factors), ratio(b.block, a.block)])
    print_table(f"Growth from p={lo:,} to p={hi:,} (x{hi / lo:.1f} parameters): time ratio large / small",
                ["method", "fit", "factors", "block"], growth)


# ------------------------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    ap.add_argument("--p-small", type=int, default=10_000, help="small parameter count (~)")
    ap.add_argument("--p-large", type=int, default=100_000, help="large parameter count (~)")
    ap.add_argument("--n-fit", type=int, default=512, help="points the methods are fitted on")
    ap.add_argument("--direct-max-p", type=int, default=12_000, help="run DirectInfluence only up to this p")
    ap.add_argument("--cg-maxiter", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="best-of repeats for the cheap measurements")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.p_small, args.p_large, args.n_fit, args.cg_maxiter = 1_000, 3_000, 64, 5
        args.direct_max_p, args.repeats = 1_500, 2
    sizes = Sizes(
        n_fit=args.n_fit, fit_batch=min(256, args.n_fit), test_batch=8 if args.quick else 32,
        train_batch=32 if args.quick else 256, rank=5 if args.quick else 10, cg_maxiter=args.cg_maxiter,
        arnoldi_max_iter=30 if args.quick else 80, direct_max_p=args.direct_max_p, regularization=0.01,
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    bench_gradients_and_products(args.p_large, n=32 if args.quick else 256, n_vectors=4 if args.quick else 16,
                                 batch=32 if args.quick else 256, repeats=args.repeats)
    methods = ["ArnoldiInfluence", "NystroemSketchInfluence", "EkfacInfluence", "CgInfluence", "DirectInfluence"]
    bench_methods([args.p_small, args.p_large], sizes, methods, args.repeats)


if __name__ == "__main__":
    main()
