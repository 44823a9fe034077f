"""``fxdisagg`` command line: inspect a Plan without a model.

    fxdisagg plan --tokens 12 --alpha 2 --beta 2 [--sharding r] [--dump-dir DIR]
"""

from __future__ import annotations

import argparse

from fxdisagg.plan import STRATEGIES, Plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fxdisagg", description="fxdisagg tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="print a Plan (token placement, work, bytes) and draw it")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--alpha", type=int, default=1)
    p.add_argument("--beta", type=int, default=1)
    p.add_argument("--sharding", choices=STRATEGIES, default="r")
    p.add_argument("--dump-dir", default=None, help="write plan.json, plan.dot and plan.svg here")
    args = ap.parse_args(argv)
    plan = Plan.build(args.tokens, args.alpha, args.beta, args.sharding)
    print(plan.summary())
    if args.dump_dir:
        from fxdisagg.dump import Dumper
        Dumper(args.dump_dir).plan(plan)
        print(f"wrote {args.dump_dir}/plan.json and plan.dot (plan.svg where graphviz is installed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
