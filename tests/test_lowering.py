"""The lowering and the runtime's structure: effectful collectives, staged programs whose
every stage re-traces with its own token symbols, stage labels, one frozen config, bounded
per-length state, and workers that never import the user's script."""

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx

import fxdisagg
from fxdisagg.config import Config
from fxdisagg.errors import ConfigError
from fxdisagg.ir import OPS, STAGE
from fxdisagg.stages import propagate
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


def test_collectives_are_effectful_so_dce_keeps_them():
    g = fx.Graph()
    x = g.placeholder("x")
    start = g.call_function(OPS.exchange_start, ([x], 0, "dispatch"))
    wait = g.call_function(OPS.exchange_wait, (start, [], 0, "dispatch", ""))
    g.output(None)
    assert start.is_impure() and wait.is_impure()
    g.eliminate_dead_code()
    assert [n.target for n in g.nodes if n.op == "call_function"] == [OPS.exchange_start, OPS.exchange_wait]


def test_exchange_wait_fake_sizes_pieces_from_the_row_inputs():
    from torch._subclasses.fake_tensor import FakeTensorMode
    pieces = "q:float32[b2,4,*,16]@query k_valid:bool[b2,*]@key"
    with FakeTensorMode():
        handle = torch.empty((), dtype=torch.int64)
        q, valid = OPS.exchange_wait(handle, [torch.empty(5), torch.empty(3)], 0, "dispatch", pieces)
    assert q.shape == (2, 4, 5, 16) and q.dtype == torch.float32
    assert valid.shape == (2, 3) and valid.dtype == torch.bool


def test_compile_steps_pause_the_garbage_collector_and_restore_it():
    import gc
    from fxdisagg.pipeline import gc_paused
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with pytest.raises(ValueError):
                with gc_paused():
                    assert not gc.isenabled()
                    raise ValueError("a failing pass")
            assert gc.isenabled() == enabled
    finally:
        gc.enable()


def _symbols(v) -> set:
    return {s for d in getattr(v, "shape", ()) if isinstance(d, torch.SymInt)
            for s in d.node.expr.free_symbols}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_fake_propagation_runs_over_every_stage_of_every_role_program(family):
    dm = fxdisagg.compile(tiny_model(family, layers=3), 2, 2,
                          example_inputs=inputs(family, 2, 9), launch="inprocess")
    programs = dm.programs
    captured = dm.compiled.captured.gm
    for program in (programs.comp, programs.attn):
        for node in program.graph.nodes:          # clear: propagation must write it all again
            node.meta.pop("val", None)
        propagate(program, captured)
    stages = dict(programs.comp.named_children())
    assert len(stages) == 4
    tokens = next(n for n in programs.comp.graph.nodes if n.target == "tokens")
    (local,) = _symbols(tokens.meta["val"])
    for name, stage in stages.items():
        for node in stage.graph.nodes:
            if node.op != "output":
                assert "val" in node.meta, f"{name}: {node.name} has no val"
        if name != "stage_0":                      # after the prologue: only local tokens
            syms = set().union(*(_symbols(n.meta["val"]) for n in stage.graph.nodes
                                 if isinstance(n.meta.get("val"), torch.Tensor)))
            assert syms <= {local}, f"{name} mentions {syms}, not only the local count {local}"
    tile = [n for n in programs.attn.graph.nodes if n.name.startswith("tile_")][0]
    q, k = tile.meta["val"][0], tile.meta["val"][3]
    assert _symbols(q) and _symbols(k) and _symbols(q) != _symbols(k)   # Mq and Mk


def test_stage_is_the_number_of_merges_upstream():
    """The O-projection of attention 0 and the q/k/v of attention 1 run in stage 1; the
    q/k/v of attention 0 in stage 0 (meta["fxdisagg.layer"] used to mislabel them)."""
    dm = fxdisagg.compile(tiny_model("llama", layers=2), 1, 2,
                          example_inputs=inputs("llama", 1, 9), launch="inprocess")
    stages = dict(dm.programs.comp.named_children())
    linears = {s: [n for n in g.graph.nodes if n.target is torch.ops.aten.linear.default]
               for s, g in stages.items()}
    # stage 0: q, k, v of attention 0; stage 1: O-proj 0, MLP (3), q, k, v of attention 1;
    # stage 2: O-proj 1, MLP (3), lm_head
    assert [len(linears[s]) for s in ("stage_0", "stage_1", "stage_2")] == [3, 7, 5]
    for s, nodes in linears.items():
        assert all(n.meta[STAGE] == int(s[-1]) for n in nodes)


