"""Pictures a person reads: the Plan in the style of the seed figure, and the role graph
as one box per role and stage, both as graphviz DOT text.

- `plan_dot`: token indices at the bottom, R-sharding, the alpha CompNodes with their
  token index sets and what they compute, the beta x beta AttnNode grid with the query
  sets of its rows on the left and the key sets of its columns below, the cell formula,
  and arrows labelled with what travels (bytes per layer when known).
- `roles_dot`: the driver's inputs, each CompNode stage summarised in words (read off the
  stage's ops: "RMSNorm, h -> q,k,v, RoPE", "expsum-merge, O-proj, RMSNorm, MLP (SiLU)";
  with tensor-parallel CompNodes the group and its all-reduces: "O-proj, all-reduce"),
  the AttnNode grid's stage, and the epilogue. Consecutive stages that say the same are
  one box marked "x n layers", so a 32-layer model is as small as a 2-layer one (the
  op-level graph of one stage is `stage_dot`, on request).

The summaries name what an op sequence does by its shape, not by module names (the graph
has none): a norm is `layer_norm`, or `rsqrt` after `pow`/`mean` (RMSNorm); the linears
after the last norm of a stage that dispatches are the q, k, v projections, and a
`neg`+`cat` after them is RoPE; in a stage that merges partials, the first linears are
the O-projection; the linears between are the MLP. Anything not recognised is left out of
the words, never guessed.
"""

from __future__ import annotations

import html

_LINEAR = {"linear", "addmm", "mm", "matmul", "bmm"}
_ACTIVATIONS = {"silu": "SiLU", "gelu": "GELU", "relu": "ReLU", "sigmoid": "sigmoid"}
COMP_COLOUR, ATTN_COLOUR, OTHER_COLOUR = "#cfe2ff", "#ffd6d6", "#eeeeee"


# ----------------------------------------------------------------------------- summaries


def _op_names(gm) -> list[str]:
    """The bare aten names of a graph's calls, in order ("linear", "rsqrt", ...)."""
    names = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            names.append(getattr(n.target, "__name__", str(n.target)).split(".")[0])
    return names


def _tokens(ops: list[str]) -> list[tuple[str, str]]:
    """Ops -> (kind, detail) events: norm, linear (runs merged), activation, rope, embedding."""
    events: list[tuple[str, str]] = []
    for k, op in enumerate(ops):
        if op in ("layer_norm", "native_layer_norm"):
            events.append(("norm", "LayerNorm"))
        elif op == "rsqrt" and {"pow", "mean"} & set(ops[max(0, k - 4):k]):
            events.append(("norm", "RMSNorm"))
        elif op in _LINEAR:
            if events and events[-1][0] == "linear":
                continue
            events.append(("linear", ""))
        elif op in _ACTIVATIONS:
            events.append(("act", _ACTIVATIONS[op]))
        elif op == "neg":
            events.append(("rope", ""))
        elif op == "embedding" and not (events and events[-1] == ("embed", "")):
            events.append(("embed", ""))
        elif op == "tp_all_reduce":
            events.append(("allreduce", ""))
    return events


def stage_summary(stage, merges: bool, dispatches: bool) -> str:
    """What one CompNode stage computes, in words (module docstring). ``merges``: the stage
    reads returned partials; ``dispatches``: it ends by sending q, k, v."""
    events = _tokens(_op_names(stage))
    norms = [k for k, (kind, _) in enumerate(events) if kind == "norm"]
    last_norm = norms[-1] if norms else -1
    words, seen_linear = [], False
    if merges:
        words.append("expsum-merge")
    for k, (kind, detail) in enumerate(events):
        if kind == "embed":
            words.append("Embedding")
        elif kind == "norm":
            words.append(detail)
        elif kind == "linear":
            if merges and not seen_linear:
                words.append("O-proj")
            elif k > last_norm and dispatches:
                words.append("h → q,k,v")
            elif k > last_norm:
                words.append("LM head" if _nothing_after(events, k) else "linear")
            elif not words or not words[-1].startswith("MLP"):
                words.append("MLP")
            seen_linear = True
        elif kind == "allreduce":
            words.append("all-reduce")
        elif kind == "act" and words and words[-1] == "MLP":
            words[-1] = f"MLP ({detail})"
        elif kind == "rope" and words and words[-1] in ("h → q,k,v", "RoPE") and "RoPE" not in words:
            words.append("RoPE")
    return ", ".join(words) or "(no compute)"


