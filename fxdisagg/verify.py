"""verify=True: run the unmodified model beside the disaggregated one, layer by layer.

On the first call of each capture, `verify_call` runs the call twice more with every layer's
hidden state as an output: once on the model as the user gave it, once disaggregated by a
probe model that shares the workers (a capture of its own, made while the model's config
says ``output_hidden_states=True``: HF 5 takes that flag through ``**kwargs``, which
``torch.export`` cannot bind dynamic shapes for). The hidden states are compared in layer
order, over the tokens the attention mask keeps, relative to each layer's scale; the first
layer out of tolerance raises `VerifyError` naming it, so a wrong answer points at the
layer that went wrong rather than at the logits many layers later.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from fxdisagg.errors import VerifyError

#: relative tolerance per dtype: the error of one fp32 / fp16 / bf16 forward of a small model
#: measured against fp64 is far below these (tests/test_models.py)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 5e-2}


def verify_call(dm, kwargs: dict, tolerance: float | None) -> None:
    """Raise `VerifyError` at the first layer whose hidden state differs from the unmodified
    model's by more than ``tolerance`` (None: `TOLERANCE` by dtype)."""
    from fxdisagg.api import DisaggregatedModel
    config = dataclasses.replace(dm.config, verify=False, dump_dir=None)
    probe = DisaggregatedModel(dm.model, config, workers=dm._workers)   # once per capture
    with _hidden_states_on(dm.model), torch.no_grad():
        ref = dm.model(**({**kwargs, "use_cache": False} if _takes_use_cache(dm.model) else kwargs))
        ours = probe(**kwargs)
    ref_states, our_states = _states(ref), _states(ours)
    if ref_states is None or our_states is None:
        raise VerifyError(f"verify: {type(dm.model).__name__} returned no hidden_states with "
                          f"output_hidden_states=True; verify compares layers and needs them")
    keep = _kept_tokens(kwargs)
    for layer, (a, b) in enumerate(zip(our_states, ref_states)):
        tol = tolerance if tolerance is not None else TOLERANCE.get(b.dtype, 1e-4)
        err, where = _relative_error(a, b, keep)
        if not err <= tol:
            raise VerifyError(_message(dm, layer, len(ref_states), err, tol, b.dtype, where))


@contextlib.contextmanager
def _hidden_states_on(model):
    config = model.config
    before = getattr(config, "output_hidden_states", False)
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = before


def _takes_use_cache(model) -> bool:
    import inspect
    return "use_cache" in inspect.signature(model.forward).parameters


def _states(out):
    states = getattr(out, "hidden_states", None)
    return tuple(states) if states else None


def _kept_tokens(kwargs) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _relative_error(ours: torch.Tensor, ref: torch.Tensor, keep) -> tuple[float, tuple]:
    """Max |ours - ref| over kept tokens divided by max |ref| there, and where (row, token)."""
    diff = (ours.double() - ref.double()).abs().amax(dim=-1)      # [B, N]
    scale = ref.double().abs().amax(dim=-1)
    if keep is not None and keep.shape == diff.shape:
        diff, scale = diff.masked_fill(~keep, 0), scale.masked_fill(~keep, 0)
    worst = int(diff.argmax())
    err = float(diff.flatten()[worst] / scale.max().clamp_min(1e-30))
    if torch.isnan(ours).any():
        err = float("nan")
    return err, divmod(worst, diff.shape[-1])


def _message(dm, layer, count, err, tol, dtype, where) -> str:
    name = "the embeddings" if layer == 0 else f"layer {layer - 1}"
    agree = "" if layer == 0 else (f"; the embeddings{' and layers 0..' + str(layer - 2) if layer > 1 else ''} agree")
    return (f"verify: the hidden state after {name} (hidden_states[{layer}] of {count}) differs "
            f"from the unmodified model by {err:.2e} relative (tolerance {tol:.0e} for "
            f"{dtype}) at batch row {where[0]}, token {where[1]}{agree}. alpha={dm.alpha}, "
            f"beta={dm.beta}, kernel={dm.config.kernel or 'by device'}; `fxdisagg dump` or "
            f"dump_dir= shows the programs of that layer")


def verify_outputs(name: str, ours, ref, tolerance: float | None) -> None:
    """Each tensor output of ``ours`` against ``ref`` (a graph without HF's hidden states:
    a torch.compile graph against Dynamo's own graph run as traced)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            continue
        tol = tolerance if tolerance is not None else TOLERANCE.get(b.dtype, 1e-4)
        err = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
        if not err <= tol:
            raise VerifyError(f"verify: output {i} of {name} differs from the graph run as traced "
                              f"by {err:.2e} relative (tolerance {tol:.0e} for {b.dtype})")
