"""GPU benchmark of the Triton kernels against SDPA's flash backend.

    python benchmarks/attention_gpu.py [--head-dims 64 128] [--seqlens 1024 ... 32768]
                                       [--tokens 32768] [--betas 2 4] [--hidden 2048]
                                       [--decode [--decode-batch 8] [--group 4] [--window W]]

For each head dim D and sequence length N (batch B = tokens // N, so B*N stays constant;
H = hidden // D heads), in bf16:
- SDPA: `scaled_dot_product_attention(is_causal=True)` restricted to the flash backend;
- tile: our partial attention on one full causal tile (q_pos = k_pos = 0..N-1), i.e. what
  fxdisagg runs with beta = 1;
- grid beta: the beta x beta R-sharded tiles (q_pos = a*beta + i, k_pos = b*beta + j) run
  one after the other on this GPU, plus the beta merges. Deployed, each tile runs on its
  own AttnNode; here the sum measures the total work and the kernel efficiency on the
  strided triangles (the column "tile/AttnNode" is the mean time of one tile).
With --decode, one decode step instead (Mq = 1, the query at position N - 1 over a cache of
N tokens, GQA with Hq / Hkv = group, batch --decode-batch, optional sliding window), which
the Triton op runs on the decode kernel (`kernels/triton_decode.py`):
- SDPA over the whole cache (`enable_gqa`, a window as a bool mask);
- decode tile: our partial attention over the whole cache (beta = 1);
- decode grid beta: the beta**2 R-sharded cache slices (node a holds tokens t with
  t % beta**2 == a), one after the other, plus the merge of their beta**2 partials.
A decode step is bound by reading k/v: each row reports the k/v bytes the step must read
(the window's tokens only, if any) over its time, in GB/s.

Throughput uses the useful causal FLOPs of the whole problem, 2 * 2 * B*H*N*N*D / 2, for
every variant, so the ratios ours/SDPA compare time directly. The merge line reports the
achieved memory bandwidth of one merge of beta partials: bytes read (beta outputs + lses)
plus written (one output + lse) over time.

Without CUDA it prints a message and exits 0 (the kernels are tested on CPU under the
Triton interpreter instead: tests/test_triton_kernels.py).
"""

import argparse
import sys

import torch


def _flops(B, H, N, D):
    return 2 * 2 * B * H * N * N * D / 2


def _bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def _shards(N, beta, device):
    return [torch.arange(i, N, beta, device=device) for i in range(min(beta, N))]


