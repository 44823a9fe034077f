"""Cost model and planner: what one prefill costs per layer on a GPU cluster, for fxdisagg's
grids and for the usual alternatives on the same devices, and which grid to pick.

Roofline per node and layer (bf16, batch 1): time = max(FLOPs / peak, HBM bytes / HBM
bandwidth); links: bytes a device sends or receives (the larger; links are full duplex)
over NVLink when every device fits one node, else over the per-GPU network link.

- fxdisagg (alpha, beta), alpha + beta^2 devices, the Plan's R-sharding:
  CompNode c: 2 t_c P FLOPs (P: linear weights of a layer), reads its weights and
  activations; AttnNode (i, j): 4 pairs_ij Hq d FLOPs (qk^T and p.v over the tile's
  causal pairs, exact from the Plan), reads its q and k, v tiles; links: a CompNode
  sends each q row to beta AttnNodes and each k, v row to beta AttnNodes and gets beta
  partials (out bf16, lse fp32) per q row back. CompNodes and AttnNodes are different
  devices, so with chunks of the sequence in flight they overlap: a layer costs
  max(CompNode, AttnNode, link) ("overlap"), or their sum ("no overlap", one chunk).
- one device: the whole layer on one GPU (and whether the KV cache fits its memory);
- ring attention, zigzag (balanced causal) on D devices: N/D tokens each, all weights,
  every device receives the other D-1 k, v blocks; comm overlaps the attention steps;
- Ulysses on D devices: N/D tokens for the linears, all-to-alls of q, k, v and out turn
  it head-parallel (needs D to divide the kv heads); attention then sees all N tokens.
On one device, ring and Ulysses cannot overlap their linears with their attention
(same GPU): "overlap" there hides only comm behind attention.

Embedding and LM head, norms and element-wise ops are left out of every column alike.
Hardware figures are NVIDIA's datasheets (sources beside each entry); achieved rates are
lower, and the same for every column, so the ranking holds better than the absolute time.
"""

from __future__ import annotations

import dataclasses

from fxdisagg.plan import Plan


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    flops: float        # dense bf16 FLOP/s
    hbm: float          # HBM bytes/s
    nvlink: float       # NVLink bytes/s per GPU and direction
    network: float      # network bytes/s per GPU and direction (one NIC per GPU)
    per_node: int       # GPUs in one NVLink domain
    memory: float       # HBM bytes


HARDWARE = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity, i.e.
    # 989 dense; HBM3 3.35 TB/s, 80 GB; NVLink 900 GB/s total = 450 GB/s per direction.
    # DGX H100 user guide: 8 GPUs, one ConnectX-7 NDR 400 Gb/s (50 GB/s) per GPU.
    "h100": Hardware("H100 SXM5", 989e12, 3.35e12, 450e9, 50e9, 8, 80e9),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same compute, HBM3e 4.8 TB/s, 141 GB,
    # NVLink 900 GB/s; DGX H200: 8 GPUs, NDR 400 Gb/s per GPU.
    "h200": Hardware("H200 SXM", 989e12, 4.8e12, 450e9, 50e9, 8, 141e9),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    elem: int = 2       # bytes per activation / weight element (bf16)

    @staticmethod
    def of(config) -> "ModelShape":
        """From an HF config (Llama-style names; GPT-2's n_embd/n_layer/n_head)."""
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        return ModelShape(
            hidden=hidden,
            layers=getattr(config, "num_hidden_layers", None) or config.n_layer,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        )

    @property
    def linear_params(self) -> int:
        """Weights one layer's matmuls read: q, o (h x Hq d), k, v (h x Hkv d), gated MLP."""
        h, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * h * qd + 2 * h * kvd + 3 * h * self.intermediate


