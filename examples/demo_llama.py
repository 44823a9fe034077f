"""The main job: compile a small Llama into alpha=2 CompNodes and a 2x2 grid of AttnNodes,
show the Plan, and show the result is exact against the unmodified model
(`fxdisagg.demo`; also ``fxdisagg demo``)."""

import argparse

from fxdisagg.demo import run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--alpha", type=int, default=2)
    ap.add_argument("--beta", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--launch", default=None, help="spawn (default), inprocess or torchrun")
    ap.add_argument("--dump-dir", default=None)
    args = ap.parse_args()
    return run(args.alpha, args.beta, args.tokens, args.launch, args.dump_dir)


if __name__ == "__main__":
    raise SystemExit(main())
