"""CPU cost of disaggregated attention versus one fused causal SDPA.

Measures, side by side in one run, for each beta:
  - fused:   `F.scaled_dot_product_attention(q, k, v, is_causal=True)` over the full sequence;
  - sharded: beta x beta R-sharded tiles, `partial_attention` (torch backend) per tile, then
             one `expsum_merge` per query shard, fed the beta partials as a list (as a
             receiver of separate messages holds them; no stacking copy);
  - the same tiles with logit soft-capping, which the CPU flash kernel lacks: the torch
    backend's exact dense path, reported as a ratio to the flash tiles;
  - the same tiles with ALiBi (Bloom's slopes): the flash kernel with a per-head additive
    mask that carries the bias, reported as a ratio to the flash tiles.
Shard tensors are made once, outside the timed region, like the tensors an AttnNode
receives. Everything runs twice: on this process's intra-op threads, and on one thread, as
an AttnNode runs whenever AttnNodes outnumber the cores (the torch backend cuts 128..1024-row
causal tiles into row blocks only then: `kernels/torch_cpu.row_blocked`). Repeats are interleaved (fused, sharded, fused, ...) and medians compared, so
that load from other processes affects both alike.

Usage: python benchmarks/attention_cpu.py [--quick] [--n N] [--repeats R] [--betas 2 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fxdisagg.kernels import expsum_merge, partial_attention
from fxdisagg.runtime.heap import keep_freed_memory


def make_shards(q, k, v, beta):
    """R-sharding: token t goes to shard t % beta. Returns per-shard (x, positions)."""
    n = q.shape[2]
    pos = torch.arange(n)
    shard = lambda x, i: x[:, :, i::beta].contiguous()  # [B, H, ~N/beta, D]
    qs = [(shard(q, i), pos[i::beta].contiguous()) for i in range(beta)]
    kvs = [(shard(k, j), shard(v, j), pos[j::beta].contiguous()) for j in range(beta)]
    return qs, kvs


def run_tiles(qs, kvs, softcap=None, alibi=None):
    """The beta^2 AttnNode tiles: partial attention of every query shard over every key
    shard (``softcap``: Gemma 2's logit soft-capping, which takes the exact dense path;
    ``alibi``: per-head slopes, carried in a per-head additive mask)."""
    return [
        [partial_attention(q_i, k_j, v_j, qpos_i, kpos_j, causal=True, backend="torch",
                           softcap=softcap, alibi=alibi)
         for k_j, v_j, kpos_j in kvs]
        for q_i, qpos_i in qs
    ]


def merge_all(parts):
    """The query owners' expsum-merges: one per query shard, over its beta partials."""
    return [
        expsum_merge([o for o, _ in row], [l for _, l in row], backend="torch") for row in parts
    ]


def run_sharded(qs, kvs):
    """All beta^2 tiles, then the merge of each query shard: the AttnNode + merge work."""
    return merge_all(run_tiles(qs, kvs))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(n: int, heads: int, dim: int, beta: int, repeats: int) -> dict[str, float]:
    """Median seconds of fused, sharded (tiles + merges) and tiles alone, measured interleaved."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))  # [B, H, N, D]
    qs, kvs = make_shards(q, k, v, beta)
    runs = {
        "fused": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sharded": lambda: run_sharded(qs, kvs),
        "tiles": lambda: run_tiles(qs, kvs),
        "tiles_softcap": lambda: run_tiles(qs, kvs, softcap=50.0),
        "tiles_alibi": lambda: run_tiles(qs, kvs, alibi=[2.0 ** (-8 * (h + 1) / heads)
                                                          for h in range(heads)]),
    }
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1024, 5 repeats")
    parser.add_argument("--n", type=int, default=None, help="sequence length (default 4096)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--betas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is: by default freed tensor memory stays in the "
                             "process, as in a spawned AttnNode (fxdisagg.runtime.heap)")
    args = parser.parse_args()
    tuned = False if args.default_malloc else keep_freed_memory()
    n = args.n or (1024 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 11)
    print(f"N={n} H={args.heads} D={args.dim} B=1 fp32, threads={torch.get_num_threads()}, "
          f"repeats={repeats} (medians), glibc malloc tuned={tuned}")
    goals = {2: 1.15, 4: 1.3}
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        torch.set_num_threads(threads)
        print(f"{threads} thread(s):")
        for beta in args.betas:
            t = bench(n, args.heads, args.dim, beta, repeats)
            goal = f" (goal <= {goals[beta]})" if beta in goals else ""
            print(f"  beta={beta}: fused {t['fused'] * 1e3:8.2f} ms   sharded {t['sharded'] * 1e3:8.2f} ms   "
                  f"ratio {t['sharded'] / t['fused']:.3f}{goal}   "
                  f"[tiles alone {t['tiles'] / t['fused']:.3f}, merges {(t['sharded'] - t['tiles']) * 1e3:.2f} ms]")
            print(f"          soft-capped tiles (dense exact path) {t['tiles_softcap'] / t['tiles']:.2f}x, "
                  f"ALiBi tiles (per-head mask) {t['tiles_alibi'] / t['tiles']:.2f}x the flash tiles")


if __name__ == "__main__":
    main()
