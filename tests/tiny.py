"""Tiny T5-family models built in the tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5EncoderModel, T5ForConditionalGeneration

VOCAB = 96
VARIANTS = ("t5-v1.0-relu", "t5-v1.1-gated-gelu", "mt5")


def tiny_config(variant: str = "t5-v1.1-gated-gelu", **overrides) -> T5Config:
    values = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=4,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    if variant == "t5-v1.0-relu":
        values.update(feed_forward_proj="relu", tie_word_embeddings=True)
    else:
        values.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    values.update(overrides)
    return (MT5Config if variant == "mt5" else T5Config)(**values)


def tiny_dense(variant: str = "t5-v1.1-gated-gelu", seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model_class = MT5ForConditionalGeneration if variant == "mt5" else T5ForConditionalGeneration
    return model_class(tiny_config(variant, **overrides)).to(dtype).eval()


def tiny_encoder(seed: int = 0, **overrides) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(tiny_config(**overrides)).eval()


def batch(seed: int = 0, batch_size: int = 3, src_len: int = 9, tgt_len: int = 5, pad_last: bool = True):
    """input_ids with padding at the end of the last row, its attention mask, and labels with -100 padding."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch_size, src_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, VOCAB, (batch_size, tgt_len), generator=gen)
    if pad_last:
        input_ids[-1, -3:] = 0
        attention_mask[-1, -3:] = 0
        labels[-1, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
