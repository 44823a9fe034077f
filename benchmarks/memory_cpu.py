"""Flat memory over a long run: RSS of the driver and of every worker across many calls of
random length and batch size on the spawn runtime at (2, 2).

Per-length state (Plans, exchange schedules) lives in LRU caches of ``cache_size`` entries
in the driver and in every worker; captures are per batch size. After a warm-up (every
batch size captured, the caches full, the shared-memory segments at the size of the longest call), RSS should
stay flat: the goal is growth <= 5% from
the end of the warm-up to the last call.

Usage: python benchmarks/memory_cpu.py [--calls 1000] [--max-len 4000]
"""

from __future__ import annotations

import argparse
import random
import time

import fxdisagg
from fxdisagg.testing import inputs, tiny_model


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()
    rng = random.Random(0)
    import os
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 2, 2, launch="spawn", timeout=120, max_len=args.max_len)
    batches = (1, 2, 3)
    with dm:
        for b in batches:        # one capture per batch size; buffers at their largest size
            dm(**inputs("llama", b, 8))
            dm(**inputs("llama", b, args.max_len))
        t0, marks = time.perf_counter(), {}
        for k in range(args.calls):
            n, b = rng.randint(1, args.max_len), rng.choice(batches)
            dm(**inputs("llama", b, n, seed=k))
            if k + 1 >= args.warmup and (k + 1 - args.warmup) % ((args.calls - args.warmup) // 3) == 0:
                time.sleep(0.5)  # workers give freed memory back after they answer
                marks[k + 1] = [rss_mb(os.getpid())] + [rss_mb(p) for p in dm.runtime.pids]
        first, last = marks[args.warmup], marks[max(marks)]
        print(f"{args.calls} calls, N in [1, {args.max_len}], batch in {batches}, "
              f"{time.perf_counter() - t0:.0f} s; RSS (MB) after call " + " -> ".join(map(str, marks)))
        names = ["driver"] + [dm.runtime.layout.describe(r) for r in range(len(dm.runtime.pids))]
        for i, name in enumerate(names):
            trail = " -> ".join(f"{m[i]:6.1f}" for m in marks.values())
            growth = 100 * (last[i] - first[i]) / first[i]
            print(f"  {name:24s} {trail}   {growth:+5.1f}%  (goal <= +5%)")


if __name__ == "__main__":
    main()
