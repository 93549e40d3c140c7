"""`mixt5` console script: the only module that parses argv or exits.

mixt5 upcycle --model_name_or_path SRC --output_dir DST [MoEConfig flags]
mixt5 convert-seed SRC DST
mixt5 train | evaluate | predict | score | demo ...   (see `mixt5 COMMAND --help`)
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .config import MoEConfig

logger = logging.getLogger("mixt5")


@dataclass
class UpcycleArguments:
    model_name_or_path: str = field(metadata={"help": "Dense T5/MT5 checkpoint: a hub id or a local folder."})
    output_dir: str = field(metadata={"help": "Where the MixT5 checkpoint (model, tokenizer, MoE settings) goes."})
    encoder_only: bool = field(default=False, metadata={"help": "Load and upcycle a T5EncoderModel."})
    dtype: str = field(default="auto", metadata={"help": "Load dtype: auto (as saved), float32, bfloat16, float16."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def run_upcycle(argv: Sequence[str]) -> int:
    from transformers import AutoModelForSeq2SeqLM, AutoModelForTextEncoding

    from .upcycle import upcycle
    from .utils import atomic_output_dir, copy_tokenizer

    parser = HfArgumentParser((UpcycleArguments, MoEConfig), prog="mixt5 upcycle")
    args, moe = parser.parse_args_into_dataclasses(args=list(argv))
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite_output_dir) as staging:
        auto_class = AutoModelForTextEncoding if args.encoder_only else AutoModelForSeq2SeqLM
        dense = auto_class.from_pretrained(args.model_name_or_path, dtype=args.dtype)
        dense_params = sum(p.numel() for p in dense.parameters())
        model = upcycle(dense, moe, base_model=args.model_name_or_path)
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


def run_convert_seed(argv: Sequence[str]) -> int:
    import argparse

    from .seed_format import convert_seed_checkpoint

    parser = argparse.ArgumentParser(
        prog="mixt5 convert-seed", description="Convert a checkpoint of the study's transformers fork to MixT5."
    )
    parser.add_argument("src", help="folder with the fork's config.json (activate_moe: true) and weights")
    parser.add_argument("dst", help="output folder for the MixT5 checkpoint")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(list(argv))
    from .utils import atomic_output_dir

    with atomic_output_dir(args.dst, overwrite=args.overwrite_output_dir) as staging:
        convert_seed_checkpoint(args.src, staging)
    print(f"converted {args.src} -> {args.dst}")
    return 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "upcycle": (run_upcycle, "turn a dense T5 checkpoint into a sparse MixT5 one"),
    "convert-seed": (run_convert_seed, "convert a checkpoint written by the study's fork"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(len(name) for name in COMMANDS)
        lines = [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: mixt5 COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmixt5: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    try:
        return command(argv[1:])
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"mixt5 {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
