"""Generation: a KV cache that lives on the AttnNodes, driven by HF's own GenerationMixin.

`DistributedCache` is the handle: a `transformers.Cache` whose storage is spread over the
AttnNodes (`fxdisagg.runtime.kvcache`) and whose host side only counts the tokens cached.
A call ``dm(input_ids=new, attention_mask=..., cache=cache)`` fills the cache on its first
call (a prefill) and extends it afterwards (decode steps, or chunks of a chunked prefill).

`generate` runs ``model.generate`` itself on a shallow copy of the user's model whose
``forward`` is the disaggregated model's: HF's logits processors, stopping criteria,
generation config, sampling and streamers all behave as in HF because they are HF's. The
copy shares every parameter and module with the model and keeps the forward's signature
(``functools.wraps``), which is what GenerationMixin inspects to decide which inputs to
build (``position_ids``, ``logits_to_keep``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref

import torch
from transformers import Cache, GenerationConfig

from fxdisagg.errors import ConfigError, InputError

_ids = itertools.count(1)


class DistributedCache(Cache):
    """The KV cache of one batch of sequences, held by the AttnNodes of ``dm``'s workers.

    ``seq_length``: tokens cached so far (HF's ``get_seq_length``); ``max_len``: the most
    it may hold (a call that would pass it raises before any worker runs). The workers'
    storage is freed when this object is garbage collected (or with its workers).
    Reordering rows (beam search) and cropping (assisted decoding) are not supported.
    """

    def __init__(self, dm, batch: int, max_len: int):
        super().__init__(layers=[])
        self.cache_id = next(_ids)
        self.batch, self.max_len, self.seq_length = batch, max_len, 0
        self.owner = weakref.ref(dm)
        self.epoch = None                      # the workers that hold it (set by its fill)
        weakref.finalize(self, dm._released_caches.append, self.cache_id)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx):
        raise ConfigError("fxdisagg's KV cache cannot reorder rows (beam search); generate "
                          "with num_beams=1 (greedy or sampling)")

    def crop(self, tokens_to_remove: int):
        raise ConfigError("fxdisagg's KV cache cannot be cropped (assisted or prompt-lookup "
                          "decoding); generate without an assistant")

    def batch_repeat_interleave(self, repeats: int):
        raise ConfigError("fxdisagg's KV cache cannot repeat rows (num_return_sequences > 1 "
                          "or beams); repeat the prompt in the batch instead")

    def batch_select_indices(self, indices):
        raise ConfigError("fxdisagg's KV cache cannot select rows; generate on the batch as is")

    def __repr__(self) -> str:
        return (f"DistributedCache(id={self.cache_id}, batch={self.batch}, "
                f"tokens={self.seq_length}, max_len={self.max_len})")


#: GenerationConfig settings that need a cache fxdisagg does not offer, with what to do.
_REFUSED = {
    "num_beams": (1, "beam search reorders cache rows across steps; use num_beams=1"),
    "num_return_sequences": (1, "repeat the prompt in the batch instead"),
}


def generate(dm, input_ids=None, attention_mask=None, **kwargs):
    """``dm.generate``: HF's ``model.generate`` with fxdisagg's forward and KV cache."""
    model = dm.model
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise InputError(f"{type(model).__name__} cannot generate (an encoder-only model or "
                         f"one without a language-modelling head); call the model instead")
    if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError("generate needs input_ids of shape [batch, prompt length]")
    for name in ("assistant_model", "prompt_lookup_num_tokens", "cache", "past_key_values"):
        if kwargs.get(name) is not None:
            raise ConfigError(f"generate(..., {name}=...) is not supported by fxdisagg: the KV "
                              f"cache is its own, on the AttnNodes")
    config = _effective_config(model, kwargs)
    for name, (plain, hint) in _REFUSED.items():
        value = getattr(config, name, plain)
        if value not in (None, plain):
            raise ConfigError(f"generate: {name}={value} is not supported by fxdisagg's KV "
                              f"cache; {hint}")
    prompt = input_ids.shape[1]
    total = config.max_length if config.max_new_tokens is None else prompt + config.max_new_tokens
    cache = dm.new_cache(input_ids.shape[0])
    if total > cache.max_len:
        raise InputError(f"generate would hold {total} tokens ({prompt} prompt + "
                         f"{total - prompt} new) in the KV cache, more than max_cache_len="
                         f"{cache.max_len}; compile with a larger max_cache_len or ask for "
                         f"fewer new tokens")
    proxy = copy.copy(model)                   # shares parameters and modules
    proxy.forward = functools.wraps(model.forward)(functools.partial(_forward, dm))
    return proxy.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)


def _effective_config(model, kwargs) -> GenerationConfig:
    base = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    return config


def _forward(dm, **kwargs):
    """The forward GenerationMixin calls: settings it adds that do not change the result
    are dropped; the rest is the disaggregated model's call."""
    for name in ("use_cache", "return_dict"):
        kwargs.pop(name, None)
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(name, None):
            raise ConfigError(f"generate(..., {name}=True) is not supported by fxdisagg")
    return dm(**kwargs)
