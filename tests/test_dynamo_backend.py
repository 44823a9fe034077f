"""torch.compile(model, backend="fxdisagg"): Dynamo's graphs through the same passes, exact
vs eager (fp32: 1e-4 relative), no recompile per length, graph breaks, shared workers that
stop with the model."""

import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch._dynamo.utils import counters

import fxdisagg
import fxdisagg.dynamo
from fxdisagg.testing import inputs, reference, rel_error, tiny_model

FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _check(compiled, model, family, lengths, batch=2):
    for n in lengths:
        kw = inputs(family, batch, n, padding=True)
        with torch.no_grad():
            out = compiled(**kw)
        assert type(out) is type(reference_output(model, kw)), "the HF output type is kept"
        err = rel_error(out[0], reference(model, kw), kw)
        assert err <= FP32_TOL, f"{family} N={n}: {err:.2e}"


def reference_output(model, kw):
    with torch.no_grad():
        return model(**kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_exact_vs_eager_with_one_graph_for_every_length(family):
    model = tiny_model(family)
    options = {"alpha": 2, "beta": 2, "launch": "inprocess"}
    compiled = torch.compile(model, backend="fxdisagg", options=options)
    _check(compiled, model, family, [12, 20, 33, 7])
    assert counters["stats"]["unique_graphs"] == 1, "one graph serves every length >= 2"
    (graph,) = fxdisagg.dynamo.graphs()
    assert graph.counts["lower.exchanges"] == 2, "both layers' attention is disaggregated"
    assert graph.traffic == graph.expected_traffic(7, 2), "it ran on the AttnNodes"
    assert len(graph._compiled) == 1, "one capture serves every length"


def test_length_one_uses_the_symbolic_graph():
    """Dynamo specialises a length-1 call (one recompile); it runs on the symbolic graph's
    programs, disaggregated, not as traced."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="fxdisagg", options={"alpha": 1, "beta": 2,
                                                                 "launch": "inprocess"})
    _check(compiled, model, "llama", [9, 1])
    assert counters["stats"]["unique_graphs"] == 2
    (graph,) = fxdisagg.dynamo.graphs()
    assert graph.traffic == graph.expected_traffic(1, 2)


def test_spawned_workers_are_shared_and_stop_with_the_model():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="fxdisagg", options={"alpha": 2, "beta": 1})
    _check(compiled, model, "llama", [12, 21, 1])
    (graph,) = fxdisagg.dynamo.graphs()
    pids = graph.runtime.pids
    assert len(pids) == 3
    del compiled, model, graph
    gc.collect()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids), "the workers stop when the model is freed"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class _LogitsToProbs(torch.nn.Module):
    """A graph break after the model: the second graph (a softmax over the vocabulary)
    has no attention and runs as traced."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        torch._dynamo.graph_break()
        return torch.softmax(logits.double(), -1)


def test_graph_break_after_the_model():
    model = tiny_model("llama")
    wrapped = _LogitsToProbs(model).eval()
    compiled = torch.compile(wrapped, backend="fxdisagg", options={"alpha": 2, "beta": 2,
                                                                   "launch": "inprocess"})
    for n in (11, 26):
        kw = inputs("llama", 2, n, padding=True)
        with torch.no_grad():
            ours, ref = compiled(**kw), wrapped(**kw)
        keep = kw["attention_mask"].bool()
        assert (ours[keep] - ref[keep]).abs().max() <= FP32_TOL * ref[keep].abs().max()
    graphs = fxdisagg.dynamo.graphs()
    assert sorted(g.as_traced for g in graphs) == [False, True]


def _break_after_layer_0(model):
    layer = model.model.layers[0]
    forward = layer.forward

    def broken(*args, **kwargs):
        out = forward(*args, **kwargs)
        torch._dynamo.graph_break()
        return out

    layer.forward = broken
    return model


def test_graph_break_inside_the_layer_stack_disaggregates_each_piece(tmp_path):
    """The pieces after the break take hidden states made outside the compiled code; their
    token dims are made dynamic too, and each layer's piece is disaggregated on its own."""
    model = _break_after_layer_0(tiny_model("llama", layers=2))
    compiled = torch.compile(model, backend="fxdisagg", options={"alpha": 2, "beta": 2,
                                                                 "launch": "inprocess",
                                                                 "dump_dir": tmp_path})
    for n in (10, 17, 1, 6):
        kw = inputs("llama", 2, n, padding=False)
        with torch.no_grad():
            out = compiled(**kw)
        assert rel_error(out[0], reference(model, kw), kw) <= FP32_TOL, n
    pieces = [g for g in fxdisagg.dynamo.graphs() if not g.as_traced]
    assert sorted(g.counts["lower.exchanges"] for g in pieces) == [1, 1]
    assert all(g.traffic == g.expected_traffic(6, 2) for g in pieces), "both ran on AttnNodes"
    assert pieces[0]._workers is pieces[1]._workers, "the pieces share one set of workers"
    dumps = sorted(d.name for d in tmp_path.iterdir())
    assert len(dumps) == 2 and all((tmp_path / d / "capture0" / "plan.txt").exists() for d in dumps)
    assert pieces[0].explain().startswith(f"fxdisagg: Dynamo graph {pieces[0].model.graph_id},")


def test_dense_mask_between_pieces_is_refused_with_a_typed_error():
    """A padded batch makes HF pass a dense [B, 1, N, N] mask into the piece after the
    break: a mask fxdisagg can not classify into per-token features is refused, never
    replaced."""
    model = _break_after_layer_0(tiny_model("llama", layers=2))
    compiled = torch.compile(model, backend="fxdisagg", options={"alpha": 2, "beta": 2,
                                                                 "launch": "inprocess"})
    with pytest.raises(fxdisagg.UnsupportedMaskError, match="is not a per-token tensor"):
        with torch.no_grad():
            compiled(**inputs("llama", 2, 10, padding=True))


def test_mode_is_refused_with_a_reason():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="fxdisagg", mode="max-autotune")
    with pytest.raises(Exception, match="mode='max-autotune' is an Inductor setting"):
        with torch.no_grad():
            compiled(**inputs("llama", 1, 8))


