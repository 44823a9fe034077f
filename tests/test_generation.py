"""KV cache on the AttnNodes, split-KV decode, chunked prefill and generate() through HF's
own GenerationMixin, against HF's generate with its own cache (fp32)."""

import math

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import fxdisagg
from fxdisagg.errors import ConfigError, InputError
from fxdisagg.testing import cache_rows, inputs, tiny_model

FP32_TOL = 1e-4
PROMPT, NEW = 11, 32


def _generate(model_or_dm, kw, **options):
    return model_or_dm.generate(**kw, max_new_tokens=NEW, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0, **options)


def _step_errors(ours, ref) -> list[float]:
    return [float((o - r).abs().max() / r.abs().max()) for o, r in zip(ours.logits, ref.logits)]


@pytest.mark.parametrize("family, alpha, beta", [
    *[(f, a, b) for f in ("llama", "gpt2", "mistral", "qwen2") for a, b in ((1, 1), (2, 2), (3, 2))],
    ("bloom", 2, 2), ("bloom", 3, 2), ("gpt_neo", 2, 2), ("xglm", 2, 2)])
def test_greedy_generation_is_token_identical_to_hf(family, alpha, beta):
    """Batch 2 with left padding; eos met by one row in the middle of the run; every
    decode step's logits within 1e-4 of HF's (Mistral's window 5 < prompt + generated;
    Bloom's ALiBi over the cached keys; GPT-Neo's causal buffer and its band of 5 on the
    local layer; XGLM's positions, which generate passes flattened to B*N)."""
    model = tiny_model(family)
    kw = inputs(family, 2, PROMPT, padding=True)
    free = _generate(model, kw, do_sample=False, eos_token_id=None)
    eos = int(free.sequences[0, PROMPT + 5])            # row 0 stops after 6 new tokens
    ref = _generate(model, kw, do_sample=False, eos_token_id=eos)
    with fxdisagg.compile(model, alpha, beta, launch="inprocess") as dm:
        ours = _generate(dm, kw, do_sample=False, eos_token_id=eos)
    assert torch.equal(ours.sequences, ref.sequences), (ours.sequences, ref.sequences)
    assert (ref.sequences[0, PROMPT + 6:] == 0).all(), "row 0 hit eos and was padded"
    assert max(_step_errors(ours, ref)) <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_seeded_sampling_gives_the_same_tokens_as_hf(family):
    model = tiny_model(family)
    kw = inputs(family, 2, PROMPT, padding=True)
    options = dict(do_sample=True, top_p=0.9, temperature=0.7, eos_token_id=None)
    torch.manual_seed(7)
    ref = _generate(model, kw, **options)
    with fxdisagg.compile(model, 2, 2, launch="inprocess") as dm:
        torch.manual_seed(7)
        ours = _generate(dm, kw, **options)
    assert torch.equal(ours.sequences, ref.sequences)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def test_generation_on_spawned_workers_with_a_streamer_and_generation_config():
    """Processes, a GenerationConfig object and a streamer: HF's machinery, our cache."""
    from transformers import GenerationConfig
    model = tiny_model("llama")
    kw = inputs("llama", 1, PROMPT)
    cfg = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = model.generate(**kw, generation_config=cfg)
    streamer = _Collect()
    with fxdisagg.compile(model, 2, 2, launch="spawn", timeout=60) as dm:
        out = dm.generate(**kw, generation_config=cfg, streamer=streamer)
        memory = dm.memory
    assert torch.equal(out, ref)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])
    assert torch.equal(streamed, ref[0, PROMPT:])
    attn = [m["kv_cache"] for r, m in memory.items() if r >= 2]
    assert min(attn) > 0 and all(memory[r]["params"] > 0 for r in (0, 1))


