"""Tensor-parallel CompNodes (``tp=2``): Megatron's column/row split with two all-reduces
per layer, exact against the unmodified model (fp32), weights really split, exchange bytes
per rank divided by tp, on the three runtimes."""

import pathlib

import pytest
import torch

import fxdisagg
from fxdisagg.errors import ConfigError
from fxdisagg.pictures import roles_dot
from fxdisagg.runtime.layout import RankLayout
from fxdisagg.schedule import DISPATCH, Schedule
from fxdisagg.tensor_parallel import ROWWISE, _linear, _planned
from fxdisagg.testing import inputs, reference, rel_error, tiny_model, torchrun

FP32_TOL = 1e-4
ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])   # GQA; fused Conv1D qkv; qkv bias
@pytest.mark.parametrize("alpha, tp, beta", [(1, 2, 1), (2, 2, 2)])
def test_tensor_parallel_is_exact(family, alpha, tp, beta):
    model = tiny_model(family)
    kw = inputs(family, 2, 13, padding=True)
    with fxdisagg.compile(model, alpha, beta, tp=tp, launch="inprocess", example_inputs=kw) as dm:
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL
        assert dm.traffic == dm.expected_traffic(13, batch=2)


def test_phi3_fused_qkv_and_gate_up_are_split_per_head():
    """Phi-3 fuses q, k, v (GQA: sections of 4 and 2 heads) and gate, up: each section is
    split alike, and the attention's copy learns its local head counts."""
    import transformers as tf
    torch.manual_seed(0)
    config = tf.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = tf.Phi3ForCausalLM(config).eval()
    kw = inputs("llama", 2, 13, padding=True)
    with fxdisagg.compile(model, 2, 2, tp=2, launch="inprocess", example_inputs=kw) as dm:
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL
    assert model.model.layers[0].self_attn.config.num_attention_heads == 4   # the user's model


@pytest.mark.parametrize("model_type, extra", [("qwen3", dict(num_key_value_heads=2, head_dim=16)),
                                               ("gpt_neox", dict())])
def test_hf_plans_that_keep_some_modules_whole(model_type, extra):
    """HF's plans also name modules fxdisagg keeps whole on every rank, which is exact:
    Qwen3's per-head q/k norms ("replicated_with_grad_allreduce"), GPT-NeoX's embedding
    ("embedding_rowwise"; its fused per-head qkv is split as HF's "colwise")."""
    import transformers as tf
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, **extra)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    kw = inputs("llama", 2, 12, padding=True)
    with fxdisagg.compile(model, 1, 1, tp=2, launch="inprocess", example_inputs=kw) as dm:
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL


def _reductions_per_stage(program) -> list[int]:
    return [sum(n.target is torch.ops.fxdisagg.tp_all_reduce.default for n in stage.graph.nodes)
            for _, stage in sorted(program.named_children(), key=lambda kv: int(kv[0].split("_")[1]))]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_all_reduces_per_layer_and_split_weights(family):
    """One all-reduce after the O-projection and one after the MLP of every layer; each TP
    rank holds 1/tp of the planned linears (row-parallel biases are added once, whole)."""
    model = tiny_model(family, layers=3)
    kw = inputs(family, 2, 9, padding=True)
    with fxdisagg.compile(model, 1, 1, launch="inprocess", example_inputs=kw) as whole, \
            fxdisagg.compile(model, 1, 1, tp=2, launch="inprocess", example_inputs=kw) as split:
        whole(**kw), split(**kw)
        programs = split._latest().programs
        assert _reductions_per_stage(programs.comp) == [0, 2, 2, 2]
        assert all(_reductions_per_stage(programs.comp_for(t)) == [0, 2, 2, 2] for t in (0, 1))
        words = roles_dot(programs, 1, 1)
        assert "1 CompNode × 2 TP ranks" in words and "O-proj, all-reduce" in words
        text = split.explain()
        assert "tp=2" in text and "(2 TP ranks: 1/2 each)" in text and "all-reduce " in text
        planned = sum(_linear(m)[0].numel() * 4 + (0 if s == ROWWISE or m.bias is None else m.bias.numel() * 4)
                      for _, m, s in _planned(model))
        full, ranks = whole.memory[0]["params"], split.memory
        assert ranks[0]["params"] == ranks[1]["params"] == full - planned // 2
        assert ranks[2]["params"] == 0                       # the AttnNode holds no weights


def test_exchange_bytes_per_rank_drop_by_tp():
    """Each TP rank sends only its heads: q, k and v bytes per rank are 1/tp of a whole
    CompNode's; positions and validity travel once, from TP rank 0. Measured = schedule."""
    model = tiny_model("llama")
    kw = inputs("llama", 2, 12, padding=True)
    sent = {}
    for tp in (1, 2):
        with fxdisagg.compile(model, 1, 2, tp=tp, launch="inprocess", example_inputs=kw) as dm:
            dm(**kw)
            sent[tp] = [dm.runtime.call(r, _dispatch_sent, 0) for r in range(tp)]
            schedule = Schedule.build(dm.plan, RankLayout(1, 2, tp), dm._latest().programs.layers)
            assert sent[tp] == [schedule.exchanges[(0, DISPATCH)].send_bytes(r) for r in range(tp)]
    features = sent[2][0] - sent[2][1]              # rank 0's extra: the per-token pieces
    assert features > 0 and sent[2][1] * 2 + features == sent[1][0]


def _dispatch_sent(worker, layer):
    return worker.transport.sent[(layer, DISPATCH)]


def test_generation_is_token_identical_with_tp():
    model = tiny_model("llama")
    kw = inputs("llama", 2, 11, padding=True)
    options = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                   output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**kw, **options)
    with fxdisagg.compile(model, 1, 2, tp=2, launch="inprocess") as dm:
        ours = dm.generate(**kw, **options)
    assert torch.equal(ours.sequences, ref.sequences)
    assert max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(ours.logits, ref.logits)) <= FP32_TOL


def test_spawned_tensor_parallel_workers():
    model = tiny_model("qwen2")
    kw = inputs("qwen2", 2, 10, padding=True)
    with fxdisagg.compile(model, 2, 2, tp=2, launch="spawn", example_inputs=kw) as dm:
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL
        assert dm.traffic == dm.expected_traffic(10, batch=2)


def test_torchrun_tensor_parallel(tmp_path):
    proc, reports = torchrun(ROOT / "tests" / "torchrun_tensor_parallel.py", 6, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(reports) == set(range(6))
    err, same, params = reports[0].split()
    assert float(err) <= FP32_TOL and same == "True"
    assert all(r.split()[1] == "True" for r in reports.values())       # every rank generated
    assert reports[0].split()[2] == reports[1].split()[2] != "0"       # both TP ranks hold weights


@pytest.mark.parametrize("tp", [3, 4])
def test_a_tp_that_divides_nothing_is_refused(tp):
    """4 query heads, 2 kv heads: only tp 1 and 2 split them evenly."""
    with pytest.raises(ConfigError, match=rf"tp={tp} does not divide .* tp in \[1, 2\] work"):
        fxdisagg.compile(tiny_model("llama"), 1, 1, tp=tp, launch="inprocess")


def test_a_family_without_a_plan_is_refused():
    with pytest.raises(ConfigError, match="needs a tensor-parallel plan for BertModel"):
        fxdisagg.compile(tiny_model("bert"), 1, 1, tp=2, launch="inprocess")
