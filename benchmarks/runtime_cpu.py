"""Overhead of the distributed runtime over processes versus the eager model in one process.

A mid-size Llama (hidden 512, 8 layers, 8 heads, fp32) at N tokens, batch 1:
  - eager:  the unmodified HF model in this process;
  - captured: the graph torch.export captured, run as it is in this process (no
            disaggregation): what the CompNode and AttnNode programs are cut from. Under
            export HF builds the dense [N, N] mask it skips in eager mode, so this column
            puts the cost of the capture beside the cost of the runtime;
  - (1, 1): one CompNode + one AttnNode process (launch="spawn": payloads through shared
            memory, headers and doorbells too, four exchanges per layer, inputs and
            frontier through the driver channel), with no parallelism to hide the runtime;
  - (2, 2): two CompNodes and four AttnNodes, beside it for scale (on a machine with fewer
            cores than workers it measures contention, not speed-up);
  - (1, tp=2, 1): one CompNode split over two tensor-parallel ranks and one AttnNode; its
            all-reduce bytes per layer, measured, are printed beside the ring all-reduce
            formula 2 (tp - 1) / tp x tokens x hidden x element size per rank and all-reduce.
Workers start before timing (first call); repeats are interleaved (eager, (1,1), (2,2), ...)
and medians compared, so load from other processes affects all alike. Beside the wall
time it prints the CPU time of each call, every process together (this one and the
workers, from /proc): on this machine eager's own wall time moved by +-10% between runs
(its two OpenMP threads), which moves every wall ratio with it, while the CPU a call takes
barely moves, so the CPU ratio says what the runtime costs in work.
Goals (issue 7): (1,1)/eager <= 1.10, (2,2)/eager <= 1.15.

Usage: python benchmarks/runtime_cpu.py [--quick] [--n N] [--repeats R] [--no-22] [--no-tp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fxdisagg
from fxdisagg.capture import capture
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


SETTLE = 0.05      # seconds before each timed call


def timed(fn, pids=()) -> tuple[float, float]:
    """Wall seconds of ``fn()`` and the CPU seconds it took in this process and ``pids``,
    after a pause of `SETTLE`: a call run in this process (eager, captured) leaves its
    OpenMP threads spinning in libgomp's active wait for a while, on the cores the next
    call's workers need (see benchmarks/decode_cpu.py); every column starts alike."""
    time.sleep(SETTLE)
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds(pids) - c0


def cpu_seconds(pids) -> float:
    """CPU time so far of this process (all threads) and of ``pids`` (Linux /proc; clock
    ticks, 10 ms, against calls of ~1 s)."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N=256, 3 repeats")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-22", action="store_true", help="skip the (2, 2) column")
    ap.add_argument("--no-tp", action="store_true", help="skip the (1, tp=2, 1) column")
    args = ap.parse_args()
    n, repeats = (256, 3) if args.quick else (args.n, args.repeats)

    model = tiny_model("llama", layers=8, hidden=512, heads=8, kv_heads=8, vocab=1024)
    kw = inputs("llama", 1, n, vocab=1024)
    grids = [(1, 1, 1)] + ([] if args.no_22 else [(2, 1, 2)]) + ([] if args.no_tp else [(1, 2, 1)])
    dms = {g: fxdisagg.compile(model, g[0], g[2], tp=g[1], launch="spawn", timeout=600,
                               example_inputs=inputs("llama", 1, 16, vocab=1024),
                               max_len=max(n, 4096)) for g in grids}
    try:
        ref = reference(model, kw)
        for g, dm in dms.items():                          # start workers, check numbers
            err = rel_error(dm(**kw)[0], ref, kw)
            print(f"{g}: rel error vs eager {err:.1e}")
        captured = capture(model, inputs("llama", 1, 16, vocab=1024), max_len=max(n, 4096)).gm
        times = {"eager": [], "captured": []} | {g: [] for g in grids}
        for _ in range(repeats):
            times["eager"].append(timed(lambda: reference(model, kw)))
            with torch.no_grad():
                times["captured"].append(timed(lambda: captured(kw["input_ids"])))
            for g, dm in dms.items():
                times[g].append(timed(lambda dm=dm: dm(**kw), dm.runtime.pids))
        med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        print(f"N={n}, hidden 512, 8 layers, 8 heads, fp32, {torch.get_num_threads()} threads, "
              f"{repeats} interleaved repeats (median):")
        print(f"  eager            {med['eager'] * 1e3:9.1f} ms   CPU {cpu['eager']:.2f} s")
        print(f"  captured         {med['captured'] * 1e3:9.1f} ms   ratio {med['captured'] / med['eager']:.2f}x")
        for g in grids:
            print(f"  alpha,tp,beta={g}  {med[g] * 1e3:9.1f} ms   ratio {med[g] / med['eager']:.2f}x"
                  f"   vs captured {med[g] / med['captured']:.2f}x   CPU {cpu[g]:.2f} s = "
                  f"{cpu[g] / cpu['eager']:.2f}x eager's")
        if (1, 2, 1) in dms:
            all_reduce_bytes(dms[(1, 2, 1)], n, hidden=512, tp=2)
    finally:
        for dm in dms.values():
            dm.close()


def all_reduce_bytes(dm, n: int, hidden: int, tp: int) -> None:
    """Measured all-reduce bytes per layer (every rank, both all-reduces) and per rank and
    all-reduce, beside the ring formula."""
    ring = 2 * (tp - 1) / tp * n * hidden * 4
    print(f"  all-reduce bytes, tp={tp}: ring formula per rank and all-reduce {ring:,.0f}")
    for layer, t in sorted(dm.traffic.items()):
        per = t["all_reduce"] / (2 * tp)
        print(f"    layer {layer}: measured {t['all_reduce']:,} (2 all-reduces x {tp} ranks), "
              f"per rank and all-reduce {per:,.0f} = {per / ring:.2f}x the formula")


if __name__ == "__main__":
    main()