def test_kv_cache_is_spread_evenly_over_the_attn_nodes():
    """After prefill and decode, every AttnNode holds within one token of the others."""
    model = tiny_model("llama")
    kw = inputs("llama", 1, PROMPT)
    with fxdisagg.compile(model, 1, 2, launch="inprocess") as dm:
        dm.generate(**kw, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        rows = [dm.runtime.call(r, cache_rows) for r in range(1, 5)]
        live = [next(iter(r.values()))[0][0] for r in rows]            # layer 0 of the one cache
    total = PROMPT + NEW - 1                        # the last token is sampled, never cached
    assert sum(live) == total and max(live) - min(live) <= 1, live


def test_sliding_window_cache_is_bounded_by_the_window():
    model = tiny_model("mistral", sliding_window=5)
    kw = inputs("mistral", 2, PROMPT, padding=True)
    with fxdisagg.compile(model, 2, 2, launch="inprocess") as dm:
        dm.generate(**kw, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        per_node = [next(iter(dm.runtime.call(r, cache_rows).values())) for r in range(2, 6)]
    for layer in per_node[0]:
        live = sum(node[layer][0] for node in per_node)
        assert live <= 5 + 4, f"layer {layer} keeps {live} keys for a window of 5"
        assert all(node[layer][1] <= 2 * node[layer][0] + 16 for node in per_node)


@pytest.mark.parametrize("family, alpha, beta", [("llama", 2, 2), ("mistral", 3, 2), ("bloom", 2, 2)])
def test_chunked_prefill_gives_the_logits_of_one_call(family, alpha, beta):
    """A padded prompt fed in 3 chunks, then decode steps: every chunk's logits equal HF's
    over the whole sequence at those positions."""
    model = tiny_model(family)
    kw = inputs(family, 2, 23, padding=True)
    with torch.no_grad():
        full = model(**kw, use_cache=False).logits
    keep = kw["attention_mask"].bool()
    with fxdisagg.compile(model, alpha, beta, launch="inprocess") as dm:
        cache = dm.new_cache(batch=2)
        for lo, hi in ((0, 9), (9, 10), (10, 23)):
            out = dm(input_ids=kw["input_ids"][:, lo:hi], attention_mask=kw["attention_mask"][:, :hi],
                     cache=cache).logits
            diff = (out - full[:, lo:hi]).abs()[keep[:, lo:hi]]
            assert float(diff.max() / full.abs().max()) <= FP32_TOL, (lo, hi)
        assert cache.get_seq_length() == 23


def test_decode_step_bytes_equal_the_schedule_prediction():
    model = tiny_model("llama")
    kw = inputs("llama", 2, PROMPT, padding=True)
    with fxdisagg.compile(model, 2, 2, launch="inprocess") as dm:
        cache = dm.new_cache(batch=2)
        dm(**kw, cache=cache)
        for past, n in ((PROMPT, 1), (PROMPT + 1, 1), (PROMPT + 2, 5)):
            ids = torch.randint(0, 128, (2, n))
            mask = torch.cat([kw["attention_mask"], torch.ones(2, past + n - PROMPT, dtype=torch.long)], 1)
            dm(input_ids=ids, attention_mask=mask, cache=cache)
            assert dm.traffic == dm.expected_traffic(n, batch=2, past=past), (past, n)
        # a decode step's dispatch: q to all 4 AttnNodes, k/v of its one token to one
        q, kv = 2 * 4 * 16 * 4, 2 * 2 * 2 * 16 * 4
        assert dm.expected_traffic(1, batch=2, past=20)[0]["dispatch"] >= 4 * q + kv


def test_bad_generation_requests_raise_before_any_worker_runs():
    model = tiny_model("llama")
    kw = inputs("llama", 2, PROMPT)
    dm = fxdisagg.compile(model, 1, 2, launch="spawn", max_cache_len=PROMPT + 8)
    with pytest.raises(InputError, match="max_cache_len"):
        dm.generate(**kw, max_new_tokens=9)
    with pytest.raises(ConfigError, match="num_beams"):
        dm.generate(**kw, max_new_tokens=4, num_beams=2)
    with pytest.raises(InputError, match="holds 1 sequences"):
        dm(**kw, cache=dm.new_cache(batch=1))
    from transformers import DynamicCache
    with pytest.raises(InputError, match="new_cache"):
        dm(**kw, cache=DynamicCache())
    assert dm.runtime is None
    bert = fxdisagg.compile(tiny_model("bert"), 1, 1, launch="spawn")
    with pytest.raises(InputError, match="cannot generate"):
        bert.generate(**inputs("bert", 1, 8), max_new_tokens=2)
    assert bert.runtime is None


def test_a_cache_does_not_outlive_its_workers():
    model = tiny_model("llama")
    kw = inputs("llama", 1, PROMPT)
    dm = fxdisagg.compile(model, 1, 1, launch="inprocess")
    cache = dm.new_cache(batch=1)
    dm(**kw, cache=cache)
    dm.close()
    with pytest.raises(InputError, match="were stopped"):
        dm(input_ids=kw["input_ids"][:, :1], cache=cache)
    dm.close()


def test_released_caches_are_freed_on_the_workers():
    model = tiny_model("llama")
    kw = inputs("llama", 1, PROMPT)
    with fxdisagg.compile(model, 1, 2, launch="inprocess") as dm:
        for _ in range(3):
            dm.generate(**kw, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
        dm(**kw)                                    # a plain call carries no drops...
        cache = dm.new_cache(batch=1)
        dm(**kw, cache=cache)                       # ...a cached one frees what was released
        held = dm.runtime.call(1, cache_rows)
    assert list(held) == [cache.cache_id], held
    assert math.isclose(sum(r for r, _ in held[cache.cache_id].values()),
                        2 * math.ceil(PROMPT / 4), abs_tol=2)


def test_generation_under_torchrun_on_every_rank(tmp_path):
    """SPMD: all five ranks run HF's generate; every rank gets the logits and HF's tokens."""
    from pathlib import Path
    from fxdisagg.testing import torchrun
    proc, reports = torchrun(Path(__file__).resolve().parent / "torchrun_generate.py", 5, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert reports == {r: "True (2, 4, 128)" for r in range(5)}, reports
