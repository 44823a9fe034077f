"""CPU cost of disaggregated attention versus one fused causal SDPA.

Measures, side by side in one run, for each beta:
  - fused:   `F.scaled_dot_product_attention(q, k, v, is_causal=True)` over the full sequence;
  - sharded: beta x beta R-sharded tiles, `partial_attention` (torch backend) per tile, then
             one `expsum_merge` per query shard (stacking the partials is included, as the
             merge needs them in one buffer).
Shard tensors are made once, outside the timed region, like the tensors an AttnNode
receives. Repeats are interleaved (fused, sharded, fused, ...) and medians compared, so
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


def make_shards(q, k, v, beta):
    """R-sharding: token t goes to shard t % beta. Returns per-shard (x, positions)."""
    n = q.shape[2]
    pos = torch.arange(n)
    shard = lambda x, i: x[:, :, i::beta].contiguous()  # [B, H, ~N/beta, D]
    qs = [(shard(q, i), pos[i::beta].contiguous()) for i in range(beta)]
    kvs = [(shard(k, j), shard(v, j), pos[j::beta].contiguous()) for j in range(beta)]
    return qs, kvs


def run_sharded(qs, kvs):
    """All beta^2 tiles, then the merge of each query shard: the AttnNode + merge work."""
    results = []
    for q_i, qpos_i in qs:
        parts = [
            partial_attention(q_i, k_j, v_j, qpos_i, kpos_j, causal=True, backend="torch")
            for k_j, v_j, kpos_j in kvs
        ]
        outs = torch.stack([o for o, _ in parts])  # [beta, B, H, Mq, D]
        lses = torch.stack([l for _, l in parts])  # [beta, B, H, Mq]
        results.append(expsum_merge(outs, lses, backend="torch"))
    return results


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(n: int, heads: int, dim: int, beta: int, repeats: int) -> tuple[float, float]:
    """Median seconds of (fused, sharded), measured interleaved."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))  # [B, H, N, D]
    qs, kvs = make_shards(q, k, v, beta)
    fused = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    sharded = lambda: run_sharded(qs, kvs)
    fused(), sharded()  # warm-up
    t_fused, t_sharded = [], []
    for _ in range(repeats):
        t_fused.append(timed(fused))
        t_sharded.append(timed(sharded))
    return statistics.median(t_fused), statistics.median(t_sharded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=1024, 5 repeats")
    parser.add_argument("--n", type=int, default=None, help="sequence length (default 4096)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--betas", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    n = args.n or (1024 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 11)
    print(f"N={n} H={args.heads} D={args.dim} B=1 fp32, threads={torch.get_num_threads()}, "
          f"repeats={repeats} (medians)")
    goals = {2: 1.15, 4: 1.3}
    for beta in args.betas:
        t_f, t_s = bench(n, args.heads, args.dim, beta, repeats)
        goal = f" (goal <= {goals[beta]})" if beta in goals else ""
        print(f"beta={beta}: fused {t_f * 1e3:8.2f} ms   sharded {t_s * 1e3:8.2f} ms   "
              f"ratio {t_s / t_f:.3f}{goal}")


if __name__ == "__main__":
    main()