#: Llama-3-8B's shape (its config.json): the README's example.
LLAMA3_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One layer of one strategy: seconds of its slowest node per part, and the totals."""

    name: str
    devices: int
    compute: float      # linears (CompNodes / every device)
    attention: float    # attention
    comm: float         # the busiest link
    overlapped: float   # a layer when the parts overlap as the strategy allows
    serial: float       # a layer when they run one after another
    note: str = ""


def _roofline(flops: float, bytes_: float, hw: Hardware) -> float:
    return max(flops / hw.flops, bytes_ / hw.hbm)


def _link(devices: int, hw: Hardware) -> float:
    return hw.nvlink if devices <= hw.per_node else hw.network


def disaggregated(shape: ModelShape, hw: Hardware, n: int, alpha: int, beta: int) -> LayerCost:
    plan = Plan.build(n, alpha, beta, "r")
    e, d, hq, hkv = shape.elem, shape.head_dim, shape.heads, shape.kv_heads
    weights = shape.linear_params * e
    act_row = (4 * shape.hidden + 2 * shape.intermediate) * e      # activations read + written
    t_max = max(len(t) for t in plan.comp_tokens)
    compute = _roofline(2 * t_max * shape.linear_params, weights + t_max * act_row, hw)
    pairs = plan.causal_work()
    attention = max(
        _roofline(4 * float(pairs[i, j]) * hq * d,
                  (len(plan.shard_tokens[i]) * 2 * hq + len(plan.shard_tokens[j]) * 2 * hkv) * d * e, hw)
        for i in range(beta) for j in range(beta))
    s_max = max(len(t) for t in plan.shard_tokens)
    attn_in = s_max * (hq + 2 * hkv) * d * e                          # q of shard i, k, v of j
    reply = s_max * hq * (d * e + 4)                                  # out and fp32 lse
    comp_out = t_max * beta * (hq + 2 * hkv) * d * e
    comp_in = t_max * beta * hq * (d * e + 4)
    comm = (max(attn_in, comp_out) + max(reply, comp_in)) / _link(alpha + beta * beta, hw)
    return LayerCost(f"fxdisagg ({alpha}, {beta})", alpha + beta * beta, compute, attention, comm,
                     max(compute, attention, comm), compute + attention + comm)


def one_device(shape: ModelShape, hw: Hardware, n: int) -> LayerCost:
    e, d = shape.elem, shape.head_dim
    compute = _roofline(2 * n * shape.linear_params,
                        shape.linear_params * e + n * (4 * shape.hidden + 2 * shape.intermediate) * e, hw)
    pairs = n * (n + 1) / 2
    attention = _roofline(4 * pairs * shape.heads * d, n * (2 * shape.heads + 2 * shape.kv_heads) * d * e, hw)
    kv_bytes = n * 2 * shape.kv_heads * d * e * shape.layers
    note = "" if kv_bytes < hw.memory else f"KV cache {kv_bytes / 1e9:.0f} GB > {hw.memory / 1e9:.0f} GB"
    return LayerCost("one device", 1, compute, attention, 0.0, compute + attention,
                     compute + attention, note)


def ring_zigzag(shape: ModelShape, hw: Hardware, n: int, devices: int) -> LayerCost:
    e, d, t = shape.elem, shape.head_dim, n / devices
    compute = _roofline(2 * t * shape.linear_params,
                        shape.linear_params * e + t * (4 * shape.hidden + 2 * shape.intermediate) * e, hw)
    pairs = n * (n + 1) / 2 / devices                                  # zigzag: balanced
    attention = _roofline(4 * pairs * shape.heads * d, n * 2 * shape.kv_heads * d * e, hw)
    comm = (devices - 1) * t * 2 * shape.kv_heads * d * e / _link(devices, hw)
    return LayerCost(f"ring (zigzag) on {devices}", devices, compute, attention, comm,
                     compute + max(attention, comm), compute + attention + comm)


def ulysses(shape: ModelShape, hw: Hardware, n: int, devices: int) -> LayerCost:
    e, d, t = shape.elem, shape.head_dim, n / devices
    compute = _roofline(2 * t * shape.linear_params,
                        shape.linear_params * e + t * (4 * shape.hidden + 2 * shape.intermediate) * e, hw)
    pairs = n * (n + 1) / 2
    heads = shape.heads / devices
    attention = _roofline(4 * pairs * heads * d, n * (2 * heads + 2 * shape.kv_heads / devices) * d * e, hw)
    comm = t * (2 * shape.heads + 2 * shape.kv_heads) * d * e * (devices - 1) / devices / _link(devices, hw)
    note = "" if shape.kv_heads % devices == 0 else f"needs kv heads ({shape.kv_heads}) divisible by {devices}"
    return LayerCost(f"Ulysses on {devices}", devices, compute, attention, comm,
                     compute + max(attention, comm), compute + attention + comm, note)


def grids(devices: int) -> list[tuple[int, int]]:
    """Every (alpha, beta) with alpha + beta^2 == devices, alpha >= 1."""
    return [(devices - b * b, b) for b in range(1, devices) if devices - b * b >= 1]


def pick_grid(shape: ModelShape, hw: Hardware, n: int, devices: int, overlap: bool = True
              ) -> tuple[int, int]:
    """The (alpha, beta) of least layer time on ``devices`` GPUs for a prefill of ``n``."""
    if not grids(devices):
        raise ValueError(f"fxdisagg needs at least 2 devices (alpha + beta^2), got {devices}")
    costs = [(disaggregated(shape, hw, n, a, b), (a, b)) for a, b in grids(devices)]
    return min(costs, key=lambda c: c[0].overlapped if overlap else c[0].serial)[1]


def compare(shape: ModelShape, hw: Hardware, n: int, devices: int) -> list[LayerCost]:
    """Every fxdisagg grid for ``devices`` and the alternatives, one row each."""
    rows = [one_device(shape, hw, n), ring_zigzag(shape, hw, n, devices), ulysses(shape, hw, n, devices)]
    return rows + [disaggregated(shape, hw, n, a, b) for a, b in grids(devices)]


def table(shape: ModelShape, hw: Hardware, n: int, devices: int) -> str:
    """`compare` as text, in ms per layer and s per prefill, the picked grid marked."""
    best = pick_grid(shape, hw, n, devices)
    lines = [f"Prefill of {n:,} tokens, {shape.layers} layers (hidden {shape.hidden}, "
             f"{shape.heads}/{shape.kv_heads} heads), {devices} x {hw.name}; ms per layer:",
             f"  {'strategy':<22}{'linears':>10}{'attention':>11}{'link':>9}"
             f"{'overlap':>10}{'serial':>10}{'prefill s':>11}"]
    for row in compare(shape, hw, n, devices):
        mark = "  <- picked" if row.name == f"fxdisagg {best}" else ""
        lines.append(f"  {row.name:<22}{row.compute * 1e3:>10.2f}{row.attention * 1e3:>11.2f}"
                     f"{row.comm * 1e3:>9.2f}{row.overlapped * 1e3:>10.2f}{row.serial * 1e3:>10.2f}"
                     f"{row.overlapped * shape.layers:>11.2f}{mark}"
                     + (f"  ({row.note})" if row.note else ""))
    return "\n".join(lines)
