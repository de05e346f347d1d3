"""A DaskInfluenceCalculator.to_zarr run in a process of its own, for test_resume.py to SIGKILL
part-way (a real crash: the client and its whole LocalCluster die together).

    python resume_run.py URL [--test-chunk 4] [--train-chunk 7] [--delay 0.3] [--seed 0]
                             [--storage-options JSON] [--columns-in-flight N] [--wait-for-go]

Starts a LocalCluster of 2 single-threaded worker processes (they inherit this process's
environment and process group) and writes make_problem("direct", seed=...) with every output
(full matrix, top-3, mean values). The converter sleeps `delay` seconds per chunk it converts
back to numpy (each test-factor chunk and each block), so the store fills slowly; the
converter is not part of what the store records, so a resume may use a plain
TorchNumpyConverter. Prints "workers PID PID" once the cluster is up ("ready" too, and then
waits for a line on stdin, with --wait-for-go), one "progress DONE TOTAL" line per finished
block and "complete" at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from kinfluence.compute import TorchNumpyConverter
from torch import Tensor

#: what the test writes with: every output of the store
TOP_K, VALUES = 3, "mean"


class SlowConverter(TorchNumpyConverter):
    """TorchNumpyConverter that sleeps before handing back each result chunk (runs on workers;
    defined in __main__, so dask ships it by value)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def to_numpy(self, x: Tensor) -> np.ndarray:
        time.sleep(self.delay)
        return super().to_numpy(x)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--test-chunk", type=int, default=4)
    parser.add_argument("--train-chunk", type=int, default=7)
    parser.add_argument("--delay", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage-options", default="{}")
    parser.add_argument("--columns-in-flight", type=int, default=None)
    parser.add_argument("--wait-for-go", action="store_true", help="start writing only once stdin gives a line")
    args = parser.parse_args(argv)

    from compute_problems import make_problem
    from distributed import Client, LocalCluster
    from kinfluence.compute import DaskInfluenceCalculator, OutputSelection

    p = make_problem("direct", seed=args.seed)
    env = {k: os.environ[k] for k in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                      "STORAGE_EMULATOR_HOST") if k in os.environ}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", env=env,
                      silence_logs=40) as cluster, Client(cluster) as client:
        print("workers", " ".join(str(pid) for pid in client.run(os.getpid).values()), flush=True)
        calc = DaskInfluenceCalculator(p.model, SlowConverter(args.delay), client)
        if args.wait_for_go:
            print("ready", flush=True)
            sys.stdin.readline()
        summary = calc.to_zarr(
            *p.dask_arrays(args.test_chunk, args.train_chunk), args.url,
            outputs=OutputSelection(full_matrix=True, top_k=TOP_K, values=VALUES),
            storage_options=json.loads(args.storage_options), resume=True,
            on_progress=lambda done, total: print("progress", done, total, flush=True),
            max_columns_in_flight=args.columns_in_flight,
        )
        print("complete", summary.run_id, summary.computed_blocks, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
