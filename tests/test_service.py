"""A compiled model behind a service: concurrent callers, inputs as HF accepts them."""

import threading

import pytest
import torch

import fxdisagg
from fxdisagg.errors import InputError
from fxdisagg.testing import inputs, reference, rel_error, tiny_model

FP32_TOL = 1e-4


@pytest.mark.parametrize("launch", ["inprocess", "spawn"])
def test_concurrent_callers_each_get_their_own_exact_answer(launch):
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 2, 2, example_inputs=inputs("llama", 1, 16), launch=launch,
                          timeout=60)
    results, errors = {}, []

    def call(n):
        try:
            kw = inputs("llama", 1, n, seed=n)
            results[n] = rel_error(dm(**kw)[0], reference(model, kw), kw)
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    with dm:
        for _ in range(2):
            threads = [threading.Thread(target=call, args=(n,)) for n in (20, 33, 47)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert sorted(results) == [20, 33, 47] and max(results.values()) <= FP32_TOL, results


def test_missing_optional_inputs_get_hf_defaults():
    """Compiled with an attention mask, called without one: HF's answer (all ones)."""
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 2, 2, example_inputs=inputs("llama", 2, 12, padding=True),
                          launch="inprocess")
    with dm:
        kw = inputs("llama", 2, 9)                 # no attention_mask
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL
        padded = inputs("llama", 2, 9, padding=True)
        assert rel_error(dm(**padded)[0], reference(model, padded), padded) <= FP32_TOL


@pytest.mark.parametrize("bad, match", [
    (lambda ids: ids.float(), "integer token ids"),
    (lambda ids: ids + 1000, "outside the vocabulary"),
    (lambda ids: ids - 1000, "outside the vocabulary"),
])
def test_ids_hf_rejects_are_refused_before_any_worker_runs(bad, match):
    dm = fxdisagg.compile(tiny_model("llama"), 1, 1, example_inputs=inputs("llama", 1, 9),
                          launch="spawn")
    with pytest.raises(InputError, match=match):
        dm(input_ids=bad(inputs("llama", 1, 9)["input_ids"]))
    assert dm.runtime is None, "no worker was started for a call that cannot run"


INTERRUPT_SCRIPT = """
import os, signal, threading, time
import fxdisagg
from fxdisagg.testing import inject_delay, inputs, reference, rel_error, tiny_model
model = tiny_model("llama", layers=4, hidden=128)
dm = fxdisagg.compile(model, 2, 2, example_inputs=inputs("llama", 1, 16), launch="{launch}", timeout=60)
kw = inputs("llama", 1, 40)
dm(**inputs("llama", 1, 9))                      # workers up
dm.runtime.call(2, inject_delay, 1, 3.0)         # AttnNode (0, 0) stalls 3 s at layer 1
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    dm(**kw)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
print("error", rel_error(dm(**kw)[0], reference(model, kw), kw))
dm.close()
print("children", len([p for p in os.listdir("/proc") if p.isdigit() and
      open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())
      and b"resource_tracker" not in open(f"/proc/{{p}}/cmdline", "rb").read()]))
"""


@pytest.mark.parametrize("launch", ["inprocess", "spawn"])
def test_ctrl_c_during_a_call_leaves_a_usable_model_and_no_process(launch, tmp_path):
    import subprocess
    import sys
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT.format(launch=launch))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.split("\n")
    assert out[0] == "interrupted", proc.stdout
    assert float(out[1].split()[1]) <= FP32_TOL
    assert out[2] == "children 0", proc.stdout


@pytest.mark.parametrize("fault, message, survivors", [
    ("raise", "failed at layer 1: RuntimeError: injected fault", [0, 1, 2, 3, 4]),
    ("die", "failed at layer 1: its process stopped without an error report", [0, 1, 3, 4]),
])
def test_torchrun_ranks_fail_together_naming_the_failed_rank(tmp_path, fault, message, survivors):
    """A rank that raises, or whose process is killed, makes every other rank raise a
    WorkerError naming it within the call, not the process group's timeout (60 s here),
    and the job exits non-zero. A killed rank writes no report; torchrun's agent sends
    SIGTERM to the others ~0.1 s after the death, which they turn into that error."""
    import re
    from pathlib import Path
    from fxdisagg.testing import torchrun
    script = Path(__file__).resolve().parent / "torchrun_fail_together.py"
    proc, reports = torchrun(script, 5, tmp_path, timeout=240, env={"FXDISAGG_FAULT": fault})
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert sorted(reports) == survivors, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank, text in reports.items():
        raised = re.fullmatch(r"raised after ([0-9.]+) s: (.*)", text)
        assert raised, f"rank {rank}: {text}"
        seconds, first = raised.groups()
        assert f"AttnNode (0, 1) (rank 2) {message}" in first, first
        assert float(seconds) < 20, f"rank {rank} took {seconds} s"


def test_concurrent_generations_each_match_hf():
    """Two threads generate at once on one model: steps interleave on the same workers,
    each generation has its own KV cache and gets HF's tokens."""
    model = tiny_model("llama")
    prompts = {n: inputs("llama", 1, n, seed=n) for n in (9, 14)}
    options = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = {n: model.generate(**kw, **options) for n, kw in prompts.items()}
    results, errors = {}, []

    def run(n):
        try:
            results[n] = dm.generate(**prompts[n], **options)
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    with fxdisagg.compile(model, 1, 2, launch="inprocess") as dm:
        threads = [threading.Thread(target=run, args=(n,)) for n in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    for n in prompts:
        assert torch.equal(results[n], expected[n]), n


def test_heartbeat_names_a_peer_whose_pulse_stopped(monkeypatch):
    """Two ranks' pulses in one store: while both beat nobody is dead; once rank 1 stops,
    rank 0 names it, with the layer of its last pulse."""
    import torch.distributed as dist
    from fxdisagg.runtime import heartbeat
    monkeypatch.setattr(heartbeat, "PERIOD", 0.02)
    monkeypatch.setattr(heartbeat, "STALE", 0.3)
    store = dist.HashStore()
    mine = heartbeat.Heartbeat(store, 0, 2)
    peer = heartbeat.Heartbeat(store, 1, 2, layer=lambda: 3)
    try:
        assert mine.wait_for_dead(within=0.6) is None
        peer.stop()
        assert mine.wait_for_dead(within=1.0) == (1, 3)
    finally:
        mine.stop()
        peer.stop()
