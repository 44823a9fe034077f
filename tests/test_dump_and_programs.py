"""Dumps are complete when on, and the role programs read as the design says."""

import html
import json
import re
import shutil
import subprocess

import pytest
import torch

import fxdisagg
from fxdisagg.pictures import comp_stage_summaries
from fxdisagg.testing import inputs, rel_error, tiny_model


def test_dump_dir_writes_every_pass_programs_and_plan(tmp_path):
    dm = fxdisagg.compile(tiny_model("llama"), 2, 2, example_inputs=inputs("llama", 1, 12),
                          launch="inprocess", dump_dir=tmp_path / "d")
    tmp_path = tmp_path / "d" / "capture0"
    names = ["find_attention", "fold_repeat_kv", "classify_masks", "split_attention",
             "eliminate_common_subexpressions", "partition"]
    timings = (tmp_path / "passes.txt").read_text()
    for i, name in enumerate(names):
        assert (tmp_path / f"{i:02d}_{name}.before.py").exists()
        assert (tmp_path / f"{i:02d}_{name}.after.py").exists()
        assert name in timings
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["comp_tokens"][0] == [0, 1, 4, 5, 8, 9]
    assert "2 × 2 AttnNodes" in (tmp_path / "roles.dot").read_text()
    assert "AttnNode (0, 1)" in (tmp_path / "plan.dot").read_text()
    assert (tmp_path / "stage_comp_stage_1.dot").exists() and (tmp_path / "stage_attn.dot").exists()
    assert dm.counts["lower.exchanges"] == 2 and dm.counts["lower.stages"] == 3
    assert "bytes per layer: dispatch" in (tmp_path / "plan.txt").read_text()
    # a second capture (another batch size) dumps beside the first, not over it
    dm(**inputs("llama", 2, 5))
    assert (tmp_path.parent / "capture1" / "program_comp.py").exists()
    assert (tmp_path / "program_comp.py").exists()


def test_dump_environment_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDISAGG_DUMP_DIR", str(tmp_path))
    fxdisagg.compile(tiny_model("gpt2"), 1, 2, example_inputs=inputs("gpt2", 1, 9), launch="inprocess")
    assert (tmp_path / "capture0" / "program_comp.py").exists()


def test_role_programs_show_one_exchange_per_layer_and_phase_between_stages():
    dm = fxdisagg.compile(tiny_model("llama", layers=3), 2, 2, example_inputs=inputs("llama", 1, 9),
                          launch="inprocess")
    comp, attn = dm.programs.comp, dm.programs.attn
    top = comp.code
    for layer in range(3):
        for phase in ("dispatch", "return"):
            for side in ("start", "wait"):
                assert top.count(f"\n    {phase}_{side}_{layer} = torch.ops.fxdisagg.exchange_{side}") == 1
                assert attn.code.count(f"torch.ops.fxdisagg.exchange_{side}.default(") == 6
        assert attn.code.count(f"\n    tile_{layer} = torch.ops.fxdisagg.exchange_wait") == 1
    stages = dict(comp.named_children())
    assert sorted(stages) == ["stage_0", "stage_1", "stage_2", "stage_3"]
    assert "exchange" not in "".join(s.code for s in stages.values()), "stages hold compute only"
    assert "index_select" in stages["stage_0"].code  # prologue values localised to the tokens
    everything = top + "".join(s.code for s in stages.values())
    assert "scaled_dot_product" not in everything and "softmax" not in everything
    assert not list(attn.parameters()), "AttnNodes hold no weights"


def test_bert_pooler_runs_in_the_epilogue():
    model = tiny_model("bert")
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess")
    kw = inputs("bert", 2, 11)
    out = dm(**kw)
    with torch.no_grad():
        ref = model(**kw)
    assert "select" in dm.programs.epilogue.code
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-5)
    assert rel_error(out.last_hidden_state, ref.last_hidden_state, kw) <= 1e-4


