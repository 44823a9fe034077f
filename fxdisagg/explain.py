"""`DisaggregatedModel.explain()`: what fxdisagg made of a model, in words and numbers.

Four sections, each read off what the compiler produced (never re-derived):
1. the attention sites: how many of each spelling were matched (`find_attention` counts)
   and, per layer, heads, head dim, scale and the mask as `classify_masks` classified it
   (the arguments of that layer's ``partial_attention`` in the AttnNode program);
2. where ops run: the CompNode stages in words (`fxdisagg.pictures`), equal stages folded,
   the AttnNodes' work, the epilogue, with op counts per program;
3. the Plan for ``n_tokens``;
4. expected bytes per layer (the exchange schedule's prediction, which the transports'
   counts match) and work per node: CompNode FLOPs from its linear weights, AttnNode
   FLOPs from the visible (query, key) pairs of its tile.

A site fxdisagg refuses raises a typed error at compile time, naming the node and the
reason; ``fxdisagg explain`` prints that error as the refusal.
"""

from __future__ import annotations

import torch

from fxdisagg import pictures
from fxdisagg.ir import args_of


def _call_count(gm) -> int:
    """Calls in a program and its stage submodules (weight holders have no graph)."""
    return sum(sum(1 for n in m.graph.nodes if n.op == "call_function")
               for m in gm.modules() if hasattr(m, "graph"))


def _partial_attention_calls(attn_program) -> list:
    calls = []
    for _, stage in sorted(attn_program.named_children(), key=lambda kv: int(kv[0].split("_")[1])):
        calls += [n for n in stage.graph.nodes
                  if n.op == "call_function" and "partial_attention" in str(n.target)]
    return calls


def _mask_words(node) -> str:
    """The mask of one layer from its partial_attention arguments."""
    a = args_of(node)
    q_doc, k_valid, scale, window, ahead = a["q_doc"], a["k_valid"], a["scale"], a["window"], a["window_ahead"]
    words = ["causal" if a["causal"] else "bidirectional"]
    if window is not None and window == ahead:
        words.append(f"two-sided window |q - k| < {window}")
    elif window is not None or ahead is not None:
        words += [f"sliding window {window}"] * (window is not None)
        words += [f"window ahead {ahead}"] * (ahead is not None)
    if a["softcap"] is not None:
        words.append(f"logit soft-capping {a['softcap']:g}")
    if a["alibi"] is not None:
        words.append(f"ALiBi (slopes {a['alibi'][0]:.3g} .. {a['alibi'][-1]:.3g})")
    if q_doc is not None:
        words.append("documents (packed sequences)")
    if k_valid is not None:
        words.append("key padding")
    return f"{', '.join(words)}; scale {scale:.4g}"


def attention_sites(compiled) -> list[str]:
    counts = compiled.counts
    spelled = ", ".join(f"{counts[k]} {k.split('.')[1]}" for k in sorted(counts)
                        if k.startswith("find_attention.")) or "none"
    lines = [f"Attention sites matched: {spelled} (a refused site is a compile error)"]
    calls = _partial_attention_calls(compiled.programs.attn)
    tp = max(1, len(compiled.programs.comp_by_rank))
    per_rank = f" ({tp} TP ranks: 1/{tp} each)" if tp > 1 else ""
    for lp, node in zip(compiled.programs.layers, calls):
        q = next(p for p in lp.query if p.name == "q")
        k = next(p for p in lp.key if p.name == "k")
        lines.append(f"  layer {lp.layer}: {q.shape[1] * tp} query heads, {k.shape[1] * tp} kv "
                     f"heads{per_rank}, head dim {q.shape[-1]}; mask: {_mask_words(node)}")
    return lines


