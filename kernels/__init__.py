"""Attention kernels of fxdisagg: partial attention and expsum-merge.

Public, stable API (see `api.py` for the contract and conventions):

    out, lse = partial_attention(q, k, v, q_pos, k_pos, *, scale=None, causal=True,
                                 window=None, q_doc=None, k_doc=None, k_valid=None,
                                 backend=None)
    out, lse = expsum_merge(outs, lses, *, backend=None)

Backends: "torch" (fast CPU/GPU torch path), "reference" (fp64, tests only), "triton".
The graph ops `torch.ops.fxdisagg.partial_attention` / `torch.ops.fxdisagg.expsum_merge`
are registered in `ops.py` on import of this package.
"""


def _hand_over_top_level_name():
    """Put the package that owns the top-level name ``kernels`` in its place.

    The layout installs this folder as ``fxdisagg.kernels``, but seen from the repository
    root (which ``python -m``, ``python -c`` and notebooks started there put on sys.path) it
    is also a top-level package ``kernels``, and that name belongs to HF's ``kernels`` (hub
    kernels), which transformers >= 5.25 depends on and imports as it starts: shadowed by
    this folder, ``import transformers`` failed there with "cannot import name
    'CUDAProperties' from 'kernels'". So the real package is loaded from the rest of
    sys.path into ``sys.modules`` (importlib returns what ``sys.modules`` holds after a load).
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != ours]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"'kernels' resolved to fxdisagg's kernel folder because {ours} is on "
                          f"sys.path, and no other package named 'kernels' is installed; "
                          f"fxdisagg's kernels are fxdisagg.kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_top_level_name()
else:
    from fxdisagg.kernels.api import expsum_merge, partial_attention  # noqa: F401
    from fxdisagg.kernels import ops  # noqa: F401  (registers torch.ops.fxdisagg.*)

__all__ = ["partial_attention", "expsum_merge"]