def test_tensor_parallelism_is_refused_with_the_way_that_has_it():
    compiled = torch.compile(tiny_model("llama"), backend="fxdisagg", options={"tp": 2})
    with pytest.raises(Exception, match=r"tp > 1 .* use fxdisagg.compile\(model, alpha, beta, tp=...\)"):
        with torch.no_grad():
            compiled(**inputs("llama", 1, 8))


def test_backend_found_in_a_fresh_interpreter_without_import(tmp_path):
    # run outside the checkout: from its root, transformers' probe for the hub package
    # `kernels` would import our kernels/ directory (and with it fxdisagg)
    code = textwrap.dedent("""
        import sys, torch, transformers
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg).eval()
        assert "fxdisagg" not in sys.modules
        compiled = torch.compile(model, backend="fxdisagg",
                                 options={"alpha": 2, "beta": 2, "launch": "inprocess"})
        ids = torch.randint(0, 128, (1, 19))
        with torch.no_grad():
            ours, ref = compiled(input_ids=ids).logits, model(input_ids=ids).logits
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-4, err
        import fxdisagg.dynamo
        assert fxdisagg.dynamo.graphs()[0].counts["lower.exchanges"] == 2
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_verify_option_checks_each_graph_against_its_traced_run():
    model = tiny_model("gpt2")
    compiled = torch.compile(model, backend="fxdisagg", options={"alpha": 2, "beta": 2,
                                                                 "launch": "inprocess",
                                                                 "verify": True})
    _check(compiled, model, "gpt2", [14])
    strict = torch.compile(tiny_model("gpt2"), backend="fxdisagg",
                           options={"launch": "inprocess", "verify": 1e-15, "beta": 2})
    with pytest.raises(Exception, match=r"verify: output \d+ of Dynamo graph .* differs"):
        with torch.no_grad():
            strict(**inputs("gpt2", 2, 14))


def test_dynamic_true_is_refused_with_what_to_do():
    compiled = torch.compile(tiny_model("llama"), backend="fxdisagg", dynamic=True,
                             options={"launch": "inprocess"})
    with pytest.raises(Exception, match="Leave dynamic at its default"):
        with torch.no_grad():
            compiled(**inputs("llama", 2, 9))
