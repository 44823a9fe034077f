"""Dumps: what the compiler did, for a human who needs it explained.

Off by default; on with ``fxdisagg.compile(..., dump_dir=...)`` or ``FXDISAGG_DUMP_DIR``.
Writes, per pass, the readable code before and after and the pass time (``passes.txt``);
the role programs (``program_*.py``); the role graph as DOT (clusters per CompNode and
AttnNode stage, per layer) and SVG; the Plan as JSON and as a picture in the style of the
seed figure (token index sets per CompNode and per AttnNode row and column). SVGs are
rendered with graphviz's ``dot`` where it is installed; the DOT text is always written.
"""

from __future__ import annotations

import html
import logging
import pathlib
import shutil
import subprocess

from fxdisagg.ir import ROLE, STAGE

log = logging.getLogger(__name__)

ROLE_COLOURS = {"prologue": "#e8e8e8", "static": "#ffffff", "comp": "#cfe2ff",
                "attn": "#ffd6d6", "epilogue": "#e2f0d9", "output": "#ffffff"}


class Dumper:
    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "passes.txt").write_text("")

    def pass_done(self, index: int, name: str, before: str, gm, seconds: float) -> None:
        stem = f"{index:02d}_{name}"
        (self.root / f"{stem}.before.py").write_text(before)
        (self.root / f"{stem}.after.py").write_text(gm.print_readable(print_output=False))
        with open(self.root / "passes.txt", "a") as f:
            f.write(f"{stem:32s} {seconds * 1e3:9.1f} ms\n")

    def programs(self, gm, programs, ctx) -> None:
        for name in ("comp", "attn", "epilogue"):
            text = getattr(programs, name).print_readable(print_output=False)
            (self.root / f"program_{name}.py").write_text(text)
        (self.root / "counts.txt").write_text(
            "".join(f"{k} {v}\n" for k, v in sorted(ctx.counts.items())) +
            "".join(f"WARNING {w}\n" for w in ctx.warnings))
        self._render("roles", role_graph_dot(gm))

    def plan(self, plan, traffic: dict | None = None) -> None:
        (self.root / "plan.json").write_text(plan.to_json())
        first = next(iter(traffic.values())) if traffic else None
        (self.root / "plan.txt").write_text(plan.summary(traffic=first))
        self._render("plan", plan_dot(plan))

    def _render(self, stem: str, dot: str) -> None:
        path = self.root / f"{stem}.dot"
        path.write_text(dot)
        exe = shutil.which("dot")
        if exe:
            subprocess.run([exe, "-Tsvg", str(path), "-o", str(path.with_suffix(".svg"))],
                           check=False, timeout=120)
        else:
            log.info("graphviz 'dot' not found: wrote %s without an SVG", path)


def role_graph_dot(gm) -> str:
    """The labelled graph, one cluster per (role, layer) for CompNode and AttnNode work."""
    clusters: dict[tuple, list[str]] = {}
    edges = []
    for n in gm.graph.nodes:
        role = n.meta.get(ROLE, "?")
        if role == "static":
            continue
        layer = n.meta.get(STAGE, 0)
        label = html.escape(f"{n.name}\\n{getattr(n.target, '__name__', n.target)}")
        colour = ROLE_COLOURS.get(role, "#ffffff")
        clusters.setdefault((role, layer), []).append(
            f'"{n.name}" [label="{label}", style=filled, fillcolor="{colour}"];')
        edges += [f'"{a.name}" -> "{n.name}";' for a in n.all_input_nodes
                  if a.meta.get(ROLE) != "static"]
    out = ["digraph roles {", "  rankdir=TB; node [shape=box, fontsize=9];"]
    for (role, layer), nodes in clusters.items():
        title = {"comp": "CompNode", "attn": "AttnNode"}.get(role, role)
        out.append(f'  subgraph "cluster_{role}_{layer}" {{ label="{title} stage {layer}";')
        out += [f"    {s}" for s in nodes]
        out.append("  }")
    out += [f"  {e}" for e in edges]
    out.append("}")
    return "\n".join(out)


def plan_dot(plan) -> str:
    """Seed-figure picture: CompNodes with their token sets below, the beta x beta grid of
    AttnNodes above, each cell labelled with its query (row) and key (column) sets."""
    def fmt(t):
        vals = t.tolist()
        return "[" + ", ".join(map(str, vals[:6])) + (", ..." if len(vals) > 6 else "") + "]"

    rows = []
    for i in range(plan.beta):
        cells = "".join(f'<td bgcolor="#ffd6d6">AttnNode ({i},{j})<br/>q {fmt(plan.shard_tokens[i])}'
                        f'<br/>k {fmt(plan.shard_tokens[j])}</td>' for j in range(plan.beta))
        rows.append(f"<tr>{cells}</tr>")
    grid = f'<<table border="0" cellspacing="4">{"".join(rows)}</table>>'
    comps = "".join(f'<td bgcolor="#cfe2ff">CompNode {c}<br/>{fmt(t)}</td>'
                    for c, t in enumerate(plan.comp_tokens))
    comp_table = f'<<table border="0" cellspacing="4"><tr>{comps}</tr></table>>'
    title = f"N={plan.n_tokens}, alpha={plan.alpha}, beta={plan.beta}, {plan.strategy}-sharding"
    return "\n".join([
        "digraph plan {", "  node [shape=plaintext, fontsize=10]; rankdir=BT;",
        f'  title [label="{title}"];',
        f"  comps [label={comp_table}];",
        f"  attn [label={grid}];",
        '  comps -> attn [label="q, k, v"];', "  attn -> comps [label=\"partials + lse\"];",
        "  title -> comps [style=invis];", "}"])
