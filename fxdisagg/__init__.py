"""fxdisagg: disaggregated attention for HuggingFace transformers.

    dm = fxdisagg.compile(model, alpha=2, beta=2, example_inputs={"input_ids": ids})
    out = dm(input_ids=ids)

    compiled = torch.compile(model, backend="fxdisagg", options={"alpha": 2, "beta": 2})
    out = compiled(input_ids=ids)          # the backend needs no `import fxdisagg`
"""

from fxdisagg import ops as _graph_ops  # noqa: F401  (registers fxdisagg::attention, comm ops)
from fxdisagg import kernels as _kernels  # noqa: F401  (registers fxdisagg::partial_attention, ...)
from fxdisagg.api import DisaggregatedModel, compile  # noqa: A004
from fxdisagg.errors import (ConfigError, FxDisaggError, FxDisaggWorkerError, InferenceOnlyError,
                             InputError, PatternError, TokenLocalityError, UnsupportedMaskError,
                             VerifyError, WorkerError)
from fxdisagg.plan import Plan

__all__ = ["compile", "DisaggregatedModel", "Plan", "FxDisaggError", "FxDisaggWorkerError",
           "ConfigError", "InputError", "InferenceOnlyError", "PatternError",
           "TokenLocalityError", "UnsupportedMaskError", "VerifyError", "WorkerError"]
