"""Decode steps over processes versus HF eager with its own KV cache in one process.

A mid-size Llama (hidden 512, 8 layers, 8 query heads, 4 kv heads, fp32), batch 4, a
prompt of ``--ctx`` tokens (2048) with left padding on one row:
  - HF: the unmodified model with its DynamicCache, in this process;
  - fxdisagg (alpha, beta) = (1, 2) by default: one CompNode and four AttnNodes, spawned
    processes, the cache spread over the AttnNodes (split-KV decode: every AttnNode attends
    the new query to its quarter of the cache, the CompNode merges four partials).
Both are prefilled, then decode steps alternate (HF step, fxdisagg step, ...) so load from
other processes affects both alike; the medians are compared. Each timed step starts after
a pause of `SETTLE` seconds: HF's step leaves this process's OpenMP threads spinning in
libgomp's active wait for a while, and that spinning took 4-6 ms of CPU from the workers'
two cores during the fxdisagg step that followed (the driver's CPU per step fell from
~9 ms to ~2 ms with the pause); the pause is before both steps, so each starts alike.
Each fxdisagg step's logits are checked against HF's. Printed beside it: the bytes of one decode step per layer,
measured by the transports and predicted by the schedule, and the KV-cache bytes each
AttnNode holds (measured in the workers) with their max/mean.
Goal (issue 8): fxdisagg step / HF step <= 1.5 on this CPU.

Usage: python benchmarks/decode_cpu.py [--quick] [--ctx N] [--steps S] [--alpha A] [--beta B]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxdisagg
from fxdisagg.testing import tiny_model

SETTLE = 0.02      # seconds before each timed step (see the module docstring)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="ctx 256, 8 steps")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--alpha", type=int, default=1)
    ap.add_argument("--beta", type=int, default=2)
    args = ap.parse_args()
    ctx, steps = (256, 8) if args.quick else (args.ctx, args.steps)
    b, vocab = args.batch, 1024

    model = tiny_model("llama", layers=8, hidden=512, heads=8, kv_heads=4, vocab=vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, ctx), generator=g)
    mask = torch.ones(b, ctx, dtype=torch.long)
    mask[-1, : ctx // 8] = 0
    dm = fxdisagg.compile(model, args.alpha, args.beta, launch="spawn", timeout=600,
                          max_len=ctx + steps + 8)
    with torch.no_grad(), dm:
        hf = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = dm.new_cache(batch=b)
        ours = dm(input_ids=ids, attention_mask=mask, cache=cache)
        print(f"prefill: rel error of last logits {_rel(ours.logits[:, -1], hf.logits[:, -1]):.1e}")
        hf_cache, t_hf, t_ours, worst = hf.cache, [], [], 0.0
        nxt = hf.logits[:, -1].argmax(-1, keepdim=True)
        for s in range(steps):
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            time.sleep(SETTLE)
            t0 = time.perf_counter()
            hf = model(input_ids=nxt, attention_mask=mask, cache=hf_cache, use_cache=True)
            t_hf.append(time.perf_counter() - t0)
            time.sleep(SETTLE)
            t0 = time.perf_counter()
            ours = dm(input_ids=nxt, attention_mask=mask, cache=cache)
            t_ours.append(time.perf_counter() - t0)
            worst = max(worst, _rel(ours.logits[:, -1], hf.logits[:, -1]))
            hf_cache, nxt = hf.cache, hf.logits[:, -1].argmax(-1, keepdim=True)
        past = ctx + steps - 1
        measured, predicted = dm.traffic, dm.expected_traffic(1, batch=b, past=past)
        memory = dm.memory
    m_hf, m_ours = statistics.median(t_hf), statistics.median(t_ours)
    print(f"decode at context {ctx}, batch {b}, {steps} steps; (alpha, beta) = "
          f"({args.alpha}, {args.beta}); worst rel error of step logits {worst:.1e}")
    print(f"  HF eager + DynamicCache : {m_hf * 1e3:8.2f} ms/step")
    print(f"  fxdisagg spawn          : {m_ours * 1e3:8.2f} ms/step   ratio {m_ours / m_hf:.2f}x"
          f"  (goal <= 1.5x)")
    print("  bytes of one decode step per layer (measured = predicted):")
    for layer in sorted(measured):
        m, p = measured[layer], predicted[layer]
        print(f"    layer {layer}: dispatch {m['dispatch']:>8,} ({p['dispatch']:,})  "
              f"return {m['return']:>8,} ({p['return']:,})  {'ok' if m == p else 'DIFFERS'}")
    kv = {r: v["kv_cache"] for r, v in memory.items() if v["params"] == 0}
    mean = sum(kv.values()) / len(kv)
    print("  KV-cache bytes per AttnNode: " + ", ".join(f"rank {r}: {v:,}" for r, v in kv.items())
          + f"   max/mean {max(kv.values()) / mean:.4f}")


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


if __name__ == "__main__":
    main()
