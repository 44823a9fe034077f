"""Throughput of one compiled model under 8 concurrent callers vs the same calls one by one.

Calls are served one at a time (the model's lock), so the two should match: the figure
shows what a caller pays for sharing, not a speed-up (batching concurrent calls into one
is future work). Spawn runtime at (2, 2), small Llama, random lengths in [16, 512].

Usage: python benchmarks/concurrent_cpu.py [--callers 8] [--calls-each 8]
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import fxdisagg
from fxdisagg.testing import inputs, tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--callers", type=int, default=8)
    ap.add_argument("--calls-each", type=int, default=8)
    args = ap.parse_args()
    rng = random.Random(0)
    lengths = [[rng.randint(16, 512) for _ in range(args.calls_each)] for _ in range(args.callers)]
    model = tiny_model("llama", layers=4, hidden=128)
    with fxdisagg.compile(model, 2, 2, example_inputs=inputs("llama", 1, 16), launch="spawn",
                          timeout=120) as dm:
        dm(**inputs("llama", 1, 16))
        t0 = time.perf_counter()
        for mine in lengths:
            for n in mine:
                dm(**inputs("llama", 1, n))
        sequential = time.perf_counter() - t0

        def caller(mine):
            for n in mine:
                dm(**inputs("llama", 1, n))

        threads = [threading.Thread(target=caller, args=(mine,)) for mine in lengths]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = time.perf_counter() - t0
    calls = args.callers * args.calls_each
    print(f"{calls} calls (N in [16, 512]) at (2, 2), spawn:")
    print(f"  one by one        {calls / sequential:7.1f} calls/s")
    print(f"  {args.callers} concurrent callers {calls / concurrent:6.1f} calls/s   "
          f"ratio {sequential / concurrent:.2f}")


if __name__ == "__main__":
    main()
