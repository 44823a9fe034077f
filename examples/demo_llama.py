"""The main job: compile a small Llama into alpha=2 CompNodes and a 2x2 grid of AttnNodes,
show the Plan, and show the result is exact against the unmodified model."""

import argparse
import time

import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--alpha", type=int, default=2)
    ap.add_argument("--beta", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--launch", default=None, help="spawn (default), inprocess or torchrun")
    ap.add_argument("--dump-dir", default=None)
    args = ap.parse_args()

    model = tiny_model("llama", layers=4, hidden=256, heads=8, kv_heads=4, vocab=1024)
    kw = inputs("llama", 1, args.tokens, vocab=1024)
    with fxdisagg.compile(model, args.alpha, args.beta, example_inputs=kw, launch=args.launch,
                          dump_dir=args.dump_dir) as dm:
        dm(**kw)  # warm-up: starts workers
        t0 = time.perf_counter()
        out = dm(**kw)
        dt = time.perf_counter() - t0
        cfg = model.config
        expected = dm.expected_traffic(args.tokens, batch=1)
        print(dm.plan.summary(traffic=expected[0],
                              ring=dict(batch=1, kv_heads=cfg.num_key_value_heads, elem_bytes=4,
                                        head_dim=cfg.hidden_size // cfg.num_attention_heads)))
        for layer, moved in sorted(dm.traffic.items())[:2]:
            print(f"  measured layer {layer}: dispatch {moved['dispatch']:,}  return {moved['return']:,} bytes"
                  f" ({'equal to' if moved == expected[layer] else 'DIFFERENT from'} the prediction)")
        err = rel_error(out.logits, reference(model, kw), kw)
        print(f"launch={dm.launch}: max |ours - model| / max |model| = {err:.2e} (fp32 goal 1e-4)")
        print(f"time per forward: {dt * 1e3:.1f} ms for {args.tokens} tokens")
        for n in (1, 7, 129):
            kw_n = inputs("llama", 1, n, vocab=1024)
            print(f"  N={n:4d}: error {rel_error(dm(**kw_n).logits, reference(model, kw_n), kw_n):.2e}")
    if err > 1e-4:
        raise SystemExit("not exact")


if __name__ == "__main__":
    main()
