"""Build the small pretrained dense T5 shipped for the offline demo (``src/mixt5/resources/demo-t5/``).

Steps, all offline:

1. Generate text with :func:`mixt5.data.demo.pretraining_documents`: paragraphs like the demo's contexts, about
   train-pool names only, each followed by FAQ-style question-answer lines and restatements of its facts. Those lines
   make the task learnable on purpose: pre-training already teaches the model to copy a value out of a paragraph.
2. Train a byte-level-free BPE vocabulary on it with the ``tokenizers`` library, then turn that vocabulary into a
   SentencePiece-style Unigram model (log-frequency scores), so the result is a plain ``T5Tokenizer``:
   ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then the pieces, then ``<extra_id_99>`` … ``<extra_id_0>`` (last id), like T5.
3. Pre-train a small T5 v1.1-style ``T5ForConditionalGeneration`` (4+4 layers, d_model 192, gated-GELU, tied
   embeddings, no dropout; 3.95M parameters) with a mixture of T5 span corruption and salient-span masking (names and
   attribute values; the documents restate facts, so many masked values can be copied from elsewhere in the context).
   Adafactor, learning rate 1e-2, a cosine schedule planned over ``--steps`` 8,000 steps and stopped at ``--stop-at``
   2,000: copying emerges between steps 1,250 and 2,000 (loss 2.5 -> 0.74) and that is all the demo needs.
4. ``save_pretrained`` (fp32 safetensors, 15.8 MB) model + tokenizer into the output folder.

Run (the shipped checkpoint, with the defaults)::

    python scripts/make_demo_checkpoint.py            # on a CUDA GPU: about 3.5 minutes (H200)

The batches depend on ``--seed`` and ``--workers`` only, and the tokenizer is the same on every machine; bf16 GPU
arithmetic is not bit-reproducible, so a re-run gives a checkpoint of the same quality, not the same bytes. On a
2-core CPU (``--device cpu``) it takes hours: the shipped one was made on a GPU.

Recorded run (2026-11-28, one H200, torch 2.11.0+cu130, transformers 5.24.0, two such runs sharing the GPU): 2,000
steps of 128 sequences in 207 s; loss (mean of 250 steps) 4.49 at step 250, 2.70 at 1,000, 2.50 at 1,250, 1.72 at
1,500, 1.00 at 1,750, 0.74 at 2,000. The same recipe with ``--steps 2500 --stop-at 0`` (the schedule decays before
copying is learnt) ended at loss 1.04 and was not shipped. What the checkpoint gives after fine-tuning: ``mixt5 demo``
(README).
"""

from __future__ import annotations

import argparse
import math
import random
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
from transformers.optimization import Adafactor

from mixt5.data.demo import QUESTION_TEMPLATES, pretraining_documents
from mixt5.utils import atomic_output_dir

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "mixt5" / "resources" / "demo-t5"
NUM_SENTINELS = 100


# --- tokenizer -------------------------------------------------------------------------------------------------------


def tokenizer_corpus(documents: Sequence[str]) -> list[str]:
    """Documents plus the words of the fine-tuning prompts (question templates without their names)."""
    prompts = [t.replace("{name}", "").replace("{pet}", "pet") for t in QUESTION_TEMPLATES]
    return [*documents, *(["question: context:", *prompts] * 20)]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> T5Tokenizer:
    """BPE vocabulary → Unigram scores → ``T5Tokenizer`` with T5's special-token layout and 100 sentinels."""
    specials = ["<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Split on punctuation too, so that no piece glues a word to the following "." or "," (answers stay token spans).
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    )
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_SENTINELS, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    counts: Counter[str] = Counter()
    for encoding in bpe.encode_batch(list(texts)):
        counts.update(encoding.tokens)
    total = sum(counts.values())
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]) if p not in specials]
    scored = sorted(((p, math.log((counts[p] + 0.1) / total)) for p in pieces), key=lambda ps: -ps[1])
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(NUM_SENTINELS))]
    vocab = [(s, 0.0) for s in specials] + scored + sentinels
    return T5Tokenizer(vocab=vocab, extra_ids=NUM_SENTINELS, model_max_length=512)


# --- denoising objectives --------------------------------------------------------------------------------------------


def _random_spans(n: int, rng: random.Random, density: float, mean_span: float) -> list[tuple[int, int]]:
    """T5-style random span corruption: non-overlapping token spans covering about `density` of `n` tokens."""
    num_noise = max(1, round(n * density))
    num_spans = max(1, round(num_noise / mean_span))
    noise_lengths = _composition(num_noise, num_spans, rng)
    keep_lengths = _composition(n - num_noise, num_spans, rng)
    spans, pos = [], 0
    for keep, noise in zip(keep_lengths, noise_lengths, strict=True):
        pos += keep
        spans.append((pos, pos + noise))
        pos += noise
    return spans


