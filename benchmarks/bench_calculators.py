"""kinfluence's chunked calculators against the floor and the naive block-wise scheme, in ONE run.

For CgInfluence and ArnoldiInfluence (both fitted once, in this process) it times, on the
same data and chunks:

    floor       per-sample gradients of all test and train points + the GEMM of the two
                (Arnoldi: gradients projected into the rank-k basis first, then a k-dim GEMM),
                in this process: the least work any calculator must do.
    sequential  kinfluence's SequentialInfluenceCalculator(model).influences(...).compute(),
                in this process.
    dask        kinfluence's DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
                .influences(...).compute() on a LocalCluster of 2 single-threaded worker
                processes (OMP_NUM_THREADS=1).
    naive       what pyDVL does: model.influences(x_test_chunk, y_test_chunk, x_chunk, y_chunk)
                once per (test chunk, train chunk) block, on the same cluster, so every block
                recomputes its test chunk's factors (written here, in `naive_block`).

and prints ours/naive and ours/floor (each the fastest of --cg-repeats / --arnoldi-repeats runs:
the machine may be shared). This process uses torch's default threads (2 on the
benchmark machine), the cluster 2 processes x 1 thread: the same cores either way.

Then, for ArnoldiInfluence, the peak RSS of each worker process (psutil, sampled every 5 ms
inside the workers) while DaskInfluenceCalculator.to_zarr
writes the full matrix for n_train and for 4 x n_train training points: memory bounded by
the chunk sizes stays flat while n_train grows four-fold.

Design goals checked at the end (DESIGN.md, "Scaling"): dask >= 5x faster than naive for CG
at >= 8 train chunks; dask within 1.5x of the floor for Arnoldi.

Default sizes (the full size: 8.7 minutes on 2 cores shared at load ~3.5; at load ~8 the CG
floor alone took 151 s, so expect well over 15 minutes there. `--n-train 8000 --n-test 400`
keeps 8 x 2 chunks and p = 100k at 1/6 of the GEMM: 4 minutes at load ~2-5):
    MLP 32 -> 295 -> 295 -> 10 (tanh, float32), p = 100,015 parameters;
    n_train = 20,000 in 8 chunks of 2,500; n_test = 1,000 in 2 chunks of 500;
    both methods fitted on the first 256 training points (Gauss-Newton curvature,
    regularization 0.01); CG: at most 3 iterations (rtol 1e-3) per solve, which keeps the
    naive run (8 x the solves) inside the time budget; Arnoldi: rank 10, <= 60 products;
    memory runs at 20,000 and 80,000 training points.
    --quick: p ~ 5k, 2,000 x 100 points, 8 x 2 chunks, ~20 s (a smoke run).

Run:  python benchmarks/bench_calculators.py [--quick] [--n-train N --n-test N --p P ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import dask.array as da
import numpy as np
import torch
from distributed import Client, LocalCluster

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import (  # noqa: E402  (client-side helpers only; nothing of it runs on workers)
    GN,
    LOSS,
    fmt_s,
    loader,
    make_data,
    make_mlp,
    n_parameters,
    print_table,
    ratio,
    timed,
)

from kinfluence.compute import (  # noqa: E402
    DaskInfluenceCalculator,
    NestedTorchCatAggregator,
    OutputSelection,
    SequentialInfluenceCalculator,
    TorchNumpyConverter,
)
from kinfluence.influence import ArnoldiInfluence, CgInfluence, InfluenceFunctionModel  # noqa: E402
from kinfluence.influence.lowrank import LowRankInfluence  # noqa: E402

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ on the workers
# (defined here in __main__, so cloudpickle ships them by value; workers need no import path)


def start_rss_sampler(dask_worker: Any, interval: float = 0.005) -> int:
    """Start a thread in this worker recording its peak RSS; returns the RSS now (bytes)."""
    import threading

    import psutil

    proc = psutil.Process()
    state: dict[str, Any] = {"peak": proc.memory_info().rss, "stop": threading.Event()}

    def sample() -> None:
        while not state["stop"].wait(interval):
            state["peak"] = max(state["peak"], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True, name="bench-rss").start()
    dask_worker.bench_rss = state
    return int(state["peak"])


def stop_rss_sampler(dask_worker: Any) -> int:
    """Stop this worker's sampler; returns the peak RSS seen since it started (bytes)."""
    import psutil

    state = dask_worker.bench_rss
    state["stop"].set()
    return int(max(state["peak"], psutil.Process().memory_info().rss))