def test_last_token_logits_run_in_the_epilogue():
    """logits_to_keep=1 slices the last token after the last attention: not refused, run
    where the outputs are gathered; a setting like it is baked into its own capture."""
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess")
    for n in (1, 9, 30):
        kw = inputs("llama", 2, n)
        out = dm(**kw, logits_to_keep=1)
        with torch.no_grad():
            ref = model(**kw, use_cache=False, logits_to_keep=1).logits
        assert out.logits.shape == ref.shape == (2, 1, 128)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert "slice" in dm.programs.epilogue.code
    full = dm(**inputs("llama", 2, 9))
    assert full.logits.shape == (2, 9, 128) and dm.compiled.counts["lower.exchanges"] == 2
    assert "slice" not in dm.programs.epilogue.code       # the latest call's capture: all logits


def _svg_pixels(dot_file, tmp_path) -> tuple[float, float, str]:
    """Render with graphviz (installed by .ci/run; `apt-get install graphviz` elsewhere)."""
    exe = shutil.which("dot")
    assert exe, "graphviz's `dot` is needed to render the dumps: apt-get install graphviz"
    svg = subprocess.run([exe, "-Tsvg", str(dot_file)], capture_output=True, text=True,
                         check=True).stdout
    w, h = (float(x) for x in re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg).groups())
    return w * 96 / 72, h * 96 / 72, html.unescape(svg)       # points -> CSS pixels


def test_pictures_of_a_32_layer_model_fit_one_screen_and_say_what_runs_where(tmp_path):
    """The role graph folds equal stages ("x 30 layers") and the Plan reads like the seed
    figure; both render under 2,000 x 2,000 pixels with their labels."""
    fxdisagg.compile(tiny_model("llama", layers=32), 2, 2, example_inputs=inputs("llama", 1, 12),
                     launch="inprocess", dump_dir=tmp_path)
    d = tmp_path / "capture0"
    w, h, svg = _svg_pixels(d / "roles.dot", tmp_path)
    assert w < 2000 and h < 2000, (w, h)
    for label in ("2 CompNodes, stages 1-31 (× 31 layers)", "2 × 2 AttnNodes, layers 1-31",
                  "partial attention", "expsum-merge, O-proj, RMSNorm, MLP (SiLU), RMSNorm, "
                  "h → q,k,v, RoPE", "LM head", "epilogue"):
        assert label in svg, label
    w, h, svg = _svg_pixels(d / "plan.dot", tmp_path)
    assert w < 2000 and h < 2000, (w, h)
    for label in ("R-sharding", "2 CompNodes", "2 × 2 AttnNodes", "CompNode 1", "AttnNode (1, 0)",
                  "q [1, 3, 5, 7, 9, 11]", "k [0, 2, 4, 6, 8, 10]", "B / layer", "Token indices"):
        assert label in svg, label


@pytest.mark.parametrize("family, middle, last", [
    ("llama", "expsum-merge, O-proj, RMSNorm, MLP (SiLU), RMSNorm, h → q,k,v, RoPE",
     "expsum-merge, O-proj, RMSNorm, MLP (SiLU), RMSNorm, LM head"),
    ("gpt2", "expsum-merge, O-proj, LayerNorm, MLP, LayerNorm, h → q,k,v",
     "expsum-merge, O-proj, LayerNorm, MLP, LayerNorm, LM head"),
    ("bert", "expsum-merge, O-proj, LayerNorm, MLP (GELU), LayerNorm, h → q,k,v",
     "expsum-merge, O-proj, LayerNorm, MLP (GELU), LayerNorm"),
])
def test_stage_summaries_name_what_each_compnode_stage_computes(family, middle, last):
    dm = fxdisagg.compile(tiny_model(family, layers=3), 1, 2, example_inputs=inputs(family, 1, 9),
                          launch="inprocess")
    words = comp_stage_summaries(dm.programs)
    assert words[0].startswith("Embedding, ") and words[0].endswith(middle.split("RMSNorm, ")[-1]
                                                                      .split("LayerNorm, ")[-1])
    assert words[1:3] == [middle, middle] and words[3] == last
