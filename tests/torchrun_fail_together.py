"""Run by tests/test_service.py under torchrun (not a test module itself): one rank fails in
the second call, raising (``FXDISAGG_FAULT=raise``) or killed by SIGKILL (``=die``); every
other rank must raise WorkerError naming it, well within the timeout."""

import os
import sys
import time

import fxdisagg
from fxdisagg.testing import inject_fault, inputs, tiny_model

FAILING_RANK = 2                                   # AttnNode (0, 1) at alpha=1, beta=2


def report(line: str) -> None:
    """One file per rank: lines printed by five processes to one pipe can interleave."""
    rank = os.environ["RANK"]
    with open(os.path.join(os.environ["FXDISAGG_REPORT_DIR"], f"rank{rank}"), "w") as f:
        f.write(line)


model = tiny_model("llama")
dm = fxdisagg.compile(model, 1, 2, timeout=60)
kw = inputs("llama", 2, 7)
dm(**kw)
if int(os.environ["RANK"]) == FAILING_RANK:
    inject_fault(dm.runtime.worker, 1, kill=os.environ["FXDISAGG_FAULT"] == "die")
t0 = time.monotonic()
try:
    dm(**kw)
except fxdisagg.WorkerError as e:
    report(f"raised after {time.monotonic() - t0:.1f} s: {str(e).splitlines()[0]}")
    time.sleep(3)         # torchrun's agent stops the other ranks once one exits: let all report
    sys.exit(3)
report("finished without error")
