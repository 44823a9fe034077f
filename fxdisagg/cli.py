"""``fxdisagg`` command line.

    fxdisagg demo [--alpha 2 --beta 2 --tokens 256 --launch spawn|inprocess]
    fxdisagg plan --tokens 12 --alpha 2 --beta 2 [--sharding r] [--dump-dir DIR]
    fxdisagg plan --seq N --devices D --hw h100|h200 [--model NAME|PATH]
    fxdisagg explain --model NAME|PATH [--alpha A --beta B --tokens N --batch B]
    fxdisagg dump --model NAME|PATH --alpha A --beta B --out DIR [--tokens N --batch B]

NAME is one of the tested HF families built from a small config with a fixed seed
(`fxdisagg.testing.tiny_model`: llama, gpt2, bert, mistral, qwen2, bloom, gpt_neo,
xglm); PATH is a local HF checkpoint directory (``save_pretrained``). Steps that take
time (loading, capture and passes) say so on stderr as they start and how long they took.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from fxdisagg.errors import FxDisaggError
from fxdisagg.plan import STRATEGIES, Plan


@contextlib.contextmanager
def _step(what: str):
    print(f"{what} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    yield
    print(f"{what}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)


def load_model(name_or_path: str):
    """A tested family by name, or a local HF checkpoint directory."""
    from fxdisagg.testing import FAMILIES, tiny_model
    if name_or_path in FAMILIES:
        return tiny_model(name_or_path)
    if not os.path.isdir(name_or_path):
        raise SystemExit(f"--model {name_or_path!r}: neither a family ({', '.join(FAMILIES)}) "
                         f"nor a checkpoint directory")
    import transformers as tf
    config = tf.AutoConfig.from_pretrained(name_or_path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    return auto.from_pretrained(name_or_path, attn_implementation="sdpa").eval()


def _example(model, tokens: int, batch: int) -> dict:
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}


def _compile(args, dump_dir=None):
    import fxdisagg
    with _step(f"loading {args.model}"):
        model = load_model(args.model)
    with _step("capture, passes and lowering"):
        return fxdisagg.compile(model, args.alpha, args.beta, launch="inprocess",
                                example_inputs=_example(model, args.tokens, args.batch),
                                dump_dir=dump_dir)


def _plan(args) -> int:
    if args.devices is not None:
        return _cost_table(args)
    plan = Plan.build(args.tokens, args.alpha, args.beta, args.sharding)
    print(plan.summary())
    if args.dump_dir:
        from fxdisagg.dump import Dumper
        Dumper(args.dump_dir).plan(plan)
        print(f"wrote {args.dump_dir}/plan.json and plan.dot (plan.svg where graphviz is installed)")
    return 0


def _demo(args) -> int:
    from fxdisagg.demo import run
    return run(args.alpha, args.beta, args.tokens, args.launch)


def _cost_table(args) -> int:
    """The cost model's table for a prefill of --seq tokens on --devices GPUs."""
    from fxdisagg import cost
    shape = cost.LLAMA3_8B
    if args.model:
        with _step(f"loading {args.model}"):
            shape = cost.ModelShape.of(load_model(args.model).config)
    print(cost.table(shape, cost.HARDWARE[args.hw], args.tokens, args.devices))
    return 0


def _explain(args) -> int:
    try:
        dm = _compile(args)
    except FxDisaggError as e:
        print(f"refused: {type(e).__name__}: {e}")
        return 1
    print(dm.explain(args.tokens))
    return 0


def _dump(args) -> int:
    try:
        dm = _compile(args, dump_dir=args.out)
    except FxDisaggError as e:
        print(f"refused: {type(e).__name__}: {e}")
        return 1
    print(f"wrote {dm.compiled.dump_dir}: passes, role programs, stage_*.dot, roles and plan "
          f"(.dot, and .svg where graphviz is installed)")
    return 0


def _model_args(p, with_out: bool = False) -> None:
    p.add_argument("--model", required=True, help="family name or HF checkpoint directory")
    p.add_argument("--alpha", type=int, default=2)
    p.add_argument("--beta", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="example length (the Plan's N)")
    p.add_argument("--batch", type=int, default=1)
    if with_out:
        p.add_argument("--out", required=True, help="directory for the dumps")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fxdisagg", description="fxdisagg tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="compile a small Llama, show its Plan, bytes and exactness")
    p.add_argument("--alpha", type=int, default=2)
    p.add_argument("--beta", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--launch", default=None, help="spawn (default), inprocess or torchrun")
    p.set_defaults(run=_demo)
    p = sub.add_parser("plan", help="print a Plan (token placement, work, bytes) and draw it")
    p.add_argument("--tokens", "--seq", type=int, required=True, dest="tokens")
    p.add_argument("--alpha", type=int, default=1)
    p.add_argument("--beta", type=int, default=1)
    p.add_argument("--sharding", choices=STRATEGIES, default="r")
    p.add_argument("--dump-dir", default=None, help="write plan.json, plan.dot and plan.svg here")
    p.add_argument("--devices", type=int, default=None,
                   help="instead: the cost model's table for this many GPUs and the grid it picks")
    p.add_argument("--hw", choices=("h100", "h200"), default="h100")
    p.add_argument("--model", default=None, help="family or checkpoint whose shape to cost "
                                                 "(default: Llama-3-8B's)")
    p.set_defaults(run=_plan)
    p = sub.add_parser("explain", help="attention sites, masks, where ops run, Plan, bytes and work")
    _model_args(p)
    p.set_defaults(run=_explain)
    p = sub.add_parser("dump", help="write every pass, the role programs and the pictures")
    _model_args(p, with_out=True)
    p.set_defaults(run=_dump)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
