"""`mixt5 convert-seed SRC DST`: a checkpoint of the study's transformers fork → a MixT5 checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Convert a checkpoint of the study's transformers fork to MixT5."
    parser.add_argument("src", help="folder with the fork's config.json (activate_moe: true) and weights")
    parser.add_argument("dst", help="output folder for the MixT5 checkpoint")
    parser.add_argument("--overwrite_output_dir", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..seed_format import convert_seed_checkpoint
    from ..utils import atomic_output_dir

    with atomic_output_dir(args.dst, overwrite=args.overwrite_output_dir) as staging:
        convert_seed_checkpoint(args.src, staging, command=getattr(args, "command_line", None))
    print(f"converted {args.src} -> {args.dst}")
    return 0
