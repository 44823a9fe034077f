"""Dumps are complete when on, and the role programs read as the design says."""

import json

import torch

import fxdisagg
from fxdisagg.testing import inputs, rel_error, tiny_model


def test_dump_dir_writes_every_pass_programs_and_plan(tmp_path):
    dm = fxdisagg.compile(tiny_model("llama"), 2, 2, example_inputs=inputs("llama", 1, 12),
                          launch="inprocess", dump_dir=tmp_path)
    names = ["find_attention", "fold_repeat_kv", "classify_masks", "split_attention", "partition"]
    timings = (tmp_path / "passes.txt").read_text()
    for i, name in enumerate(names):
        assert (tmp_path / f"{i:02d}_{name}.before.py").exists()
        assert (tmp_path / f"{i:02d}_{name}.after.py").exists()
        assert name in timings
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["comp_tokens"][0] == [0, 1, 4, 5, 8, 9]
    assert "cluster_attn" in (tmp_path / "roles.dot").read_text()
    assert "AttnNode (0,1)" in (tmp_path / "plan.dot").read_text()
    assert dm.counts["insert_collectives.dispatch"] == 2


def test_dump_environment_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDISAGG_DUMP_DIR", str(tmp_path))
    fxdisagg.compile(tiny_model("gpt2"), 1, 2, example_inputs=inputs("gpt2", 1, 9), launch="inprocess")
    assert (tmp_path / "program_comp.py").exists()


def test_role_programs_show_one_dispatch_and_combine_per_layer():
    dm = fxdisagg.compile(tiny_model("llama", layers=3), 2, 2, example_inputs=inputs("llama", 1, 9),
                          launch="inprocess")
    comp = dm.programs.comp.code
    attn = dm.programs.attn.code
    assert comp.count("fxdisagg.dispatch.default(") == 3 and comp.count("fxdisagg.combine.default(") == 3
    for layer in range(3):
        assert comp.count(f"\n    dispatch_layer{layer} = torch.ops.fxdisagg.dispatch") == 1
        assert comp.count(f"\n    combine_layer{layer} = torch.ops.fxdisagg.combine") == 1
        assert attn.count(f"\n    receive_layer{layer} = torch.ops.fxdisagg.receive") == 1
    assert "scaled_dot_product" not in comp and "softmax" not in comp
    assert not list(dm.programs.attn.parameters()), "AttnNodes hold no weights"
    assert "index_select" in comp  # prologue values localised to the CompNode's tokens


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
    assert full.logits.shape == (2, 9, 128) and len(dm._compiled) == 2
