"""A tiny Llama run disaggregated under torchrun (SPMD mode), on CPU (gloo) or GPUs (NCCL).

    python -m torch.distributed.run --standalone --nproc_per_node=5 \
        examples/torchrun_llama.py --alpha 1 --beta 2

Every rank runs this script, builds the same model (fixed seed) and calls it with
same-shaped inputs; WORLD_SIZE must be alpha + beta**2. Rank 0 is CompNode 0 and the
driver: its inputs are the ones used, and only it gets the outputs (others get None).
"""

import argparse

import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=int, default=1)
    ap.add_argument("--beta", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 7, 129])
    args = ap.parse_args()

    model = tiny_model("llama")                      # identical weights on every rank
    with fxdisagg.compile(model, args.alpha, args.beta, timeout=120) as dm:
        for n in args.lengths:
            kw = inputs("llama", 2, n)
            out = dm(**kw)
            if out is not None:                      # rank 0
                err = rel_error(out.logits, reference(model, kw), kw)
                same = dm.traffic == dm.expected_traffic(n, batch=2)
                print(f"N={n} max rel error {err:.2e}, traffic as the schedule predicts: {same}",
                      flush=True)


if __name__ == "__main__":
    main()
