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