def _nothing_after(events, k: int) -> bool:
    """A linear after the last norm with nothing after it: the vocabulary projection."""
    return all(kind != "linear" for kind, _ in events[k + 1:])


def comp_stage_summaries(programs) -> list[str]:
    """One summary per CompNode stage, in order (stage s merges layer s-1's partials and
    dispatches layer s, when those layers exist)."""
    stages = [m for _, m in sorted(programs.comp.named_children(), key=lambda x: int(x[0].split("_")[1]))]
    n_layers = len(programs.layers)
    return [stage_summary(st, merges=s > 0, dispatches=s < n_layers) for s, st in enumerate(stages)]


def attn_summary(programs) -> str:
    """The AttnNode program's per-layer work, in words."""
    ops = set(_op_names(programs.attn))
    for _, st in programs.attn.named_children():
        ops |= set(_op_names(st))
    words = ["partial attention: softmax(qkᵀ + m)·v, expsum(qkᵀ + m)"]
    if "kv_cache" in ops:
        words.append("KV cache (kept across decode steps)")
    return "<br/>".join(words)


def runs(items: list[str]) -> list[tuple[int, int, str]]:
    """Consecutive equal items as (first index, last index, item)."""
    runs: list[tuple[int, int, str]] = []
    for k, item in enumerate(items):
        if runs and runs[-1][2] == item:
            runs[-1] = (runs[-1][0], k, item)
        else:
            runs.append((k, k, item))
    return runs


# ----------------------------------------------------------------------------- role graph


def _box(name: str, title: str, body: str, colour: str) -> str:
    label = f"<<b>{html.escape(title)}</b><br/>{body}>"
    return f'  {name} [label={label}, style="rounded,filled", fillcolor="{colour}"];'


def roles_dot(programs, alpha: int, beta: int) -> str:
    """The role graph: one box per run of equal CompNode stages, the AttnNode grid beside
    the stages that dispatch to it, the epilogue at the end (module docstring)."""
    summaries = comp_stage_summaries(programs)
    tp = max(1, len(programs.comp_by_rank))
    lines = ["digraph roles {", "  rankdir=TB; nodesep=0.6; ranksep=0.45;",
             '  node [shape=box, fontname="Helvetica", fontsize=11];',
             '  edge [fontname="Helvetica", fontsize=9];',
             _box("inputs", "driver", "inputs (input_ids, mask, positions)", OTHER_COLOUR)]
    attn = attn_summary(programs)
    previous, noted = "inputs", False
    for first, last, words in runs(summaries):
        name = f"comp_{first}"
        count = last - first + 1
        span = f"stage {first}" if count == 1 else f"stages {first}-{last} (× {count} layers)"
        group = f" × {tp} TP ranks" if tp > 1 else ""
        body = html.escape(words)
        if tp > 1 and "all-reduce" in words and not noted:
            body += ("<br/><i>column-parallel q,k,v and MLP up, row-parallel O-proj and MLP down;"
                     "<br/>each all-reduce sums the TP group's partial outputs</i>")
            noted = True
        lines.append(_box(name, f"{alpha} CompNode{'s' if alpha > 1 else ''}{group}, {span}",
                          body, COMP_COLOUR))
        lines.append(f"  {previous} -> {name};")
        if first < len(programs.layers):             # this run dispatches: draw the grid
            grid = f"attn_{first}"
            last_layer = min(last, len(programs.layers) - 1)
            layers = f"layer {first}" if last_layer == first else f"layers {first}-{last_layer}"
            lines.append(_box(grid, f"{beta} × {beta} AttnNodes, {layers}", attn, ATTN_COLOUR))
            lines.append(f'  {name} -> {grid} [label="q, k, v"];')
            lines.append(f'  {grid} -> {name} [label="out, lse", style=dashed, constraint=false];')
            lines.append(f"  {{ rank=same; {name}; {grid}; }}")
        previous = name
    lines.append(_box("epilogue", "epilogue (driver)", "outputs", OTHER_COLOUR))
    lines.append(f"  {previous} -> epilogue;")
    lines.append("}")
    return "\n".join(lines)


