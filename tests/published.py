"""Checkpoint folders stored as the published T5 families are, built by hand (tiny dimensions, random weights).

`config.json` has the key set of the published file of each family (values shrunk); the weights are written the way
those repositories hold them: a legacy `pytorch_model.bin` (every tied name saved, sharing storage), one
`model.safetensors` (tied names saved once), or safetensors shards with `model.safetensors.index.json`. The untied
families (t5-v1.1, flan-t5, mt5) hold an `lm_head.weight` of their own, drawn apart from `shared.weight`.
Nothing here is made by transformers' or MixT5's config or model classes: their assumptions are what is tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

D_MODEL, D_KV, NUM_HEADS, D_FF, BUCKETS = 16, 4, 4, 32, 8
NUM_LAYERS, NUM_DECODER_LAYERS, VOCAB = 3, 2, 64

_TASK_PARAMS = {  # t5-small's and flan-t5-base's task_specific_params, as published
    "summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 200, "min_length": 30,
                      "no_repeat_ngram_size": 3, "num_beams": 4, "prefix": "summarize: "},
    "translation_en_to_de": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to German: "},
    "translation_en_to_fr": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to French: "},
    "translation_en_to_ro": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                             "prefix": "translate English to Romanian: "},
}  # fmt: skip


def published_config(family: str, vocab_size: int = VOCAB) -> dict:
    """The family's published `config.json` keys, with tiny values."""
    if family == "t5-small":  # google-t5/t5-small: tied, relu, no num_decoder_layers, no tie_word_embeddings key
        return {
            "architectures": ["T5ForConditionalGeneration"], "d_ff": D_FF, "d_kv": D_KV, "d_model": D_MODEL,
            "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
            "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
            "num_heads": NUM_HEADS, "num_layers": NUM_LAYERS, "output_past": True, "pad_token_id": 0,
            "relative_attention_num_buckets": BUCKETS, "task_specific_params": _TASK_PARAMS,
            "vocab_size": vocab_size,
        }  # fmt: skip
    if family == "t5-v1_1-base":  # google/t5-v1_1-base
        return {
            "architectures": ["T5ForConditionalGeneration"], "d_ff": D_FF, "d_kv": D_KV, "d_model": D_MODEL,
            "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
            "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
            "num_decoder_layers": NUM_DECODER_LAYERS, "num_heads": NUM_HEADS, "num_layers": NUM_LAYERS,
            "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": BUCKETS,
            "tie_word_embeddings": False, "vocab_size": vocab_size,
        }  # fmt: skip
    if family == "flan-t5-base":  # google/flan-t5-base
        return {
            "architectures": ["T5ForConditionalGeneration"], "d_ff": D_FF, "d_kv": D_KV, "d_model": D_MODEL,
            "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
            "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
            "num_decoder_layers": NUM_DECODER_LAYERS, "num_heads": NUM_HEADS, "num_layers": NUM_LAYERS,
            "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": BUCKETS, "task_specific_params": _TASK_PARAMS,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.23.1",
            "use_cache": True, "vocab_size": vocab_size,
        }  # fmt: skip
    if family == "mt5-small":  # google/mt5-small
        return {
            "_name_or_path": "/home/patrick/hugging_face/t5/mt5-small",
            "architectures": ["MT5ForConditionalGeneration"], "d_ff": D_FF, "d_kv": D_KV, "d_model": D_MODEL,
            "decoder_start_token_id": 0, "dropout_rate": 0.1,
            "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
            "layer_norm_epsilon": 1e-06, "model_type": "mt5", "num_decoder_layers": NUM_DECODER_LAYERS,
            "num_heads": NUM_HEADS, "num_layers": NUM_LAYERS, "pad_token_id": 0,
            "relative_attention_num_buckets": BUCKETS, "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer",
            "transformers_version": "4.10.0.dev0", "use_cache": True, "vocab_size": vocab_size,
        }  # fmt: skip
    raise KeyError(family)


# generation_config.json as the hub holds it for t5-small / flan-t5-base
PUBLISHED_GENERATION_CONFIG = {
    "_from_model_config": True, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
    "transformers_version": "4.27.0.dev0",
}  # fmt: skip

FAMILIES = ("t5-small", "t5-v1_1-base", "flan-t5-base", "mt5-small")
STORAGES = ("bin", "safetensors", "sharded")


@dataclass(frozen=True)
class Family:
    name: str
    tied: bool  # lm_head is `shared`
    rescaled: bool  # decoder output * d_model**-0.5 before lm_head
    gated: bool  # wi_0/wi_1 (gated-gelu) rather than wi (relu)


