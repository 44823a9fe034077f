"""The main job, as `make demo` and `fxdisagg demo` run it: compile a small Llama into
alpha CompNodes and a beta x beta grid of AttnNodes, show the Plan and the bytes each
layer moves (measured beside the schedule's prediction), and show the result is exact
against the unmodified model at several lengths (fp32 goal 1e-4)."""

from __future__ import annotations

import time

import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


def run(alpha: int = 2, beta: int = 2, tokens: int = 256, launch: str | None = None,
        dump_dir=None) -> int:
    model = tiny_model("llama", layers=4, hidden=256, heads=8, kv_heads=4, vocab=1024)
    kw = inputs("llama", 1, tokens, vocab=1024)
    with fxdisagg.compile(model, alpha, beta, example_inputs=kw, launch=launch,
                          dump_dir=dump_dir) as dm:
        dm(**kw)  # warm-up: starts workers
        t0 = time.perf_counter()
        out = dm(**kw)
        dt = time.perf_counter() - t0
        cfg = model.config
        expected = dm.expected_traffic(tokens, batch=1)
        print(dm.plan.summary(traffic=expected[0],
                              ring=dict(batch=1, kv_heads=cfg.num_key_value_heads, elem_bytes=4,
                                        head_dim=cfg.hidden_size // cfg.num_attention_heads)))
        for layer, moved in sorted(dm.traffic.items())[:2]:
            print(f"  measured layer {layer}: dispatch {moved['dispatch']:,}  return {moved['return']:,} bytes"
                  f" ({'equal to' if moved == expected[layer] else 'DIFFERENT from'} the prediction)")
        err = rel_error(out.logits, reference(model, kw), kw)
        print(f"launch={dm.launch}: max |ours - model| / max |model| = {err:.2e} (fp32 goal 1e-4)")
        print(f"time per forward: {dt * 1e3:.1f} ms for {tokens} tokens")
        for n in (1, 7, 129):
            kw_n = inputs("llama", 1, n, vocab=1024)
            print(f"  N={n:4d}: error {rel_error(dm(**kw_n).logits, reference(model, kw_n), kw_n):.2e}")
    if err > 1e-4:
        raise SystemExit("not exact")
    return 0

