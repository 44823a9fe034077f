"""Pass pipeline time on a 32-layer Llama-like graph (hidden 256) beside its export time.

Goal: the passes (find_attention .. lower) take <= 1 s. Export is what
torch.export costs anyway; the ratio says what fxdisagg adds on top of it.
"""

import argparse
import statistics
import time

from fxdisagg.api import PASSES
from fxdisagg.capture import capture
from fxdisagg.config import Config
from fxdisagg.passes.lower import lower
from fxdisagg.pipeline import PassContext, run_passes
from fxdisagg.testing import inputs, tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = tiny_model("llama", layers=args.layers, hidden=256, heads=8, kv_heads=4, vocab=1024)
    kw = inputs("llama", 1, 64, vocab=1024)
    export_s, passes_s, per_pass = [], [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cap = capture(model, kw, max_len=4096)
        captured_nodes = len(cap.gm.graph.nodes)     # the passes rewrite the graph in place
        t1 = time.perf_counter()
        ctx = PassContext(seq=cap.seq, config=Config(alpha=2, beta=2))
        gm = run_passes(cap.gm, PASSES, ctx)
        t_lower = time.perf_counter()
        lower(gm, ctx)
        t2 = time.perf_counter()
        ctx.timings["lower"] = t2 - t_lower
        export_s.append(t1 - t0)
        passes_s.append(t2 - t1)
        for k, v in ctx.timings.items():
            per_pass.setdefault(k, []).append(v)
    e, p = statistics.median(export_s), statistics.median(passes_s)
    print(f"{args.layers}-layer Llama (hidden 256), {captured_nodes} nodes, median of {args.repeats}")
    print(f"  export:  {e:.3f} s")
    print(f"  passes:  {p:.3f} s  (goal <= 1 s)   passes/export = {p / e:.2f}x")
    for k, v in per_pass.items():
        print(f"    {k:20s} {statistics.median(v) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
