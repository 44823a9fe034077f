"""The README's supported-models table, generated here: HF families built from small configs
(fixed seeds), a padded batch, alpha=2, beta=2. A family is exact (fp32, 1e-4 relative to
the unmodified model) or refused with a typed error; a wrong answer fails the suite.

The README must hold the table this module measures; ``FXDISAGG_WRITE_README=1`` rewrites
it there."""

import os
import pathlib
import re

import pytest
import torch
import transformers as tf

import fxdisagg
from fxdisagg.testing import rel_error, reference

FP32_TOL = 1e-4
README = pathlib.Path(__file__).parents[1] / "README.md"
BEGIN, END = "<!-- supported-models:begin -->", "<!-- supported-models:end -->"
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4)
#: (model_type, head class, extra config); encoders get AutoModel, decoders a causal LM;
#: ``attn`` picks HF's attention implementation (sdpa unless the family has none)
FAMILIES = [
    ("llama", tf.AutoModelForCausalLM, dict(num_key_value_heads=2)),
    ("mistral", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, sliding_window=5)),
    ("qwen2", tf.AutoModelForCausalLM, dict(num_key_value_heads=2)),
    ("qwen3", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
    ("gemma", tf.AutoModelForCausalLM, dict(num_key_value_heads=1, head_dim=16)),
    ("phi3", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, pad_token_id=0)),
    ("olmo", tf.AutoModelForCausalLM, dict(num_key_value_heads=2)),
    ("granite", tf.AutoModelForCausalLM, dict(num_key_value_heads=2)),
    ("starcoder2", tf.AutoModelForCausalLM, dict(num_key_value_heads=2)),
    ("gpt2", tf.AutoModelForCausalLM, dict(n_positions=512)),
    ("gpt_neox", tf.AutoModelForCausalLM, dict()),
    ("xglm", tf.AutoModelForCausalLM, dict(d_model=64, ffn_dim=128, attention_heads=4, num_layers=2,
                                           attn="eager")),        # BART-style folded heads
    ("gpt_neo", tf.AutoModelForCausalLM, dict(num_layers=2, num_heads=4, window_size=8,   # a tril buffer
                                              attention_types=[[["global", "local"], 1]], attn="eager")),
    ("opt", tf.AutoModelForCausalLM, dict(ffn_dim=128, word_embed_proj_dim=64)),
    ("falcon", tf.AutoModelForCausalLM, dict(multi_query=True, new_decoder_architecture=False)),
    ("bloom", tf.AutoModelForCausalLM, dict(n_head=4, attn="eager")),
    ("gemma2", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, head_dim=16, attn="eager")),
    ("gemma3_text", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, head_dim=16,
                                                  sliding_window=8)),
    ("mixtral", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, num_local_experts=4,
                                              num_experts_per_tok=2)),
    ("qwen2_moe", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, num_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=64)),
    ("olmoe", tf.AutoModelForCausalLM, dict(num_key_value_heads=2, num_experts=4,
                                            num_experts_per_tok=2)),
    ("bert", tf.AutoModel, dict()),
    ("megatron-bert", tf.AutoModel, dict(attn="eager")),   # eval-mode nn.Dropout on the probs
    ("roformer", tf.AutoModel, dict(embedding_size=64, attn="eager")),
    ("roberta", tf.AutoModel, dict(pad_token_id=1)),
    ("modernbert", tf.AutoModel, dict(global_attn_every_n_layers=2, local_attention=8,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      cls_token_id=1, sep_token_id=2)),
]


def _model(model_type: str, head, extra: dict):
    torch.manual_seed(0)
    extra = dict(extra)
    attn = extra.pop("attn", "sdpa")
    config = tf.AutoConfig.for_model(model_type, **SMALL, **extra)
    return head.from_config(config, attn_implementation=attn).eval()


def _attention_kind(config) -> str:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or (1 if getattr(config, "multi_query", False) else heads)
    return "MHA" if kv == heads else ("MQA" if kv == 1 else f"GQA {heads}/{kv}")


def _row(model_type, head, extra) -> dict:
    model = _model(model_type, head, extra)
    g = torch.Generator().manual_seed(1)
    kw = {"input_ids": torch.randint(2, 128, (2, 24), generator=g),
          "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    kw["attention_mask"][-1, :8] = 0
    row = {"family": model_type, "class": type(model).__name__,
           "attention": f"{_attention_kind(model.config)}, {model.config._attn_implementation}"}
    try:
        dm = fxdisagg.compile(model, 2, 2, example_inputs=kw, launch="inprocess")
        out = dm(**kw)
    except fxdisagg.FxDisaggError as e:
        return {**row, "masks": "", "result": f"refused: {type(e).__name__}: {_first_line(e)}",
                "error": None}
    masks = sorted(k.split(".", 1)[1] for k in dm.counts if k.startswith("classify_masks."))
    err = rel_error(out[0], reference(model, kw), kw)
    return {**row, "masks": ", ".join(masks), "error": err,
            "result": "exact" if err <= FP32_TOL else f"WRONG ({err:.1e})"}


def _first_line(e) -> str:
    """The refusal without source locations and shapes (they name this machine's paths and
    the run's symbols), cut at 200 characters."""
    text = re.sub(r"\s*\(from File [^)]*\)", "", str(e).splitlines()[0])
    text = re.sub(r" = aten\.\S+ -> \([^)]*\) \S+", "", text)
    return (text[:200] + "...") if len(text) > 200 else text


def _versions() -> str:
    return f"transformers {tf.__version__}, torch {torch.__version__.split('+')[0]}"


def _table(rows) -> str:
    lines = [f"Measured with {_versions()}.", "",
             "| family | HF class | attention | masks classified | alpha=2, beta=2, padded batch: fp32 within 1e-4, or the refusal |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['class']} | {r['attention']} | {r['masks'] or '-'} | "
              f"{r['result'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def rows():
    return [_row(*f) for f in FAMILIES]


def test_every_family_is_exact_or_refused_with_a_typed_error(rows):
    wrong = [r for r in rows if r["error"] is not None and not r["error"] <= FP32_TOL]
    assert not wrong, f"wrong answers: {wrong}"
    exact = {r["family"] for r in rows if r["error"] is not None}
    assert {"llama", "gpt2", "bert", "mistral", "qwen2", "falcon", "mixtral", "modernbert",
            "megatron-bert", "gpt_neo", "xglm"} <= exact


def test_readme_holds_the_measured_table(rows):
    text = README.read_text()
    table = _table(rows)
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    if os.environ.get("FXDISAGG_WRITE_README") == "1":
        README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        return
    if f"Measured with {_versions()}." not in rest:
        pytest.skip(f"the README's table was measured with other versions than {_versions()} "
                    f"(HF's graphs change between releases); the rows above still ran")
    assert rest.split(END)[0].strip() == table, \
        "the README's table is stale: rerun with FXDISAGG_WRITE_README=1 and commit it"
