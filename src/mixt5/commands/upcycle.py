"""`mixt5 upcycle --model_name_or_path SRC --output_dir DST [MoEConfig flags]`: a dense T5 checkpoint → a MixT5 one."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import MoEConfig
from . import add_dataclass_arguments, dataclasses_from_namespace


@dataclass
class UpcycleArguments:
    model_name_or_path: str = field(
        metadata={"help": "Dense T5/MT5 checkpoint: a hub id, a local folder, or builtin:t5-v1_1-tiny (offline)."}
    )
    output_dir: str = field(metadata={"help": "Where the MixT5 checkpoint (model, tokenizer, MoE settings) goes."})
    encoder_only: bool = field(default=False, metadata={"help": "Load and upcycle a T5EncoderModel."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Load dtype: auto (as saved), float32, bfloat16, float16."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


# An offline, randomly initialised T5-v1.1-architecture model for trying `mixt5 upcycle` without the hub.
BUILTIN_MODELS = {
    "builtin:t5-v1_1-tiny": {
        "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 256, "num_layers": 4, "num_decoder_layers": 4,
        "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
    },
}  # fmt: skip


def _load_dense(name: str, encoder_only: bool, dtype: str) -> Any:
    from transformers import AutoModelForSeq2SeqLM, AutoModelForTextEncoding, T5Config, T5EncoderModel

    if name in BUILTIN_MODELS:
        import torch
        from transformers import T5ForConditionalGeneration

        torch.manual_seed(0)
        config = T5Config(**BUILTIN_MODELS[name])
        model = (T5EncoderModel if encoder_only else T5ForConditionalGeneration)(config)
        if not encoder_only:  # a separate lm_head, as published t5-v1.1 has (transformers 5's T5Config ties it)
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * config.initializer_factor)
            model.config.tie_word_embeddings = False
        return model if dtype == "auto" else model.to(getattr(torch, dtype))
    from ..loading import from_pretrained

    auto_class = AutoModelForTextEncoding if encoder_only else AutoModelForSeq2SeqLM
    return from_pretrained(auto_class, name, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, UpcycleArguments, MoEConfig)


def run(args: argparse.Namespace) -> int:
    from ..upcycle import upcycle
    from ..utils import atomic_output_dir, copy_tokenizer

    command_line = getattr(args, "command_line", None)
    args, moe = dataclasses_from_namespace(args, UpcycleArguments, MoEConfig)
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite_output_dir) as staging:
        dense = _load_dense(args.model_name_or_path, args.encoder_only, args.dtype)
        dense_params = sum(p.numel() for p in dense.parameters())
        model = upcycle(dense, moe, base_model=args.model_name_or_path)
        if command_line:
            model.config.upcycled_from["command"] = command_line  # for the model card
        del dense
        model.save_pretrained(staging)
        has_tokenizer = copy_tokenizer(args.model_name_or_path, staging)
    summary = {
        "output_dir": args.output_dir,
        "architecture": type(model).__name__,
        "moe_layers": model.config.moe_layer_indices,
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "dense_parameters": dense_params,
        "moe_parameters": sum(p.numel() for p in model.parameters()),
        "upcycled_from": model.config.upcycled_from,
        "tokenizer_saved": has_tokenizer,
    }
    print(json.dumps(summary, indent=2))
    return 0
