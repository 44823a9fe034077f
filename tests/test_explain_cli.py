"""`dm.explain()` and the ``fxdisagg`` command line, checked against the unmodified model
(its nn.Linear weights, its config) and the exchange schedule's own prediction."""

import subprocess
import sys

import torch

import fxdisagg
from fxdisagg.cli import main
from fxdisagg.testing import inputs, tiny_model


def _linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_explain_names_every_site_its_mask_the_bytes_and_the_work():
    model = tiny_model("mistral", layers=3)           # sliding window 5, GQA 4/2
    dm = fxdisagg.compile(model, 2, 2, example_inputs=inputs("mistral", 2, 12, padding=True),
                          launch="inprocess")
    text = dm.explain()
    assert "Attention sites matched: 3 sdpa" in text
    for layer in range(3):
        assert (f"layer {layer}: 4 query heads, 2 kv heads, head dim 16; mask: causal, "
                f"sliding window 5, key padding; scale 0.25") in text
    assert "stages 1-2: expsum-merge, O-proj, RMSNorm, MLP (SiLU), RMSNorm, h → q,k,v, RoPE" in text
    traffic = dm.expected_traffic(12, batch=2)[0]
    assert (f"dispatch {traffic['dispatch']:,}, return {traffic['return']:,}") in text
    # CompNode 0 holds 6 of 12 tokens: 2 FLOP per weight per token, batch 2
    flops = 2 * _linear_weights(model) * 6 * 2
    assert f"CompNode 0: 6 tokens, {flops / 1e6:.3g} MFLOP in its linears" in text
    # AttnNode (0, 1): 15 causal pairs, 4 FLOP per pair per head and head dim, 3 layers
    assert f"AttnNode (0, 1): 15 causal (query, key) pairs, {15 * 4 * 4 * 16 * 2 * 3 / 1e3:.3g} kFLOP" in text


def test_explain_says_an_encoder_attends_both_ways():
    dm = fxdisagg.compile(tiny_model("bert"), 1, 2, example_inputs=inputs("bert", 1, 9),
                          launch="inprocess")
    assert "mask: bidirectional, key padding" in dm.explain()


def test_cli_explains_and_dumps_a_checkpoint_directory(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    assert main(["explain", "--model", str(tmp_path / "ckpt"), "--tokens", "10"]) == 0
    out = capsys.readouterr()
    assert "LlamaForCausalLM, alpha=2, beta=2" in out.out and "layer 1: 4 query heads" in out.out
    assert "capture, passes and lowering:" in out.err           # progress on stderr
    assert main(["dump", "--model", "gpt2", "--alpha", "1", "--beta", "2",
                 "--out", str(tmp_path / "d")]) == 0
    d = tmp_path / "d" / "capture0"
    assert (d / "roles.svg").exists() and (d / "plan.svg").exists() and (d / "program_attn.py").exists()


def test_cli_help_lists_the_commands_and_bad_models_are_named():
    out = subprocess.run([sys.executable, "-m", "fxdisagg.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("demo", "plan", "explain", "dump"):
        assert cmd in out
    bad = subprocess.run([sys.executable, "-m", "fxdisagg.cli", "explain", "--model", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "neither a family" in bad.stderr


def test_cli_plan_prints_the_cost_table_and_the_grid_it_picks(capsys):
    assert main(["plan", "--seq", "4096", "--devices", "8", "--hw", "h200"]) == 0
    out = capsys.readouterr().out
    assert "8 x H200 SXM" in out and "ring (zigzag) on 8" in out and "Ulysses on 8" in out
    picked = [line for line in out.splitlines() if line.endswith("<- picked")]
    assert len(picked) == 1 and picked[0].lstrip().startswith("fxdisagg (")


def test_cli_demo_is_the_main_job_and_exact(capsys):
    assert main(["demo", "--launch", "inprocess", "--tokens", "32", "--alpha", "1", "--beta", "2"]) == 0
    out = capsys.readouterr().out
    assert "(equal to the prediction)" in out and "DIFFERENT" not in out
    assert "launch=inprocess: max |ours - model| / max |model| =" in out
