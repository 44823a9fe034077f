"""Run by tests/test_service.py under torchrun (not a test module itself): one rank raises in
the second call; every rank must raise WorkerError naming it, well within the timeout."""

import os
import sys
import time

import fxdisagg
from fxdisagg.testing import inject_fault, inputs, tiny_model

FAILING_RANK = 2                                   # AttnNode (0, 1) at alpha=1, beta=2

model = tiny_model("llama")
dm = fxdisagg.compile(model, 1, 2, timeout=60)
kw = inputs("llama", 2, 7)
dm(**kw)
if int(os.environ["RANK"]) == FAILING_RANK:
    inject_fault(dm.runtime.worker, 1)
t0 = time.monotonic()
try:
    dm(**kw)
except fxdisagg.WorkerError as e:
    print(f"rank {os.environ['RANK']} raised after {time.monotonic() - t0:.1f} s: "
          f"{str(e).splitlines()[0]}", flush=True)
    time.sleep(3)         # torchrun's agent stops the other ranks once one exits: let all report
    sys.exit(3)
print(f"rank {os.environ['RANK']} finished without error", flush=True)
