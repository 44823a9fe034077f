"""Typed errors. Every message says where (pass, node, op, layer), what was expected
versus what was found, and what the user can do about it. Tensors are described by
shape/dtype/device, never printed."""

from __future__ import annotations


class FxDisaggError(Exception):
    """Base class of every error fxdisagg raises on purpose."""


class ConfigError(FxDisaggError, ValueError):
    """Invalid compile options: alpha, beta, tp, sharding, launch, kernel."""


class InputError(FxDisaggError, ValueError):
    """Call inputs outside what the capture allowed (names, dtypes, batch, length)."""


class InferenceOnlyError(FxDisaggError):
    """fxdisagg compiles inference programs; training mode or requires_grad inputs are refused."""


class CaptureError(FxDisaggError):
    """torch.export could not capture the model."""


class PatternError(FxDisaggError):
    """An attention-like pattern that does not match a supported spelling exactly."""


class UnsupportedMaskError(FxDisaggError):
    """An attention mask that cannot be classified into per-token features."""


class TokenLocalityError(FxDisaggError):
    """An op on a CompNode scans, reduces or mixes over a sequence dimension."""


class PassError(FxDisaggError):
    """A pass failed; carries the pass name and the passes already run."""


class KernelError(FxDisaggError, ValueError):
    """Bad arguments to a kernel: shapes, dtypes, devices, backend."""


class VerifyError(FxDisaggError):
    """verify=True found a layer whose hidden state differs from the unmodified model's."""


class WorkerError(FxDisaggError):
    """A worker (CompNode or AttnNode) raised or died; names rank, role and layer."""


FxDisaggWorkerError = WorkerError


def describe(t) -> str:
    """Shape/dtype/device of a tensor, for error messages (never its values)."""
    try:
        return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    except AttributeError:
        return repr(t)
