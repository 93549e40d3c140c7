"""`mixt5` console script: the only module that parses argv or exits.

mixt5 upcycle --model_name_or_path SRC --output_dir DST [MoEConfig flags]
mixt5 convert-seed SRC DST
mixt5 train | evaluate | predict | score | demo ...   (see `mixt5 COMMAND --help`)
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import HfArgumentParser

from .config import MoEConfig
from .utils import check_output_path

logger = logging.getLogger("mixt5")


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
    from .loading import from_pretrained

    auto_class = AutoModelForTextEncoding if encoder_only else AutoModelForSeq2SeqLM
    return from_pretrained(auto_class, name, dtype=dtype)


def run_upcycle(argv: Sequence[str]) -> int:
    from .upcycle import upcycle
    from .utils import atomic_output_dir, copy_tokenizer

    parser = HfArgumentParser((UpcycleArguments, MoEConfig), prog="mixt5 upcycle")
    args, moe = parser.parse_args_into_dataclasses(args=list(argv))
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite_output_dir) as staging:
        dense = _load_dense(args.model_name_or_path, args.encoder_only, args.dtype)
        dense_params = sum(p.numel() for p in dense.parameters())
        model = upcycle(dense, moe, base_model=args.model_name_or_path)
        model.config.upcycled_from["command"] = shlex.join(["mixt5", "upcycle", *argv])  # for the model card
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


def run_train(argv: Sequence[str]) -> int:
    from .train import parse_train_args, run_training

    metrics = run_training(*parse_train_args(argv), command=shlex.join(["mixt5", "train", *argv]))
    print(json.dumps(metrics.get("eval", metrics["train"]), indent=2))
    return 0


def run_evaluate(argv: Sequence[str]) -> int:
    from .train import parse_evaluate_args, run_evaluation

    print(json.dumps(run_evaluation(*parse_evaluate_args(argv)), indent=2))
    return 0


@dataclass
class PredictArguments:
    model_name_or_path: str = field(metadata={"help": "Fine-tuned checkpoint (dense or MixT5)."})
    question: str | None = field(default=None, metadata={"help": "One question (with --context)."})
    context: str | None = field(default=None, metadata={"help": "The paragraph that holds the answer."})
    input_file: str | None = field(
        default=None, metadata={"help": "JSON Lines (.jsonl or .jsonl.gz) of {id, question, context}."}
    )
    output_file: str | None = field(default=None, metadata={"help": "JSON Lines of {id, answer[, routing]}."})
    show_routing: bool = field(default=False, metadata={"help": "Also show the experts each token went to."})
    batch_size: int = field(default=16, metadata={"help": "Questions per generate() call."})
    prompt_format: Literal["t5", "seed"] = field(default="t5", metadata={"help": "t5 or seed, as in training."})
    max_sequence_length: int = field(default=512, metadata={"help": "Input tokens kept."})
    generation_max_length: int = field(default=30, metadata={"help": "Max answer tokens."})
    generation_num_beams: int = field(default=1, metadata={"help": "Beams (1: greedy)."})

    def __post_init__(self) -> None:
        if self.output_file is not None:
            check_output_path(self.output_file, "--output_file", is_dir=False)
        for name in ("batch_size", "max_sequence_length", "generation_max_length", "generation_num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")


def _read_questions(path: str) -> list[dict]:
    from .utils import data_file_errors, open_text

    rows = []
    with data_file_errors(path), open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in ("question", "context") if not isinstance(row.get(key), str)]
            if missing:
                raise ValueError(f"{path}:{number}: missing or non-string {', '.join(missing)}")
            rows.append(row)
    return rows


def run_predict(argv: Sequence[str]) -> int:
    from .predict import QAPredictor, format_routing
    from .utils import write_jsonl_atomic

    (args,) = HfArgumentParser(PredictArguments, prog="mixt5 predict").parse_args_into_dataclasses(args=list(argv))
    if args.input_file is None and (args.question is None or args.context is None):
        raise ValueError("give --question and --context, or --input_file (with --output_file).")
    rows = _read_questions(args.input_file) if args.input_file else None
    predictor = QAPredictor(
        args.model_name_or_path,
        prompt_format=args.prompt_format,
        max_source_length=args.max_sequence_length,
        max_length=args.generation_max_length,
        num_beams=args.generation_num_beams,
    )
    if rows is None:
        (result,) = predictor.answer([args.question], [args.context], show_routing=args.show_routing)
        print(result["answer"])
        if "routing" in result:
            print(format_routing(result["routing"]))
        return 0
    outputs = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        answers = predictor.answer(
            [r["question"] for r in chunk], [r["context"] for r in chunk], show_routing=args.show_routing
        )
        outputs += [
            {"id": r.get("id", str(start + i)), **a} for i, (r, a) in enumerate(zip(chunk, answers, strict=True))
        ]
    if args.output_file:
        write_jsonl_atomic(args.output_file, outputs)
        print(f"wrote {len(outputs)} answers to {args.output_file}")
    else:
        for row in outputs:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def run_score(argv: Sequence[str]) -> int:
    import argparse

    from .metrics import score_files

    parser = argparse.ArgumentParser(prog="mixt5 score", description="Official SQuAD v1.1 EM/F1 of a predictions file.")
    parser.add_argument("dataset_file", help="SQuAD v1.1 JSON (the gold answers)")
    parser.add_argument("prediction_file", help="JSON object {question id: predicted answer}")
    parser.add_argument("--full", action="store_true", help="also print counts and the study's non-standard variant")
    parser.add_argument(
        "--question_scores_file",
        help="also write each answered question's EM/F1 here (mixt5 train/evaluate write RUN/question_scores.json; "
        "`mixt5 report` pairs runs on it)",
    )
    args = parser.parse_args(list(argv))
    metrics = score_files(
        args.dataset_file, args.prediction_file, full=args.full, question_scores_file=args.question_scores_file
    )
    print(json.dumps(metrics))
    return 0


def _module_main(module: str) -> Callable[[Sequence[str]], int]:
    """A command implemented by `mixt5.<module>.main(argv) -> int`, imported only when run."""

    def run(argv: Sequence[str]) -> int:
        import importlib

        return importlib.import_module(f"mixt5.{module}").main(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (_module_main("demo"), "offline demo: fine-tune a small dense T5 and its MoE copy on bundled QA"),
    "train": (run_train, "fine-tune a T5 (dense, or upcycled with --enable_moe) on SQuAD-style QA"),
    "evaluate": (run_evaluate, "score any checkpoint with the official SQuAD EM/F1"),
    "predict": (run_predict, "answer questions about a context (optionally showing the routing)"),
    "score": (run_score, "score a predictions file like the official evaluate-v1.1.py"),
    "upcycle": (run_upcycle, "turn a dense T5 checkpoint into a sparse MixT5 one"),
    "convert-seed": (run_convert_seed, "convert a checkpoint written by the study's fork"),
    "sweep": (_module_main("sweep"), "run (or print) a sweep of training runs over arms and seeds, then aggregate"),
    "report": (_module_main("report"), "tables and plots for a run or sweep directory"),
    "serve": (_module_main("serve"), "HTTP API and web page: answers plus the experts each token used"),
}


# What bad input raises: the library names the flag or file in the message, and `main` prints it as one line and
# exits 2 (argparse's code for a bad flag). OSError covers missing, unreadable and unwritable paths (the message
# names the path); MemoryError an upcycle too large for the memory available. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError)


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
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mixt5 {argv[0]}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
