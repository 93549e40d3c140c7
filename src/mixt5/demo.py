"""`mixt5 demo`: the offline embedded default. No network, no arguments, a few minutes on a laptop CPU.

1. Generate the bundled synthetic QA task (`mixt5.data.demo`): questions about made-up entities; the held-out split
   only has entities never seen in training, so answers must be copied from the context.
2. Fine-tune the shipped small pretrained dense T5 (`resources/demo-t5`, made by `scripts/make_demo_checkpoint.py`)
   twice with `mixt5 train`'s own pipeline: dense, and upcycled to MoE (`--enable_moe`).
3. Score both on the held-out questions with the official SQuAD EM/F1, beside the trivial baseline (always the most
   frequent training answer); print a table like the study's, write `results.json`, the predictions and a
   routing-load plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import demo as demo_data
from .data.demo import most_frequent_answer, write_demo_splits
from .metrics import gold_answers_from_squad_json, squad_metrics
from .utils import check_output_path, read_json, write_json_atomic

logger = logging.getLogger(__name__)

# Sizes and hyper-parameters of the embedded default (see docs/demo.md for how they were chosen).
TRAIN_PARAGRAPHS = 1000
VALIDATION_PARAGRAPHS = 100
QUESTIONS_PER_PARAGRAPH = 4
TRAIN_FLAGS = [
    "--learning_rate", "1e-3",
    "--lr_scheduler_type", "constant",
    "--num_train_epochs", "1",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--max_sequence_length", "128",
    "--max_target_length", "16",
    "--generation_max_length", "16",
    "--weight_decay", "0.0",
    "--eval_strategy", "no",
    "--save_strategy", "no",
    "--logging_steps", "10",
    "--use_cpu",
    "--report_to", "none",
    "--dataloader_num_workers", "0",
]  # fmt: skip
MOE_FLAGS = ["--enable_moe", "--num_experts", "4", "--top_k", "2", "--moe_layers", "last:2"]


def _train(name: str, data: tuple[Path, Path], output_dir: Path, seed: int, extra: Sequence[str]) -> dict[str, Any]:
    from .train import parse_train_args, run_training

    argv = [
        "--model_name_or_path", str(demo_data.DEMO_CHECKPOINT),
        "--train_file", str(data[0]),
        "--validation_file", str(data[1]),
        "--output_dir", str(output_dir / name),
        "--seed", str(seed),
        "--overwrite_output_dir",  # a second `mixt5 demo` into the same folder starts over
        *TRAIN_FLAGS,
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    metrics = run_training(*parse_train_args(argv))
    return {
        "exact_match": metrics["eval"]["eval_exact_match"],
        "f1": metrics["eval"]["eval_f1"],
        "seconds": round(time.perf_counter() - start, 1),
    }


@torch.no_grad()
def routing_load(run_dir: Path, validation_file: Path, max_questions: int = 64) -> dict[str, list[float]]:
    """Per MoE layer, the fraction of the token-expert assignments each expert ran on held-out questions
    (teacher-forced)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from .data.squad import format_prompt, load_squad_json
    from .modeling import expert_counts_by_layer

    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    examples = load_squad_json(validation_file)[:max_questions]
    inputs = tokenizer(
        [format_prompt(e.question, e.context, "t5") for e in examples], padding=True, truncation=True, max_length=128,
        return_tensors="pt",
    )  # fmt: skip
    labels = tokenizer(text_target=[e.answers[0] for e in examples], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    with model.collect_routing() as records:
        model(**inputs, labels=labels)
    counts = expert_counts_by_layer(model, records)
    return {name: [round(x, 4) for x in (c / c.sum()).tolist()] for name, c in counts.items()}


def plot_routing_load(loads: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(loads)
    matrix = [loads[name] for name in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(matrix[0]), 0.9 + 0.5 * len(layers)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(matrix[0])), [f"e{i}" for i in range(len(matrix[0]))])
    ax.set_yticks(range(len(layers)), layers)
    for row, values in enumerate(matrix):
        for col, value in enumerate(values):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.3 else "k", fontsize=8)
    ax.set_title("Expert load on held-out questions\n(fraction of token-expert assignments)", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("Most frequent answer", "baseline"), ("Simple FT (dense)", "dense"), ("MoE FT (upcycled)", "moe")]
    lines = ["| Model | EM | F1 | time (s) |", "|---|---|---|---|"]
    for label, key in rows:
        r = results[key]
        lines.append(f"| {label} | {r['exact_match']:.2f} | {r['f1']:.2f} | {r.get('seconds', '-')} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--output_dir", default="mixt5-demo", help="where data, runs and results go")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    checkpoint = demo_data.DEMO_CHECKPOINT
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"the demo checkpoint is missing at {checkpoint}; run scripts/make_demo_checkpoint.py")
    check_output_path(args.output_dir, "--output_dir", is_dir=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.output_dir)
    start = time.perf_counter()
    data = write_demo_splits(
        out / "data", TRAIN_PARAGRAPHS, VALIDATION_PARAGRAPHS, seed=args.seed,
        questions_per_paragraph=QUESTIONS_PER_PARAGRAPH,
    )  # fmt: skip
    baseline_answer = most_frequent_answer(read_json(data[0]))
    gold = gold_answers_from_squad_json(data[1])
    baseline = squad_metrics(gold, dict.fromkeys(gold, baseline_answer), include_study_variant=False)
    results: dict[str, Any] = {
        "baseline": {"exact_match": baseline["exact_match"], "f1": baseline["f1"], "answer": baseline_answer},
        "dense": _train("dense", data, out, args.seed, []),
        "moe": _train("moe", data, out, args.seed, MOE_FLAGS),
    }
    loads = routing_load(out / "moe", data[1])
    write_json_atomic(out / "routing_load.json", loads)
    plot_routing_load(loads, out / "routing_load.png")
    results["num_train_questions"] = TRAIN_PARAGRAPHS * QUESTIONS_PER_PARAGRAPH
    results["num_heldout_questions"] = len(gold)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / "results.json", results)
    print("\nMixT5 demo: synthetic reading comprehension, held-out entities (not a benchmark)\n")
    print(format_table(results))
    print(f"\nresults: {out / 'results.json'}; predictions: {out}/dense|moe/predictions.json; "
          f"routing load: {out / 'routing_load.png'}; total {results['total_seconds']} s")  # fmt: skip
    logger.info(json.dumps(results))
    return 0