def stage_dot(stage, title: str) -> str:
    """The op-level graph of one stage (for when the words are not enough)."""
    lines = [f'digraph stage {{ label="{html.escape(title)}"; labelloc=t;',
             '  node [shape=box, fontname="Helvetica", fontsize=9];']
    for n in stage.graph.nodes:
        target = getattr(n.target, "__name__", str(n.target)) if n.op == "call_function" else n.op
        lines.append(f'  "{n.name}" [label="{html.escape(n.name)}\\n{html.escape(str(target))}"];')
        lines += [f'  "{a.name}" -> "{n.name}";' for a in n.all_input_nodes]
    lines.append("}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plan


def _tokens_text(t, limit: int = 8) -> str:
    vals = t.tolist()
    return "[" + ", ".join(map(str, vals[:limit])) + (", …" if len(vals) > limit else "") + "]"


def plan_dot(plan, comp_words: str = "LayerNorm, h → q,k,v<br/>expsum-merge, O-proj, MLP",
             traffic: dict | None = None) -> str:
    """The Plan as the seed figure draws it (module docstring). ``traffic``: bytes of one
    layer, {"dispatch": .., "return": ..}, printed on the arrows."""
    beta = plan.beta
    head = '<td></td>'
    rows = []
    for i in range(beta):
        cells = "".join(
            f'<td bgcolor="{ATTN_COLOUR}" cellpadding="6">AttnNode ({i}, {j})<br/>'
            f'<font point-size="9">softmax(qkᵀ + m)·v<br/>expsum(qkᵀ + m)</font></td>'
            for j in range(beta))
        rows.append(f'<tr><td align="right">q {_tokens_text(plan.shard_tokens[i])}</td>{cells}</tr>')
    keys = "".join(f'<td>k {_tokens_text(plan.shard_tokens[j])}</td>' for j in range(beta))
    rows.append(f"<tr>{head}{keys}</tr>")
    grid = (f'<<table border="1" color="#d08080" cellborder="0" cellspacing="6">'
            f'<tr><td colspan="{beta + 1}"><b>{beta} × {beta} AttnNodes</b></td></tr>'
            f'{"".join(rows)}</table>>')
    comps = "".join(f'<td bgcolor="{COMP_COLOUR}" cellpadding="6">CompNode {c}<br/>'
                    f'<font point-size="9">{comp_words}</font><br/>{_tokens_text(t)}</td>'
                    for c, t in enumerate(plan.comp_tokens))
    comp_table = (f'<<table border="1" color="#8080d0" cellborder="0" cellspacing="6">'
                  f'<tr><td colspan="{plan.alpha}"><b>{plan.alpha} CompNodes</b></td></tr>'
                  f'<tr>{comps}</tr></table>>')
    send, back = "q, k, v", "out, lse"
    if traffic:
        send += f"\\n{traffic['dispatch']:,} B / layer"
        back += f"\\n{traffic['return']:,} B / layer"
    n = plan.n_tokens
    indices = "[0, 1, 2, …, %d]" % (n - 1) if n > 3 else str(list(range(n)))
    return "\n".join([
        "digraph plan {", "  rankdir=BT; nodesep=0.5;",
        '  node [shape=plaintext, fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
        f'  tokens [label="Token indices: {indices}  (N = {n})"];',
        f'  shard [shape=box, style="rounded,filled", fillcolor="{OTHER_COLOUR}", '
        f'label="{"R-sharding" if plan.strategy == "r" else plan.strategy + " sharding"}"];',
        f"  comps [label={comp_table}];",
        f"  attn [label={grid}];",
        "  tokens -> shard;",
        '  shard -> comps [label="token index sets"];',
        f'  comps -> attn [label="{send}"];',
        f'  attn -> comps [label="{back}", style=dashed];',
        "}"])