def test_config_is_frozen_validated_and_shared():
    c = Config(alpha=2, beta=3)
    assert c.world == 11
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.alpha = 3
    for bad in (dict(alpha=0), dict(sharding="x"), dict(launch="mpi"), dict(kernel="cuda"),
                dict(timeout=0), dict(tp=0), dict(max_len=-1)):
        with pytest.raises(ConfigError):
            Config(**bad)
    with pytest.raises(ConfigError, match="unknown options"):
        fxdisagg.compile(tiny_model("llama"), 1, 1, launch="inprocess", speed=11)
    dm = fxdisagg.compile(tiny_model("llama"), 2, 2, launch="inprocess", timeout=9)
    assert dm.config == Config(2, 2, launch="inprocess", timeout=9)


def _cache_sizes(worker):
    return len(worker.plans), len(worker.schedules)


def test_per_length_state_is_bounded_in_driver_and_workers():
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 2, 1, example_inputs=inputs("llama", 1, 8), launch="inprocess",
                          cache_size=3)
    with dm:
        for n in range(1, 12):
            kw = inputs("llama", 1, n)
            assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= 1e-4
        assert len(dm._plans) <= 3
        for rank in range(dm.config.world):
            assert max(dm.runtime.call(rank, _cache_sizes)) <= 3


SCRIPT = """
import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model
model = tiny_model("llama")
kw = inputs("llama", 1, 9)
dm = fxdisagg.compile(model, 1, 1, example_inputs=kw, launch="spawn", timeout=60)
print("error", rel_error(dm(**kw)[0], reference(model, kw), kw))
dm.close()
"""


def test_a_script_without_main_guard_runs_on_spawned_workers(tmp_path):
    """Workers start from fxdisagg's entry point, not by re-running the user's script."""
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("error") == 1            # the script body ran once, in the caller
    assert float(proc.stdout.split()[-1]) <= 1e-4


def _raise_in_worker(worker):
    raise ValueError("the worker's own message")


def test_a_failing_worker_s_own_message_reaches_the_caller():
    dm = fxdisagg.compile(tiny_model("llama"), 1, 1, launch="inprocess")
    with dm:
        dm(**inputs("llama", 1, 5))
        with pytest.raises(fxdisagg.WorkerError, match="ValueError: the worker's own message"):
            dm.runtime.call(1, _raise_in_worker)


def test_capture_takes_the_length_limit_the_model_code_guards():
    """BERT's position table holds 512 positions; asked for 4096, the capture retries with
    the bound torch.export proposes and says so (issue 11, capture range)."""
    model = tiny_model("bert")
    dm = fxdisagg.compile(model, 2, 2, example_inputs=inputs("bert", 2, 12), launch="inprocess",
                          max_len=4096)
    assert dm.compiled.captured.max_len == 512
    assert "allows at most 512 tokens" in dm.explain()
    kw = inputs("bert", 2, 512)
    assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= 1e-4
    with pytest.raises(fxdisagg.InputError, match="the model's code allows at most 512 tokens"):
        dm(**inputs("bert", 2, 513))


def test_capture_steps_below_a_bound_the_model_code_excludes():
    """GPT-Neo slices its 2048-position causal buffer to N, and export guards N != 2048
    without proposing a bound: the capture takes the bound the guard names, less one, and
    says so; the captured program computes what the model does at that length."""
    import transformers as tf
    from fxdisagg.capture import capture

    torch.manual_seed(0)
    config = tf.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                             window_size=8, attention_types=[[["global", "local"], 1]],
                             max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
    model = tf.GPTNeoForCausalLM._from_config(config, attn_implementation="eager").eval()
    cap = capture(model, inputs("gpt2", 1, 12), max_len=2048)
    assert cap.max_len == 2047
    assert any("allows at most 2047 tokens" in note for note in cap.notes)
    kw = inputs("gpt2", 1, 2047)
    with torch.no_grad():
        out = cap.gm(kw["input_ids"])[0]
    assert rel_error(out, reference(model, kw), kw) <= 1e-5


def test_the_pipelines_graph_runs_and_its_code_follows_the_rewrites():
    """run_passes leaves code generation to the first run or read of the result; both see
    the rewritten graph, and running it matches the unmodified model."""
    from fxdisagg.api import PASSES
    from fxdisagg.capture import capture
    from fxdisagg.pipeline import PassContext, run_passes

    model = tiny_model("llama")
    kw = inputs("llama", 1, 12)
    cap = capture(model, kw, max_len=64)
    gm = run_passes(cap.gm, PASSES, PassContext(seq=cap.seq, config=Config(alpha=2, beta=2)))
    with torch.no_grad():
        out = gm(kw["input_ids"])[0]
    assert rel_error(out, reference(model, kw), kw) < 1e-5
    assert "partial_attention" in gm.code and "scaled_dot_product" not in gm.code