def where_ops_run(compiled, alpha: int, beta: int) -> list[str]:
    programs = compiled.programs
    lines = ["Where ops run:"]
    summaries = pictures.comp_stage_summaries(programs)
    tp = max(1, len(programs.comp_by_rank))
    group = f" x {tp} TP ranks" if tp > 1 else ""
    for first, last, words in pictures.runs(summaries):
        span = f"stage {first}" if first == last else f"stages {first}-{last}"
        lines.append(f"  {alpha} CompNode(s){group}, {span}: {words}")
    lines.append(f"  {beta}x{beta} AttnNodes, every layer: "
                 + pictures.attn_summary(programs).replace("<br/>", "; "))
    epilogue = sorted({str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
                       for n in programs.epilogue.graph.nodes if n.op == "call_function"})
    lines.append(f"  epilogue (driver): {', '.join(epilogue) or 'outputs only'}")
    lines.append(f"  op calls: CompNode program {_call_count(programs.comp)}, AttnNode program "
                 f"{_call_count(programs.attn)}, epilogue {_call_count(programs.epilogue)}")
    return lines


def _linear_weights(gm) -> int:
    """Elements of the weights the CompNode's matmuls read (embeddings are lookups)."""
    total = 0
    for mod in (m for m in gm.modules() if hasattr(m, "graph")):
        for n in mod.graph.nodes:
            if n.op == "call_function" and any(s in str(n.target) for s in ("linear", "addmm", "mm.")):
                for a in n.all_input_nodes:
                    t = _attr(mod, a.target) if a.op == "get_attr" else None
                    if isinstance(t, torch.Tensor) and t.dim() == 2:
                        total += t.numel()
    return total


def _attr(mod, target: str):
    for part in target.split("."):
        mod = getattr(mod, part, None)
    return mod


def _bytes_words(t: dict) -> str:
    """``dispatch 37,312, return 13,056`` (and the all-reduces' bytes under tensor parallelism)."""
    return ", ".join(f"{phase.replace('_', '-')} {nb:,}" for phase, nb in t.items())


def work_per_node(compiled, plan, batch: int, traffic: dict) -> list[str]:
    programs = compiled.programs
    layers = len(programs.layers)
    per_layer = {tuple(t.items()) for t in traffic.values()}
    if len(per_layer) == 1:
        lines = [f"Expected bytes per layer (batch {batch}, every one of {layers} layers): "
                 f"{_bytes_words(next(iter(traffic.values())))}"]
    else:
        lines = [f"Expected bytes (batch {batch}):"] + [
            f"  layer {l}: {_bytes_words(t)}" for l, t in traffic.items()]
    lines.append("Work per node (one call, all layers):")
    weights = _linear_weights(programs.comp)
    for c, toks in enumerate(plan.comp_tokens):
        lines.append(f"  CompNode {c}: {len(toks)} tokens, {_flops(2 * weights * len(toks) * batch)} "
                     f"in its linears")
    if programs.layers:
        q = next(p for p in programs.layers[0].query if p.name == "q")
        per_pair = 4 * q.shape[1] * q.shape[-1] * batch * layers      # qk^T and p.v, all layers
        work = plan.causal_work()
        for i in range(plan.beta):
            for j in range(plan.beta):
                pairs = int(work[i][j])
                lines.append(f"  AttnNode ({i}, {j}): {pairs:,} causal (query, key) pairs, "
                             f"{_flops(per_pair * pairs)} (a window or padding only lowers it)")
    return lines


def _flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} FLOP"


def explain(dm, n_tokens: int | None = None) -> str:
    """The text of `DisaggregatedModel.explain` (module docstring)."""
    compiled = dm.compiled
    n = n_tokens or dm._last_n or compiled.captured.max_len
    batch = compiled.captured.batch
    plan = dm.plan_for(n)
    traffic = dm.expected_traffic(n, batch)
    config = dm.config
    name = getattr(dm.model, "display_name", type(dm.model).__name__)
    sections = [
        [f"fxdisagg: {name}, alpha={config.alpha}, "
         + (f"tp={config.tp}, " if config.tp > 1 else "") + f"beta={config.beta}, "
         f"sharding={config.sharding!r}, batch {batch}, {n} tokens, lengths 1.."
         f"{compiled.captured.max_len}"] + [f"  note: {w}" for w in compiled.warnings],
        attention_sites(compiled),
        where_ops_run(compiled, config.alpha, config.beta),
        plan.summary(traffic=next(iter(traffic.values()), None)).splitlines(),
        work_per_node(compiled, plan, batch, traffic),
    ]
    return "\n\n".join("\n".join(s) for s in sections)
