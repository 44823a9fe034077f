"""The transport a worker's communication ops run on.

Role programs call ``fxdisagg::exchange_start`` / ``exchange_wait``; those ops ask
`current()` for the transport bound to the calling worker (`Worker.run` binds its own; the
in-process runtime has one per thread). A transport (`fxdisagg.runtime.transport`)
executes the call's exchange schedule::

    start(layer, phase, tensors) -> handle   # pack what this rank sends, issue the exchange
    wait(handle, rows) -> list[Tensor]        # what this rank received, laid out
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


def cache():
    """The KV-cache action bound to the calling worker for this call, or None (a call
    without a cache: ``fxdisagg::kv_cache`` passes its inputs through)."""
    return getattr(_local, "cache", None)


@contextlib.contextmanager
def bound(transport, cache=None):
    """Bind ``transport`` (and the call's KV-cache action, `fxdisagg.runtime.kvcache`) to
    the calling thread for the duration of the block."""
    prev = getattr(_local, "transport", None), getattr(_local, "cache", None)
    _local.transport, _local.cache = transport, cache
    try:
        yield transport
    finally:
        _local.transport, _local.cache = prev


def set_process_default(transport) -> None:
    global _process_default
    _process_default = transport
