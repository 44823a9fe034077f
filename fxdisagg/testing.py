"""Small real HF models built from configs with fixed seeds, and the comparison the tests,
examples and benchmarks share. No hub downloads: every model is random-initialised."""

from __future__ import annotations

import os
import signal
import time

import torch

FAMILIES = ("llama", "gpt2", "bert", "mistral", "qwen2", "bloom", "gpt_neo", "xglm")


def tiny_model(family: str, *, attn: str = "sdpa", layers: int = 2, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, vocab: int = 128, seed: int = 0,
               sliding_window: int = 5, dtype=torch.float32) -> torch.nn.Module:
    """An eval-mode HF model of ``family`` (GQA for llama/mistral/qwen2, sliding window
    ``sliding_window`` for mistral, qkv bias for qwen2, ALiBi for bloom)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, attn_implementation=attn)
    if family == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=layers, num_attention_heads=heads,
                                               num_key_value_heads=kv_heads, **common))
    elif family == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads,
                                             n_positions=512, **common))
    elif family == "bert":
        m = tf.BertModel(tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=2 * hidden, **common))
    elif family == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                   num_hidden_layers=layers, num_attention_heads=heads,
                                                   num_key_value_heads=kv_heads,
                                                   sliding_window=sliding_window, **common))
    elif family == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=layers, num_attention_heads=heads,
                                               num_key_value_heads=kv_heads, **common))
    elif family == "bloom":   # ALiBi, heads folded into the batch dim; HF ships eager only
        m = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads,
                                               vocab_size=vocab, attn_implementation="eager"))
    elif family == "gpt_neo":  # a [max, max] causal buffer; local layers a band of it
        m = tf.GPTNeoForCausalLM._from_config(tf.GPTNeoConfig(
            vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
            window_size=sliding_window, attention_types=[[["global", "local"], layers // 2]],
            bos_token_id=0, eos_token_id=0), attn_implementation="eager")
    elif family == "xglm":     # the BART family's eager spelling; positions flattened B*N
        m = tf.XGLMForCausalLM._from_config(tf.XGLMConfig(
            vocab_size=vocab, d_model=hidden, ffn_dim=2 * hidden, attention_heads=heads,
            num_layers=layers), attn_implementation="eager")
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return m.to(dtype).eval()


def inputs(family: str, batch: int, n: int, *, vocab: int = 128, seed: int = 1, padding: bool | None = None):
    """Token ids (and for BERT, or when ``padding``, an attention mask with left padding on
    the last row: the first n//3 tokens of row batch-1 are padding)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(0, vocab, (batch, n), generator=g)}
    if padding if padding is not None else family == "bert":
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[-1, : n // 3] = 0
        kw["attention_mask"] = mask
    return kw


def reference(model, kw):
    """The unmodified model's first output (logits / last hidden state)."""
    with torch.no_grad():
        extra = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
        return model(**kw, **extra)[0]


def rel_error(ours: torch.Tensor, ref: torch.Tensor, kw) -> float:
    """max |ours - ref| / max |ref| over positions the model defines (padding excluded)."""
    keep = kw["attention_mask"].bool() if "attention_mask" in kw else torch.ones(ref.shape[:2], dtype=torch.bool)
    diff = (ours.double() - ref.double()).abs()[keep]
    return float(diff.max() / ref.double().abs()[keep].max()) if diff.numel() else 0.0


# -- fault injection (tests only: the runtime's hot path knows nothing of it) -----------------
class FaultyTransport:
    """Wraps a worker's transport; misbehaves when the worker starts an exchange of
    ``layer``: raises, SIGKILLs its own process while its peers wait in a collective
    (``kill``), or stalls ``delay`` seconds first and then goes on (``delay``). A CompNode
    without tokens takes part through ``idle()``, which is not wrapped: it never faults."""

    def __init__(self, inner, layer: int, kill: bool = False, delay: float | None = None):
        self.inner, self.fault_layer, self.kill, self.delay = inner, layer, kill, delay

    def start(self, layer, phase, tensors):
        if layer == self.fault_layer:
            self.inner.layer = layer
            if self.delay is not None:
                time.sleep(self.delay)
            elif self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                raise RuntimeError(f"injected fault at layer {layer} ({phase})")
        return self.inner.start(layer, phase, tensors)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def inject_fault(worker, layer: int, kill: bool = False) -> None:
    """``dm.runtime.call(rank, inject_fault, layer)``: worker ``rank`` fails at ``layer``
    on every later call."""
    worker.transport = FaultyTransport(worker.transport, layer, kill)


def inject_delay(worker, layer: int, seconds: float) -> None:
    """``dm.runtime.call(rank, inject_delay, layer, seconds)``: worker ``rank`` stalls at
    ``layer`` on every later call (a call long enough to interrupt)."""
    worker.transport = FaultyTransport(worker.transport, layer, delay=seconds)


def cache_rows(worker) -> dict[int, dict[int, tuple[int, int]]]:
    """``dm.runtime.call(rank, cache_rows)``: per cache id and layer, (live rows, buffer
    capacity) of the KV cache an AttnNode holds."""
    return {cid: {layer: (len(c), c.capacity) for layer, c in layers.items()}
            for cid, layers in worker.state.get("kv", {}).items()}


def free_port() -> int:
    """A free TCP port on localhost, for a test's own process group."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, nproc: int, report_dir, timeout: float = 300, env: dict | None = None):
    """Run ``script`` under ``torch.distributed.run`` on this host with ``nproc`` ranks
    (one OpenMP thread each, ``env`` added to the environment); returns the finished process and ``{rank: text}`` of the
    report files the ranks wrote into ``report_dir`` (env ``FXDISAGG_REPORT_DIR``): one
    file per rank, since lines printed by several processes to one pipe can interleave."""
    import pathlib
    import subprocess
    import sys
    report_dir = pathlib.Path(report_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "FXDISAGG_REPORT_DIR": str(report_dir), **(env or {})})
    reports = {int(p.name[4:]): p.read_text() for p in report_dir.glob("rank*")}
    return proc, reports


# -- attention kernels against an fp64 oracle -------------------------------------------------
#: Per dtype, (out atol = rtol, lse atol = rtol) of a kernel's result against an fp64 oracle
#: fed the same (rounded) inputs: p and out are rounded to fp16/bf16 in those dtypes.
ATTENTION_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def check_attention(out, lse, ref_out, ref_lse, dtype) -> None:
    """A kernel's ``(out, lse)`` against the oracle's float64 ``(ref_out, ref_lse)``: dtypes,
    shapes, no NaN, rows without visible keys exactly ``out 0, lse -inf``, the rest within
    `ATTENTION_TOL`."""
    tol_o, tol_l = ATTENTION_TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    masked = ref_lse == float("-inf")
    assert torch.equal(lse.cpu() == float("-inf"), masked), "rows without keys differ"
    assert (out.cpu()[masked] == 0).all(), "rows without keys must be exactly 0"
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=tol_o, rtol=tol_o)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=tol_l, rtol=tol_l)

