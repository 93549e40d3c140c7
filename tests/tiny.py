"""Tiny T5-family models built in the tests (no downloads); the ones benchmarks also use live in `mixt5.testing`."""

from __future__ import annotations

import torch
from transformers import T5EncoderModel

from mixt5.testing import SAMPLE_SQUAD, VARIANTS, VOCAB, save_tiny_qa_model, tiny_config, tiny_dense, word_tokenizer

__all__ = [
    "SAMPLE_SQUAD",
    "VARIANTS",
    "VOCAB",
    "batch",
    "save_tiny_qa_model",
    "tiny_config",
    "tiny_dense",
    "tiny_encoder",
    "word_tokenizer",
]


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