def _composition(total: int, parts: int, rng: random.Random) -> list[int]:
    """Split `total` into `parts` positive integers (uniformly random composition); zeros allowed if total < parts."""
    if total < parts:
        return [1] * total + [0] * (parts - total)
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def _token_spans(offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans covering the given character spans (those past the truncated text are dropped)."""
    token_spans = []
    for start, end in char_spans:
        tokens = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if tokens and end <= offsets[-1][1]:
            token_spans.append((tokens[0], tokens[-1] + 1))
    return token_spans


def corrupt(
    ids: Sequence[int], spans: Sequence[tuple[int, int]], sentinel_ids: Sequence[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """Replace each (sorted, disjoint) span by a sentinel; the target lists the sentinels and the removed tokens."""
    inputs, labels, pos = [], [], 0
    for k, (start, end) in enumerate(spans):
        if start < pos or start >= end:
            continue  # overlap or empty span
        inputs += [*ids[pos:start], sentinel_ids[k]]
        labels += [sentinel_ids[k], *ids[start:end]]
        pos = end
    return [*inputs, *ids[pos:], eos_id], [*labels, eos_id]


class DenoisingStream:
    """Endless, seeded stream of (input_ids, labels) pairs built from freshly generated documents."""

    def __init__(self, tokenizer: T5Tokenizer, seed: int | str, max_length: int, salient_fraction: float) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.documents = pretraining_documents(10**9, seed)
        self.max_length = max_length
        self.salient_fraction = salient_fraction
        self.sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        while True:
            document = next(self.documents)
            enc = self.tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"][: self.max_length - 1], enc["offset_mapping"][: self.max_length - 1]
            spans = []
            if self.rng.random() < self.salient_fraction:
                spans = _token_spans(offsets, document.copy_spans)  # answers and repeated values
            if not spans:
                spans = _random_spans(len(ids), self.rng, density=0.15, mean_span=3.0)
            yield corrupt(ids, spans, self.sentinels, self.tokenizer.eos_token_id)


class DenoisingBatches(torch.utils.data.IterableDataset):
    """Collated batches from one `DenoisingStream` per DataLoader worker (seeded by `seed` and the worker's id), so
    document generation and tokenisation keep up with a GPU; the batch order is fixed by `seed` and `--workers`."""

    def __init__(self, tokenizer: T5Tokenizer, args: argparse.Namespace) -> None:
        self.tokenizer, self.args = tokenizer, args

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        seed = f"{self.args.seed}-{info.id if info is not None else 0}"
        stream = iter(DenoisingStream(self.tokenizer, seed, self.args.max_length, self.args.salient_fraction))
        while True:
            yield collate([next(stream) for _ in range(self.args.batch_size)], self.tokenizer.pad_token_id)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch (padded label positions are -100) to few distinct shapes: new shapes are slow in oneDNN."""
    src_len = _round_up(max(len(x) for x, _ in pairs), 32)
    tgt_len = _round_up(max(len(y) for _, y in pairs), 16)
    input_ids = torch.tensor([x + [pad_id] * (src_len - len(x)) for x, _ in pairs])
    labels = torch.tensor([y + [-100] * (tgt_len - len(y)) for _, y in pairs])
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


# --- model -----------------------------------------------------------------------------------------------------------


def make_model(vocab_size: int, args: argparse.Namespace) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=args.d_model,
        d_kv=args.d_model // args.num_heads,
        d_ff=args.d_ff,
        num_layers=args.num_layers,
        num_decoder_layers=args.num_decoder_layers,
        num_heads=args.num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=True,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def pretrain(
    model: T5ForConditionalGeneration,
    tokenizer: T5Tokenizer,
    args: argparse.Namespace,
    on_step: Callable[[int], None] | None = None,
) -> float:
    """Adafactor (T5's optimizer), linear warm-up then cosine decay to 10 %, bf16 autocast; returns the mean loss of
    the last 100 steps.

    `on_step(step)` is called after each optimizer step (1-based), e.g. to save intermediate checkpoints.
    """
    device = torch.device(args.device)
    model.to(device)
    batches = iter(
        torch.utils.data.DataLoader(
            DenoisingBatches(tokenizer, args), batch_size=None, num_workers=args.workers,
            pin_memory=device.type == "cuda", prefetch_factor=8 if args.workers else None,
        )
    )  # fmt: skip
    optimizer = Adafactor(model.parameters(), lr=args.lr, scale_parameter=True, relative_step=False)

    def lr_factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[torch.Tensor] = []  # kept on the device: a .item() per step would synchronise a GPU each step
    start = time.time()
    for step in range(args.stop_at or args.steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if on_step is not None:
            on_step(step + 1)
        if (step + 1) % args.log_every == 0 or step + 1 == (args.stop_at or args.steps):
            recent = torch.stack(losses[-args.log_every :]).mean().item()
            print(f"step {step + 1:6d}  loss {recent:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)  # fmt: skip
    return torch.stack(losses[-100:]).mean().item()


def save(model: T5ForConditionalGeneration, tokenizer: T5Tokenizer, out: Path) -> None:
    """`save_pretrained` model (fp32 safetensors) and tokenizer, with generation defaults set; `out` is replaced in
    one rename, so a run killed while saving leaves the previous checkpoint (the shipped one, by default) whole."""
    model.generation_config.decoder_start_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    with atomic_output_dir(out, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2100, help="including the 100 sentinels")
    parser.add_argument("--tokenizer-documents", type=int, default=20000)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--d-ff", type=int, default=384)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-decoder-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8000, help="length of the learning-rate schedule")
    parser.add_argument("--stop-at", type=int, default=2000, help="stop after this many steps (0: run all --steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--salient-fraction", type=float, default=0.5)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=7, help="DataLoader workers (the batches depend on it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=0, help="also save OUT-step-N every N steps (0: never)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    documents = [d.text for d in pretraining_documents(args.tokenizer_documents, seed=args.seed + 1)]
    tokenizer = train_tokenizer(tokenizer_corpus(documents), args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens ({time.time() - start:.0f}s)", flush=True)

    model = make_model(len(tokenizer), args)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    def on_step(step: int) -> None:
        if args.save_every and step % args.save_every == 0 and step < (args.stop_at or args.steps):
            save(model, tokenizer, args.out.with_name(f"{args.out.name}-step-{step}"))

    final_loss = pretrain(model, tokenizer, args, on_step)
    save(model.cpu().eval(), tokenizer, args.out)
    print(f"saved to {args.out}; final loss (mean of last 100 steps) {final_loss:.4f}; "
          f"total {time.time() - start:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
