"""Prototype of the offline demo's fine-tune: shipped demo T5 → synthetic QA → held-out SQuAD EM/F1.

Fine-tunes ``src/mixt5/resources/demo-t5`` (dense, or with ``--moe`` an upcycled copy) on the train split of
:func:`mixt5.data.demo.make_demo_squad` with ``transformers.Seq2SeqTrainer`` and evaluates greedy generation on
questions about held-out entities, with the official SQuAD v1.1 EM/F1.

Usage::

    python scripts/check_demo_finetune.py            # dense
    python scripts/check_demo_finetune.py --moe 4    # upcycled: 4 experts, top-2, last 2 blocks of each stack

Recorded results: see ``RECORDED_RESULTS`` below.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5ForConditionalGeneration,
)

from mixt5.data.demo import iter_examples, make_demo_squad, most_frequent_answer
from mixt5.metrics import squad_metrics

RECORDED_RESULTS = "not yet recorded"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "src" / "mixt5" / "resources" / "demo-t5"


def features(squad: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_source_length: int) -> Dataset:
    """``question: … context: …`` → answer, tokenized (inputs are not padded: the collator pads per batch)."""
    examples = list(iter_examples(squad))
    sources = [f"question: {e['question']} context: {e['context']}" for e in examples]
    encoded = tokenizer(sources, max_length=max_source_length, truncation=True)
    labels = tokenizer(text_target=[e["answers"][0] for e in examples], max_length=16, truncation=True)
    return Dataset.from_dict({**encoded, "labels": labels["input_ids"]})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--train-paragraphs", type=int, default=1500)
    parser.add_argument("--questions-per-paragraph", type=int, default=4)
    parser.add_argument("--eval-paragraphs", type=int, default=100)
    parser.add_argument("--max-source-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scheduler", default="linear")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    parser.add_argument("--dropout", type=float, default=None, help="override the checkpoint's dropout_rate")
    parser.add_argument("--moe", type=int, default=0, help="upcycle to this many experts (0: dense)")
    parser.add_argument("--moe-layers", default="last:2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start, cpu_start = time.time(), time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    overrides = {} if args.dropout is None else {"dropout_rate": args.dropout}
    model = T5ForConditionalGeneration.from_pretrained(args.model, **overrides)
    if args.moe:
        from mixt5 import MoEConfig, upcycle

        model = upcycle(model, MoEConfig(num_experts=args.moe, top_k=2, moe_layers=args.moe_layers, seed=args.seed))
    train_squad = make_demo_squad(args.train_paragraphs, args.seed, "train", args.questions_per_paragraph)
    eval_squad = make_demo_squad(args.eval_paragraphs, args.seed, "heldout", args.questions_per_paragraph)
    train_set = features(train_squad, tokenizer, args.max_source_length)
    eval_set = features(eval_squad, tokenizer, args.max_source_length)
    setup_s = time.time() - start

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = Seq2SeqTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=128,
            learning_rate=args.lr,
            lr_scheduler_type=args.scheduler,
            warmup_steps=args.warmup_steps,
            weight_decay=0.0,
            num_train_epochs=args.epochs,
            bf16=args.bf16,
            logging_steps=25,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            predict_with_generate=True,
            generation_max_length=16,
            generation_num_beams=1,
            use_cpu=True,
            seed=args.seed,
        )
        # pad_to_multiple_of: few distinct shapes (oneDNN is slow on every new one, notably in bf16)
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, pad_to_multiple_of=16)
        trainer = Seq2SeqTrainer(
            model=model, args=training_args, train_dataset=train_set, data_collator=collator, processing_class=tokenizer
        )
        train_start = time.time()
        train_output = trainer.train()
        train_s = time.time() - train_start
        eval_start = time.time()
        output = trainer.predict(eval_set)
        eval_s = time.time() - eval_start

    predictions = output.predictions
    predictions = [[t for t in row if t >= 0] for row in predictions]  # generation pads with -100
    texts = tokenizer.batch_decode(predictions, skip_special_tokens=True)
    examples = list(iter_examples(eval_squad))
    gold = {e["id"]: e["answers"] for e in examples}
    scores = squad_metrics(gold, {e["id"]: t.strip() for e, t in zip(examples, texts, strict=True)})
    baseline = most_frequent_answer(train_squad)
    baseline_scores = squad_metrics(gold, dict.fromkeys(gold, baseline), include_study_variant=False)
    result = {
        "model": "dense" if not args.moe else f"moe{args.moe}-{args.moe_layers}",
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "steps": train_output.global_step,
        "train_loss": round(train_output.training_loss, 4),
        "exact_match": round(scores["exact_match"], 2),
        "f1": round(scores["f1"], 2),
        "baseline_exact_match": round(baseline_scores["exact_match"], 2),
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "total_s": round(time.time() - start, 1),
        "total_cpu_s": round(time.process_time() - cpu_start, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(result, indent=1))
    for e, t in list(zip(examples, texts, strict=True))[:8]:
        print(f"  {e['question']!r:70} gold {e['answers'][0]!r:22} pred {t.strip()!r}")
    return result


if __name__ == "__main__":
    main()