def install_model(dask_worker: Any, blob: bytes, name: str) -> None:
    """Keep one unpickled copy of the model on this worker, under `name`.

    The naive baseline ships its model this way rather than as a scattered key: a worker
    asked by a peer for a key holding the model while a task runs on it failed to pickle it
    ("Cannot access storage of TensorWrapper": torch.func's functional_call swaps the module's
    parameters for wrapped tensors during the call), and the run hung."""
    import pickle

    setattr(dask_worker, name, pickle.loads(blob))


def naive_block(name: str, x_test: np.ndarray, y_test: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The naive unit of work: one full influences() call per block (factors recomputed)."""
    from distributed import get_worker

    model = getattr(get_worker(), name)
    t = torch.from_numpy
    return model.influences(t(x_test), t(y_test), t(x), t(y)).numpy()


# ------------------------------------------------------------------------------ in this process


@dataclass(frozen=True)
class Problem:
    """Data, chunking and the fitted methods shared by every scheme."""

    x_test: torch.Tensor
    y_test: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    test_chunk: int
    train_chunk: int

    @property
    def n_train_chunks(self) -> int:
        return -(-len(self.x) // self.train_chunk)

    @property
    def n_test_chunks(self) -> int:
        return -(-len(self.x_test) // self.test_chunk)

    def dask_arrays(self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None) -> tuple[da.Array, ...]:
        xs = self.x if x is None else x
        ys = self.y if y is None else y
        xt, yt, xn, yn = (t.numpy() for t in (self.x_test, self.y_test, xs, ys))
        return (da.from_array(xt, chunks=(self.test_chunk, xt.shape[1])), da.from_array(yt, chunks=self.test_chunk),
                da.from_array(xn, chunks=(self.train_chunk, xn.shape[1])), da.from_array(yn, chunks=self.train_chunk))


def row_chunks(t: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [t[i : i + size] for i in range(0, len(t), size)]


def floor_influences(model: InfluenceFunctionModel, pb: Problem) -> np.ndarray:
    """Per-sample gradients of every point and the GEMM against them (Arnoldi: projected
    into the rank-k basis and scaled, so this IS the influence; CG: no solve, a lower bound)."""
    if isinstance(model, LowRankInfluence):
        bases = [(sl, *model.eigen(b), model.regularization[b]) for b, sl in model.block_slices.items()]

        def test_side(g: torch.Tensor) -> torch.Tensor:
            return torch.cat([(g[:, sl] @ v) / (lam + r) for sl, lam, v, r in bases], dim=1)

        def train_side(g: torch.Tensor) -> torch.Tensor:
            return torch.cat([g[:, sl] @ v for sl, _, v, _ in bases], dim=1)
    else:
        def test_side(g: torch.Tensor) -> torch.Tensor:
            return g

        train_side = test_side
    f = torch.cat([test_side(model.gradients(xc, yc)) for xc, yc in
                   zip(row_chunks(pb.x_test, pb.test_chunk), row_chunks(pb.y_test, pb.test_chunk))])
    out = torch.empty(len(pb.x_test), len(pb.x), dtype=f.dtype)
    for start in range(0, len(pb.x), pb.train_chunk):
        sl = slice(start, start + pb.train_chunk)
        out[:, sl] = f @ train_side(model.gradients(pb.x[sl], pb.y[sl])).T
    return out.numpy()


def sequential_influences(model: InfluenceFunctionModel, pb: Problem) -> np.ndarray:
    calc = SequentialInfluenceCalculator(model)
    lazy = calc.influences(loader(pb.x_test, pb.y_test, pb.test_chunk), loader(pb.x, pb.y, pb.train_chunk), mode="up")
    return lazy.compute(aggregator=NestedTorchCatAggregator()).numpy()


# ------------------------------------------------------------------------------ on the cluster


@dataclass
class ClusterRun:
    """One timed run on the cluster: seconds, result, and each worker's peak RSS (bytes)."""

    seconds: float
    result: Optional[np.ndarray]
    peak_rss: list[int] = field(default_factory=list)
    start_rss: list[int] = field(default_factory=list)


def on_cluster(client: Client, work: Callable[[], Optional[np.ndarray]]) -> ClusterRun:
    """Sample the workers' RSS while `work` runs, and time it. (Workers are not restarted:
    under load a restart can exceed distributed's timeout; a collection runs first instead,
    and the table shows the RSS at start next to the peak.)"""
    import gc

    client.run(gc.collect)
    start = client.run(start_rss_sampler)
    result, seconds = timed(work)
    peak = client.run(stop_rss_sampler)
    return ClusterRun(seconds, result, [peak[w] for w in sorted(peak)], [start[w] for w in sorted(start)])


def dask_influences(client: Client, model: InfluenceFunctionModel, pb: Problem) -> np.ndarray:
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
    return calc.influences(*pb.dask_arrays(), mode="up").compute()


def naive_influences(client: Client, model: InfluenceFunctionModel, pb: Problem) -> np.ndarray:
    """pyDVL's scheme: model.influences() per (test chunk, train chunk) block, on the cluster
    (the model and data chunks are shipped once, as for our calculator)."""
    import pickle
    import uuid

    name = f"bench_naive_model_{uuid.uuid4().hex}"
    client.run(install_model, blob=pickle.dumps(model), name=name)
    tests = [client.scatter([xc.numpy(), yc.numpy()]) for xc, yc in
             zip(row_chunks(pb.x_test, pb.test_chunk), row_chunks(pb.y_test, pb.test_chunk))]
    trains = [client.scatter([xc.numpy(), yc.numpy()]) for xc, yc in
              zip(row_chunks(pb.x, pb.train_chunk), row_chunks(pb.y, pb.train_chunk))]
    futures = [[client.submit(naive_block, name, *t, *r, pure=False) for r in trains] for t in tests]
    try:
        return np.block(client.gather(futures))
    finally:
        client.run(lambda dask_worker: delattr(dask_worker, name) if hasattr(dask_worker, name) else None)


def to_zarr_run(client: Client, model: InfluenceFunctionModel, pb: Problem, x: torch.Tensor, y: torch.Tensor) -> None:
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
    with tempfile.TemporaryDirectory(prefix="kinfluence-bench-") as tmp:
        calc.to_zarr(*pb.dask_arrays(x, y), os.path.join(tmp, "influences.zarr"), mode="up",
                     outputs=OutputSelection(full_matrix=True))


# ------------------------------------------------------------------------------ reporting


def rel_diff(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> str:
    if a is None or b is None:
        return "-"
    return f"{float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)):.1e}"


def mib(values: Sequence[int]) -> str:
    return " / ".join(f"{v / 2**20:,.0f}" for v in values) if values else "-"


@dataclass
class MethodResult:
    name: str
    floor: float
    sequential: float
    dask: ClusterRun
    naive: ClusterRun
    agreement: dict[str, str]


def best_timed(work: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
    """(result, fastest of `repeats` wall times): the least disturbed by other load."""
    runs = [timed(work) for _ in range(repeats)]
    return runs[-1][0], min(t for _, t in runs)


def best_cluster(client: Client, work: Callable[[], Optional[np.ndarray]], repeats: int) -> ClusterRun:
    return min((on_cluster(client, work) for _ in range(repeats)), key=lambda r: r.seconds)


def bench_method(name: str, model: InfluenceFunctionModel, pb: Problem, client: Client, repeats: int) -> MethodResult:
    print(f"\n[{name}] floor ...", flush=True)
    floor, t_floor = best_timed(lambda: floor_influences(model, pb), repeats)
    print(f"[{name}] floor {fmt_s(t_floor)}; sequential ...", flush=True)
    seq, t_seq = best_timed(lambda: sequential_influences(model, pb), repeats)
    print(f"[{name}] sequential {fmt_s(t_seq)}; dask ...", flush=True)
    dsk = best_cluster(client, lambda: dask_influences(client, model, pb), repeats)
    print(f"[{name}] dask {fmt_s(dsk.seconds)}; naive ...", flush=True)
    naive = best_cluster(client, lambda: naive_influences(client, model, pb), repeats)
    print(f"[{name}] naive {fmt_s(naive.seconds)}", flush=True)
    agreement = {"sequential": rel_diff(seq, dsk.result), "naive": rel_diff(naive.result, dsk.result),
                 "floor": rel_diff(floor, dsk.result) if isinstance(model, LowRankInfluence) else "n/a (no solve)"}
    dsk.result = naive.result = None
    return MethodResult(name, t_floor, t_seq, dsk, naive, agreement)


def print_method_table(results: Sequence[MethodResult], pb: Problem) -> None:
    rows = []
    for r in results:
        rows += [
            [r.name, "floor (grads + GEMM)", fmt_s(r.floor), "", "", "", "-"],
            ["", "sequential (ours)", fmt_s(r.sequential), ratio(r.sequential, r.naive.seconds),
             ratio(r.sequential, r.floor), r.agreement["sequential"], "-"],
            ["", "dask (ours)", fmt_s(r.dask.seconds), ratio(r.dask.seconds, r.naive.seconds),
             ratio(r.dask.seconds, r.floor), "(reference)", mib(r.dask.peak_rss)],
            ["", "naive (influences per block)", fmt_s(r.naive.seconds), "1.00x", ratio(r.naive.seconds, r.floor),
             r.agreement["naive"], mib(r.naive.peak_rss)],
        ]
    print_table(
        f"Calculators: {len(pb.x_test):,} test x {len(pb.x):,} train points, {pb.n_test_chunks} test x "
        f"{pb.n_train_chunks} train chunks ({pb.test_chunk} x {pb.train_chunk})",
        ["method", "scheme", "time", "/ naive", "/ floor", "rel. diff to dask", "worker peak RSS MiB"],
        rows,
    )
    for r in results:
        if r.name.startswith("Cg"):
            factor_time = max(r.sequential - r.floor, 0.0)
            print(f"{r.name}: implied solve time (sequential - floor) ~ {fmt_s(factor_time)}; "
                  f"floor ~ {fmt_s(r.floor)}; naive/ours can reach at most ~{pb.n_train_chunks}x, "
                  f"and only as the solves dominate the floor.")


def print_goals(results: Sequence[MethodResult], pb: Problem) -> None:
    rows = []
    for r in results:
        if r.name.startswith("Cg"):
            speedup = r.naive.seconds / r.dask.seconds
            met = speedup >= 5 and pb.n_train_chunks >= 8
            rows.append([f"{r.name}: dask >= 5x faster than naive at >= 8 train chunks",
                         f"{speedup:.2f}x at {pb.n_train_chunks} chunks", "MET" if met else "NOT MET"])
        if r.name.startswith("Arnoldi"):
            over = r.dask.seconds / r.floor
            rows.append([f"{r.name}: dask within 1.5x of the floor", f"{over:.2f}x", "MET" if over <= 1.5 else "NOT MET"])
            over_s = r.sequential / r.floor
            rows.append([f"{r.name}: sequential within 1.5x of the floor (for reference)", f"{over_s:.2f}x",
                         "MET" if over_s <= 1.5 else "NOT MET"])
    print_table("Design goals", ["goal", "measured", "verdict"], rows)


def bench_memory(client: Client, model: InfluenceFunctionModel, pb: Problem, factor: int) -> None:
    """Worker peak RSS of to_zarr at n_train and factor x n_train (same chunks)."""
    rows = []
    for mult in (1, factor):
        n = mult * len(pb.x)
        x, y = make_data(n, seed=7)
        print(f"[memory] to_zarr with {n:,} training points ...", flush=True)
        run = on_cluster(client, lambda: to_zarr_run(client, model, pb, x, y))
        rows.append([f"{n:,}", f"{-(-n // pb.train_chunk)}", fmt_s(run.seconds), mib(run.start_rss), mib(run.peak_rss),
                     f"{max(run.peak_rss) / 2**20:,.0f}"])
    print_table(
        f"Worker memory, {type(model).__name__}, DaskInfluenceCalculator.to_zarr (full matrix) with "
        f"{len(pb.x_test):,} test points, chunks {pb.test_chunk} x {pb.train_chunk}: RSS per worker (MiB)",
        ["n_train", "train chunks", "time", "RSS at start", "peak RSS", "max peak"],
        rows,
    )
    a, b = (float(r[-1].replace(",", "")) for r in rows)
    print(f"peak grows {b / a:.2f}x for {factor}x the training points "
          f"({'bounded by chunk sizes' if b / a < 1.25 else 'NOT bounded: grows with n_train'})")


# ------------------------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of ~20 s")
    ap.add_argument("--p", type=int, default=100_000, help="approximate parameter count of the MLP")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=1_000)
    ap.add_argument("--train-chunks", type=int, default=8, help="number of train chunks (>= 8 for the CG goal)")
    ap.add_argument("--test-chunks", type=int, default=2)
    ap.add_argument("--n-fit", type=int, default=256, help="training points the methods are fitted on")
    ap.add_argument("--cg-maxiter", type=int, default=3)
    ap.add_argument("--cg-rtol", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--cg-repeats", type=int, default=1, help="best-of runs per CG scheme (each is costly)")
    ap.add_argument("--arnoldi-repeats", type=int, default=2, help="best-of runs per Arnoldi scheme")
    ap.add_argument("--memory-factor", type=int, default=4, help="memory run at n_train and this x n_train")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--methods", default="cg,arnoldi", help="comma-separated subset of cg,arnoldi")
    args = ap.parse_args(argv)
    if args.quick:
        args.p, args.n_train, args.n_test, args.n_fit, args.rank = 5_000, 2_000, 100, 64, 5
    start_all = time.perf_counter()
    model_net = make_mlp(args.p)
    x_all, y_all = make_data(args.n_train + args.n_test)
    pb = Problem(x_all[args.n_train :], y_all[args.n_train :], x_all[: args.n_train], y_all[: args.n_train],
                 test_chunk=-(-args.n_test // args.test_chunks), train_chunk=-(-args.n_train // args.train_chunks))
    fit_loader = loader(pb.x[: args.n_fit], pb.y[: args.n_fit], min(256, args.n_fit))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads here; MLP p={n_parameters(model_net):,}; "
          f"{args.n_test:,} test x {args.n_train:,} train; fit on {args.n_fit} points", flush=True)

    methods: dict[str, Callable[[], InfluenceFunctionModel]] = {
        "cg": lambda: CgInfluence(model_net, LOSS, 0.01, rtol=args.cg_rtol, atol=1e-8, maxiter=args.cg_maxiter,
                                  warn_on_max_iteration=False, second_order_mode=GN),
        "arnoldi": lambda: ArnoldiInfluence(model_net, LOSS, 0.01, rank=args.rank, tol=1e-4, max_iter=60,
                                            second_order_mode=GN),
    }
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    fitted: dict[str, InfluenceFunctionModel] = {}
    for m in chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model, t_fit = timed(lambda: methods[m]().fit(fit_loader))
        fitted[m] = model
        print(f"fitted {type(model).__name__} in {fmt_s(t_fit)}", flush=True)

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           env=dict(WORKER_ENV), silence_logs=40)
    client = Client(cluster)
    try:
        results = []
        for m in chosen:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                repeats = args.cg_repeats if m == "cg" else args.arnoldi_repeats
                results.append(bench_method(type(fitted[m]).__name__, fitted[m], pb, client, repeats))
        print_method_table(results, pb)
        print_goals(results, pb)
        if not args.skip_memory and "arnoldi" in fitted:
            bench_memory(client, fitted["arnoldi"], pb, args.memory_factor)
    finally:
        client.close()
        cluster.close()
    print(f"\ntotal wall time {fmt_s(time.perf_counter() - start_all)}")


if __name__ == "__main__":
    main()
