"""Dumps: what the compiler did, for a human who needs it explained.

Off by default; on with ``fxdisagg.compile(..., dump_dir=...)`` or ``FXDISAGG_DUMP_DIR``.
Writes, per pass, the readable code before and after and the pass time (``passes.txt``);
the role programs (``program_*.py``); the role graph (``roles``: one box per role and
stage, `fxdisagg.pictures.roles_dot`) and the op-level graph of each CompNode stage and of
the AttnNode program (``stage_*.dot``, DOT only: render one with ``dot -Tsvg`` when the
words are not enough); the Plan as JSON and as the seed figure draws it (``plan``). SVGs
are rendered with graphviz's ``dot`` where it is installed; the DOT text is always written.
"""

from __future__ import annotations

import html
import logging
import pathlib
import shutil
import subprocess

from fxdisagg import pictures

log = logging.getLogger(__name__)


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
        self._render("roles", pictures.roles_dot(programs, ctx.alpha, ctx.beta))
        self._comp_words = pictures.comp_stage_summaries(programs)
        for name, stage in programs.comp.named_children():
            self._render(f"stage_comp_{name}", pictures.stage_dot(stage, f"CompNode {name}"), svg=False)
        self._render("stage_attn", pictures.stage_dot(programs.attn, "AttnNode program"), svg=False)

    def plan(self, plan, traffic: dict | None = None) -> None:
        (self.root / "plan.json").write_text(plan.to_json())
        first = next(iter(traffic.values())) if traffic else None
        (self.root / "plan.txt").write_text(plan.summary(traffic=first))
        words = getattr(self, "_comp_words", None)
        comp_words = (html.escape(words[min(1, len(words) - 1)]) if words
                      else "LayerNorm, h → q,k,v<br/>expsum-merge, O-proj, MLP")
        self._render("plan", pictures.plan_dot(plan, comp_words, first))

    def _render(self, stem: str, dot: str, svg: bool = True) -> None:
        path = self.root / f"{stem}.dot"
        path.write_text(dot)
        exe = shutil.which("dot") if svg else None
        if exe:
            subprocess.run([exe, "-Tsvg", str(path), "-o", str(path.with_suffix(".svg"))],
                           check=False, timeout=120)
        elif svg:
            log.info("graphviz 'dot' not found: wrote %s without an SVG", path)

