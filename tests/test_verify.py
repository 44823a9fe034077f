"""verify=True: the unmodified model runs beside ours on the first call of each capture and
the first layer whose hidden state is out of tolerance is named."""

import pytest

import fxdisagg
import fxdisagg.verify
from fxdisagg import api
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_verify_passes_on_a_correct_compile_once_per_capture(family, monkeypatch):
    model = tiny_model(family)
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess", verify=True)
    runs = []
    real = fxdisagg.verify.verify_call
    monkeypatch.setattr(fxdisagg.verify, "verify_call", lambda *a: runs.append(1) or real(*a))
    for n in (20, 9):
        kw = inputs(family, 2, n, padding=True)
        if family == "llama":
            kw["use_cache"] = False      # HF's own flags pass through the reference run too
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= 1e-4
    assert runs == [1], "verify runs on the first call of the capture only"
    assert not model.config.output_hidden_states, "the model's config is restored"


class _WrongLayer1(api.DisaggregatedModel):
    """Compiles programs whose layer-1 MLP is off, as a bug in a pass would make them."""

    def _compile(self, *args, **kwargs):
        compiled = super()._compile(*args, **kwargs)
        for name, p in compiled.programs.comp.named_parameters():
            if "layers.1.mlp.down_proj" in name:
                p.data += 0.05
        return compiled


def test_verify_names_the_first_layer_that_differs(monkeypatch):
    model = tiny_model("llama", layers=3)
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess", verify=True)
    monkeypatch.setattr(api, "DisaggregatedModel", _WrongLayer1)   # the probe verify builds
    with pytest.raises(fxdisagg.VerifyError, match=r"after layer 1 \(hidden_states\[2\] of 4\)"
                       r".*tolerance 1e-04 for torch.float32.*layers 0..0 agree"):
        dm(**inputs("llama", 2, 16, padding=True))


def test_verify_takes_a_tolerance_and_refuses_nonsense():
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 1, 2, launch="inprocess", verify=1e-12)
    with pytest.raises(fxdisagg.VerifyError, match="tolerance 1e-12"):
        dm(**inputs("llama", 1, 12))
    with pytest.raises(fxdisagg.ConfigError, match="verify must be"):
        fxdisagg.compile(model, 1, 2, verify="yes")