def family(name: str) -> Family:
    v1_0 = name == "t5-small"
    return Family(name, tied=v1_0, rescaled=v1_0, gated=not v1_0)


def _attention(prefix: str, gen: torch.Generator, bias: bool) -> dict[str, torch.Tensor]:
    inner = NUM_HEADS * D_KV
    tensors = {f"{prefix}.{name}.weight": torch.randn(inner, D_MODEL, generator=gen) * D_MODEL**-0.5 for name in "qkv"}
    tensors[f"{prefix}.o.weight"] = torch.randn(D_MODEL, inner, generator=gen) * inner**-0.5
    if bias:
        tensors[f"{prefix}.relative_attention_bias.weight"] = torch.randn(BUCKETS, NUM_HEADS, generator=gen) * 0.5
    return tensors


def _feed_forward(prefix: str, gated: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    names = ("wi_0", "wi_1") if gated else ("wi",)
    tensors = {f"{prefix}.{n}.weight": torch.randn(D_FF, D_MODEL, generator=gen) * D_MODEL**-0.5 for n in names}
    tensors[f"{prefix}.wo.weight"] = torch.randn(D_MODEL, D_FF, generator=gen) * D_FF**-0.5
    return tensors


def _norm(gen: torch.Generator) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(D_MODEL, generator=gen)


def published_state_dict(fam: Family, vocab_size: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """T5's parameter names, spelt out; `lm_head.weight` is `shared.weight` itself for a tied family."""
    gen = torch.Generator().manual_seed(seed)
    state = {"shared.weight": torch.randn(vocab_size, D_MODEL, generator=gen)}
    for i in range(NUM_LAYERS):
        block = f"encoder.block.{i}"
        state.update(_attention(f"{block}.layer.0.SelfAttention", gen, bias=i == 0))
        state[f"{block}.layer.0.layer_norm.weight"] = _norm(gen)
        state.update(_feed_forward(f"{block}.layer.1.DenseReluDense", fam.gated, gen))
        state[f"{block}.layer.1.layer_norm.weight"] = _norm(gen)
    state["encoder.final_layer_norm.weight"] = _norm(gen)
    for i in range(NUM_DECODER_LAYERS if fam.gated else NUM_LAYERS):  # t5-small's config has no num_decoder_layers
        block = f"decoder.block.{i}"
        state.update(_attention(f"{block}.layer.0.SelfAttention", gen, bias=i == 0))
        state[f"{block}.layer.0.layer_norm.weight"] = _norm(gen)
        state.update(_attention(f"{block}.layer.1.EncDecAttention", gen, bias=False))
        state[f"{block}.layer.1.layer_norm.weight"] = _norm(gen)
        state.update(_feed_forward(f"{block}.layer.2.DenseReluDense", fam.gated, gen))
        state[f"{block}.layer.2.layer_norm.weight"] = _norm(gen)
    state["decoder.final_layer_norm.weight"] = _norm(gen)
    state["lm_head.weight"] = state["shared.weight"] if fam.tied else torch.randn(vocab_size, D_MODEL, generator=gen)
    return state


def write_published_checkpoint(
    path: Path,
    name: str,
    storage: str,
    *,
    vocab_size: int = VOCAB,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Write `config.json`, `generation_config.json` and the weights of family `name` into `path`; returns the
    weights (fp32, as drawn) so tests can compute the expected outputs themselves."""
    fam = family(name)
    path.mkdir(parents=True, exist_ok=True)
    state = published_state_dict(fam, vocab_size, seed)
    config = published_config(name, vocab_size)
    if dtype != torch.float32:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG, indent=2))
    stored = {key: tensor.to(dtype) for key, tensor in state.items()}
    if fam.tied:
        stored["lm_head.weight"] = stored["shared.weight"]
    if storage == "bin":  # transformers 4 wrote every name, tied ones sharing one storage
        stored["encoder.embed_tokens.weight"] = stored["shared.weight"]
        stored["decoder.embed_tokens.weight"] = stored["shared.weight"]
        torch.save(stored, path / "pytorch_model.bin")
        return state
    if fam.tied:
        del stored["lm_head.weight"]  # safetensors holds a tied tensor once
    if storage == "safetensors":
        save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
        return state
    keys = sorted(stored)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    weight_map = {}
    for file, names in shards.items():
        save_file({k: stored[k] for k in names}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return state
