"""Tiny T5-family models and tokenizers built offline, for MixT5's tests and benchmarks (as `transformers.testing_utils`
serves transformers'): random weights, no downloads. Not part of the public API."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

SAMPLE_SQUAD = Path(__file__).resolve().parent / "resources" / "squad_dev_sample.json"  # 200 SQuAD dev questions

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


def word_tokenizer(texts):
    """A fast word-level tokenizer over `texts` (pad 0, eos 1, unk 2; appends </s>), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    splitter = pre_tokenizers.WhitespaceSplit()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_tiny_qa_model(path, seed: int = 0) -> Path:
    """A tiny random dense T5 plus a word tokenizer covering the shipped SQuAD sample, saved to `path`."""
    from mixt5.data.squad import load_squad_json

    examples = load_squad_json(SAMPLE_SQUAD)
    texts = [f"question: {e.question} context: {e.context}" for e in examples] + [
        a for e in examples for a in e.answers
    ]
    tokenizer = word_tokenizer(texts)
    model = tiny_dense(seed=seed, vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_bert_qa_model(path, seed: int = 0, *, head: bool = True) -> Path:
    """A tiny random `BertForQuestionAnswering` (or, with `head=False`, a bare `BertModel`, as sentence-transformers
    checkpoints are stored) with an uncased WordPiece vocabulary (`vocab.txt`, as BERT checkpoints ship it) covering
    the shipped SQuAD sample's words, saved to `path`."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertConfig, BertForQuestionAnswering, BertModel, BertTokenizer

    from mixt5.data.squad import load_squad_json

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: dict[str, None] = {}
    for example in load_squad_json(SAMPLE_SQUAD):
        for text in (example.question, example.context):
            words.update(dict.fromkeys(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(path / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = (BertForQuestionAnswering if head else BertModel)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
