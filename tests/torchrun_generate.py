"""Run by tests/test_generation.py under torchrun (not a test module itself): every rank
generates (SPMD) at alpha=1, beta=2; each writes whether its tokens equal HF's."""

import os

import torch

import fxdisagg
from fxdisagg.testing import inputs, tiny_model

model = tiny_model("mistral")                 # window 5: eviction on the AttnNodes too
kw = inputs("mistral", 2, 11, padding=True)
options = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
ref = model.generate(**kw, **options)
dm = fxdisagg.compile(model, 1, 2, timeout=60)
out = dm.generate(**kw, **options)
chunk = dm(input_ids=kw["input_ids"][:, :4], attention_mask=kw["attention_mask"][:, :4],
           cache=dm.new_cache(batch=2))      # a second cache beside the first: its own rows
with open(os.path.join(os.environ["FXDISAGG_REPORT_DIR"], f"rank{os.environ['RANK']}"), "w") as f:
    f.write(f"{torch.equal(out, ref)} {tuple(chunk.logits.shape)}")
dm.close()