def run_case(B, H, N, D, betas, dtype=torch.bfloat16):
    """Returns a list of (label, ms, TFLOP/s, extra) rows for one shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from fxdisagg.kernels import triton_backend as tb
    from fxdisagg.kernels.features import TileFeatures

    dev = "cuda"
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    scale = D ** -0.5
    pos = torch.arange(N, device=dev)
    flops = _flops(B, H, N, D)
    rows = []

    def sdpa_fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, is_causal=True, scale=scale)

    t_sdpa = _bench(sdpa_fn)
    rows.append(("sdpa flash", t_sdpa, flops / t_sdpa * 1e-9, ""))

    # Correctness on the way (bf16 vs SDPA): a broken kernel must not report a speed.
    out, _ = tb.partial_attention(q, k, v, TileFeatures(pos, pos, scale=scale, causal=True))
    err = (out.float() - sdpa_fn().float()).abs().max().item()
    t_tile = _bench(lambda: tb.partial_attention(q, k, v, TileFeatures(pos, pos, scale=scale,
                                                                       causal=True)))
    rows.append(("tile (beta=1)", t_tile, flops / t_tile * 1e-9,
                 f"ours/sdpa {t_sdpa / t_tile:.2f}x  max|err| {err:.1e}"))

    for beta in betas:
        shards = _shards(N, beta, dev)
        qs = [q[:, :, s].contiguous() for s in shards]
        ks = [k[:, :, s].contiguous() for s in shards]
        vs = [v[:, :, s].contiguous() for s in shards]

        def tiles():
            return [[tb.partial_attention(qs[i], ks[j], vs[j],
                                          TileFeatures(shards[i], shards[j], scale=scale, causal=True))
                     for j in range(len(shards))] for i in range(len(shards))]

        def stacked(parts):
            return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

        parts = tiles()
        inputs = [stacked(row) for row in parts]

        def grid():
            for row in tiles():
                tb.expsum_merge(*stacked(row))

        def merges():
            for outs, lses in inputs:
                tb.expsum_merge(outs, lses)

        t_grid = _bench(grid)
        t_tiles = _bench(lambda: tiles())
        t_merge = _bench(merges)
        rows.append((f"grid beta={beta} + merge", t_grid, flops / t_grid * 1e-9,
                     f"ours/sdpa {t_sdpa / t_grid:.2f}x  tile/AttnNode "
                     f"{t_tiles / beta ** 2:.3f} ms"))
        moved = sum(o.numel() * o.element_size() + l.numel() * 4 for o, l in inputs)  # read
        moved += sum(o[0].numel() * o.element_size() + l[0].numel() * 4 for o, l in inputs)  # written
        rows.append((f"  merge beta={beta}", t_merge, float("nan"),
                     f"{moved / t_merge * 1e-6:.0f} GB/s"))
    return rows


def run_decode_case(B, Hq, Hkv, N, D, betas, window, dtype=torch.bfloat16):
    """Rows (label, ms, nan, extra) for one decode step; see the module docstring."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from fxdisagg.kernels import triton_backend as tb
    from fxdisagg.kernels.features import TileFeatures

    dev = "cuda"
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)  # [B, Hq, 1, D]
    k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=dtype) for _ in range(2))  # [B, Hkv, N, D]
    pos = torch.arange(N, device=dev)
    q_pos, scale = pos[-1:], D ** -0.5
    seen = N if window is None else min(window, N)
    moved = 2 * B * Hkv * seen * D * k.element_size()  # k/v bytes the step must read
    mask = None if window is None else (q_pos - pos < window)[None, None, None, :]  # [1, 1, 1, N]

    def sdpa_fn():
        return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def ours(kk, vv, k_pos):
        return tb.partial_attention(q, kk, vv, TileFeatures(q_pos, k_pos, scale=scale,
                                                            causal=True, window=window))

    def row(label, ms, out=None):
        err = "" if out is None else f"  max|err| {(out.float() - sdpa_fn().float()).abs().max().item():.1e}"
        return label, ms, float("nan"), f"{moved / ms * 1e-6:.0f} GB/s{err}"

    rows = [row("sdpa decode", _bench(sdpa_fn))]
    rows.append(row("decode tile (beta=1)", _bench(lambda: ours(k, v, pos)), ours(k, v, pos)[0]))
    for beta in betas:
        nodes = [pos[a::beta ** 2] for a in range(min(beta ** 2, N))]
        ks = [k[:, :, t].contiguous() for t in nodes]
        vs = [v[:, :, t].contiguous() for t in nodes]

        def grid():
            parts = [ours(ks[a], vs[a], nodes[a]) for a in range(len(nodes))]
            return tb.expsum_merge(torch.stack([p[0] for p in parts]),
                                   torch.stack([p[1] for p in parts]))

        rows.append(row(f"decode beta={beta} + merge", _bench(grid), grid()[0]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--tokens", type=int, default=32768, help="B * N, kept constant")
    p.add_argument("--hidden", type=int, default=2048, help="H = hidden // D")
    p.add_argument("--betas", type=int, nargs="+", default=[2, 4])
    p.add_argument("--decode", action="store_true", help="one decode step instead of prefill")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="decode: Hq // Hkv")
    p.add_argument("--window", type=int, default=None, help="decode: sliding window")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("attention_gpu.py: no CUDA device; nothing to benchmark "
              "(Triton kernels are tested on CPU by tests/test_triton_kernels.py).")
        return 0

    print(f"device: {torch.cuda.get_device_name()}  dtype: bf16  tokens/batch: {args.tokens}")
    print(f"{'D':>4} {'N':>6} {'B':>3} {'H':>3}  {'variant':<24} {'ms':>9} {'TFLOP/s':>8}  notes")
    for D in args.head_dims:
        H = max(1, args.hidden // D)
        for N in args.seqlens:
            B = args.decode_batch if args.decode else max(1, args.tokens // N)
            rows = (run_decode_case(B, H, max(1, H // args.group), N, D, args.betas, args.window)
                    if args.decode else run_case(B, H, N, D, args.betas))
            for label, ms, tflops, extra in rows:
                tf = "" if tflops != tflops else f"{tflops:8.1f}"
                print(f"{D:>4} {N:>6} {B:>3} {H:>3}  {label:<24} {ms:9.3f} {tf:>8}  {extra}")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
