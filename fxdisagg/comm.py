"""The transport a worker's communication ops run on.

Role programs call ``fxdisagg::dispatch``/``combine``/``receive``/``reply``; those ops ask
`current()` for the transport bound to the calling worker. The in-process runtime binds one
per thread, the distributed runtime one per process. A transport implements::

    dispatch(layer, q_side, k_side)      # CompNode
    combine(layer) -> (outs, lses)        # CompNode
    receive(layer) -> list[Tensor]        # AttnNode
    reply(layer, out, lse)                # AttnNode
"""

from __future__ import annotations

import contextlib
import threading

_local = threading.local()
_process_default = None


def current():
    t = getattr(_local, "transport", None) or _process_default
    if t is None:
        raise RuntimeError("fxdisagg communication op called outside a worker: role programs "
                           "run under fxdisagg's runtime, which binds a transport")
    return t


@contextlib.contextmanager
def bound(transport):
    """Bind ``transport`` to the calling thread for the duration of the block."""
    prev = getattr(_local, "transport", None)
    _local.transport = transport
    try:
        yield transport
    finally:
        _local.transport = prev


def set_process_default(transport) -> None:
    global _process_default
    _process_default = transport
