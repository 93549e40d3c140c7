"""Extractive QA (an encoder with a span head, e.g. `BertForQuestionAnswering`): SQuAD examples → sliding-window
features with start/end labels, the training examples whose answer offset is known, and n-best post-processing of
start/end logits back to answer text in the official predictions format.

The windowing and post-processing are written here by hand, after the recipe of transformers'
`examples/pytorch/question-answering` (`prepare_train_features`, `prepare_validation_features`,
`postprocess_qa_predictions`): transformers 5 ships neither a question-answering pipeline nor the old `squad`
processors (`squad_convert_examples_to_features`), so there is no library function left to call. The tokenizer does
the windowing itself (`return_overflowing_tokens` with a `stride`); this module labels the windows and maps logits
back to characters through the fast tokenizer's offset mapping.

Examples come from `mixt5.data.squad` (the one SQuAD parser); scores from `mixt5.metrics.squad_metrics`.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mixt5.data.squad import EXAMPLE_FEATURES, SquadExample, SquadExamples, examples_to_dataset
from mixt5.utils import read_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 384  # tokens per window: question, context piece and special tokens
DEFAULT_DOC_STRIDE = 128  # tokens shared by consecutive windows of one context
DEFAULT_N_BEST_SIZE = 20  # best start and best end positions tried per window
DEFAULT_MAX_ANSWER_LENGTH = 30  # tokens
ANSWER_STARTS_SUFFIX = ".ambiguous-answer-starts.json"  # sidecar of a reconstructed train file, beside it
_IDS_SHOWN = 5
_TRAIN_FLAG_COLUMNS = ["_example_id", "_no_answer", "_answer_in_no_window"]  # how many example ids a log line lists
_DATA_SUFFIXES = re.compile(r"\.(json|jsonl)(\.gz)?$", re.IGNORECASE)


@dataclass
class ExtractiveArguments:
    """The extractive task's own flags (for `HfArgumentParser`); `--max_sequence_length` is shared with seq2seq."""

    doc_stride: int = field(
        default=DEFAULT_DOC_STRIDE,
        metadata={"help": "Tokens shared by consecutive windows when a context is longer than one window."},
    )
    n_best_size: int = field(
        default=DEFAULT_N_BEST_SIZE, metadata={"help": "Best start and end logits tried per window."}
    )
    max_answer_length: int = field(default=DEFAULT_MAX_ANSWER_LENGTH, metadata={"help": "Longest answer, in tokens."})
    skip_answer_starts_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON list of {id, ...} whose answer offsets are guessed; those questions get no training "
            f"labels. Default: `<train file stem>{ANSWER_STARTS_SUFFIX}` beside the train file, if it exists."
        },
    )

    def __post_init__(self) -> None:
        for name in ("doc_stride", "n_best_size", "max_answer_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")


# --- training examples whose answer offset is known -------------------------------------------------------------


@dataclass
class AnswerStartSkips:
    """What `drop_unknown_answer_starts` left out of training."""

    num_examples: int  # training questions given
    num_guessed: int  # left out: listed in the answer-starts file (offset guessed)
    num_bad: int  # left out: first answer_start -1 or not indexing the answer text
    answer_starts_file: str | None = None
    skipped_ids: list[str] = field(default_factory=list)  # the first few left out

    @property
    def num_kept(self) -> int:
        return self.num_examples - self.num_guessed - self.num_bad

    def as_metrics(self, prefix: str = "train_") -> dict[str, int]:
        """Counts for a metrics dict, e.g. `train_skipped_guessed_answer_starts`."""
        return {
            f"{prefix}skipped_guessed_answer_starts": self.num_guessed,
            f"{prefix}skipped_bad_answer_starts": self.num_bad,
            f"{prefix}labelled_examples": self.num_kept,
        }


def find_answer_starts_file(train_file: str | os.PathLike | None) -> Path | None:
    """The sidecar beside a train file: `train-v1.1.reconstructed.json.gz` → `train-v1.1.reconstructed` +
    `ANSWER_STARTS_SUFFIX` in the same folder, if that file exists; else None (with a warning when the train file
    is named as a reconstruction, whose guessed offsets would then become labels)."""
    if train_file is None:
        return None
    path = Path(train_file)
    stem = _DATA_SUFFIXES.sub("", path.name)
    candidate = path.with_name(stem + ANSWER_STARTS_SUFFIX)
    if candidate.is_file():
        return candidate
    if "reconstructed" in stem:
        logger.warning(
            "%s looks like a reconstructed train file but %s is absent: every answer offset is trusted",
            path,
            candidate.name,
        )
    return None


def read_answer_starts_file(path: str | os.PathLike) -> dict[str, str | None]:
    """`{id: answer text or None}` from a JSON list of records with an `id` (and, optionally, the answer `text`),
    as in the reconstructed train set's sidecar (`{"id", "text", "chosen", "candidates"}`)."""
    records = read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{os.fspath(path)}: expected a JSON list of {{id, text, ...}}, got {type(records).__name__}")
    guessed: dict[str, str | None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or not isinstance(record.get("id"), str):
            raise ValueError(f"{os.fspath(path)}: record {i} is not an object with a string 'id'")
        text = record.get("text")
        guessed[record["id"]] = text if isinstance(text, str) else None
    return guessed


def _has_known_start(example: SquadExample) -> bool:
    if not example.answers or not example.answer_starts:
        return False
    text, start = example.answers[0], example.answer_starts[0]
    return start >= 0 and example.context[start : start + len(text)] == text


def drop_unknown_answer_starts(
    examples: Sequence[SquadExample], answer_starts_file: str | os.PathLike | None = None
) -> tuple[SquadExamples, AnswerStartSkips]:
    """Keep the training examples whose first answer's offset is known.

    Left out: the ids listed in `answer_starts_file` (guessed offsets; see `find_answer_starts_file`), and examples
    whose first `answer_start` is -1 or does not index its answer text. Logs what was left out; the returned
    `AnswerStartSkips` has the counts for the run's metrics. Raises `ValueError` naming the file when one of its
    records gives an answer text other than the example's (the file belongs to other data).
    """
    guessed = read_answer_starts_file(answer_starts_file) if answer_starts_file is not None else {}
    kept, skipped, num_guessed, num_bad = [], [], 0, 0
    for example in examples:
        if example.id in guessed:
            text = guessed[example.id]
            if text is not None and example.answers[:1] != [text]:
                raise ValueError(
                    f"{os.fspath(answer_starts_file)}: id {example.id!r} has answer {text!r} there but "
                    f"{example.answers[:1]!r} in the training data; is it the sidecar of another file?"
                )
            num_guessed += 1
            skipped.append(example.id)
        elif not _has_known_start(example):
            num_bad += 1
            skipped.append(example.id)
        else:
            kept.append(example)
    source = getattr(examples, "source", "")
    if examples and not kept:
        raise ValueError(f"{source or 'training data'}: no training question has a known answer offset")
    skips = AnswerStartSkips(
        num_examples=len(examples),
        num_guessed=num_guessed,
        num_bad=num_bad,
        answer_starts_file=None if answer_starts_file is None else os.fspath(answer_starts_file),
        skipped_ids=skipped[:_IDS_SHOWN],
    )
    if skipped or answer_starts_file is not None:
        logger.log(
            logging.WARNING if skipped else logging.INFO,
            "%s: training on %d of %d questions: left out %d whose answer offset is guessed (listed in %s) and %d "
            "whose answer_start does not index the answer text (first ids: %s)",
            source or "training data",
            skips.num_kept,
            skips.num_examples,
            num_guessed,
            skips.answer_starts_file,
            num_bad,
            ", ".join(skips.skipped_ids) or "none",
        )
    return SquadExamples(kept, source=source, version=getattr(examples, "version", None)), skips


# --- sliding-window features ------------------------------------------------------------------------------------


@dataclass
class WindowStats:
    """How the contexts were cut into windows."""

    num_examples: int
    num_features: int  # windows
    num_examples_windowed: int  # contexts longer than one window
    num_features_without_answer: int = 0  # training windows labelled with the CLS index (answer not inside)
    num_answers_in_no_window: int = 0  # training examples whose answer lies wholly inside none of their windows
    answer_in_no_window_ids: list[str] = field(default_factory=list)  # the first few of those


def _question_first(tokenizer: PreTrainedTokenizerBase) -> bool:
    # As in transformers' recipe: models padded on the left (e.g. XLNet) read the context first.
    return tokenizer.padding_side == "right"


def _tokenize_windows(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_sequence_length: int, doc_stride: int
) -> Any:
    questions = [question.lstrip() for question in batch["question"]]  # some SQuAD questions start with spaces
    question_first = _question_first(tokenizer)
    pair = (questions, batch["context"]) if question_first else (batch["context"], questions)
    # Checked before tokenising: tokenizers panics (pyo3's PanicException, not an Exception) when a question leaves
    # the context no more than `stride` tokens of a window.
    room = max_sequence_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride
    question_tokens = tokenizer(questions, add_special_tokens=False)["input_ids"]
    for qid, tokens in zip(batch["id"], question_tokens, strict=True):
        if len(tokens) >= room:
            raise ValueError(
                f"question {qid!r} is {len(tokens)} tokens long: with --max_sequence_length={max_sequence_length} "
                f"its context would get no more than --doc_stride={doc_stride} tokens a window; raise "
                "--max_sequence_length or lower --doc_stride"
            )
    return tokenizer(
        *pair,
        truncation="only_second" if question_first else "only_first",
        max_length=max_sequence_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        # A collator padding on the left would shift every token by a batch-dependent amount away from its labels
        # and offsets, so windows are padded to full length here.
        padding="max_length" if not question_first else False,
    )


def _context_span(sequence_ids: list[int | None], context_index: int) -> tuple[int, int]:
    """First and last token index of the context in one window."""
    first = sequence_ids.index(context_index)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(context_index)
    return first, last


def _train_batch(
    batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase, max_sequence_length: int, doc_stride: int
) -> dict[str, list]:
    encoded = _tokenize_windows(batch, tokenizer, max_sequence_length, doc_stride)
    context_index = 1 if _question_first(tokenizer) else 0
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    offset_mapping = encoded.pop("offset_mapping")
    starts, ends, no_answer = [], [], []
    answer_found: dict[int, bool] = {}
    for i, offsets in enumerate(offset_mapping):
        sample = sample_mapping[i]
        input_ids = encoded["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answers, answer_starts = batch["answers"][sample], batch["answer_starts"][sample]
        context = batch["context"][sample]
        if not answers or not answer_starts or answer_starts[0] < 0:
            raise ValueError(
                f"training example {batch['id'][sample]!r} has no known answer offset; "
                "filter the examples with drop_unknown_answer_starts first"
            )
        # The answer's characters, its surrounding whitespace left out (no token covers whitespace).
        start_char = answer_starts[0]
        end_char = start_char + len(answers[0])
        while start_char < end_char and context[start_char].isspace():
            start_char += 1
        while end_char > start_char and context[end_char - 1].isspace():
            end_char -= 1
        first, last = _context_span(encoded.sequence_ids(i), context_index)
        window_starts = [offsets[t][0] for t in range(first, last + 1)]
        window_ends = [offsets[t][1] for t in range(first, last + 1)]
        if window_starts[0] <= start_char and window_ends[-1] >= end_char:
            # the last token starting at or before the answer, and the first ending at or after it
            starts.append(first + bisect.bisect_right(window_starts, start_char) - 1)
            ends.append(first + bisect.bisect_left(window_ends, end_char))
            answer_found[sample] = True
        else:
            starts.append(cls_index)
            ends.append(cls_index)
            answer_found.setdefault(sample, False)
        no_answer.append(starts[-1] == cls_index)
    first_of_example = [i == 0 or sample_mapping[i - 1] != s for i, s in enumerate(sample_mapping)]
    return {
        **encoded,
        "start_positions": starts,
        "end_positions": ends,
        "_example_id": [batch["id"][s] for s in sample_mapping],
        "_no_answer": no_answer,
        "_answer_in_no_window": [
            first and not answer_found[s] for first, s in zip(first_of_example, sample_mapping, strict=True)
        ],
    }


def _eval_batch(
    batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase, max_sequence_length: int, doc_stride: int
) -> dict[str, list]:
    encoded = _tokenize_windows(batch, tokenizer, max_sequence_length, doc_stride)
    context_index = 1 if _question_first(tokenizer) else 0
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    offset_mapping = encoded.pop("offset_mapping")
    return {
        **encoded,
        "example_id": [batch["id"][s] for s in sample_mapping],
        # Only context tokens keep their character offsets: post-processing never answers with anything else.
        "offset_mapping": [
            [
                span if kind == context_index else None
                for span, kind in zip(offsets, encoded.sequence_ids(i), strict=True)
            ]
            for i, offsets in enumerate(offset_mapping)
        ],
    }


def _as_dataset(examples: datasets.Dataset | Iterable[SquadExample]) -> datasets.Dataset:
    dataset = examples if isinstance(examples, datasets.Dataset) else examples_to_dataset(examples)
    missing = [name for name in EXAMPLE_FEATURES if name not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks column(s) {', '.join(missing)}; build it with examples_to_dataset")
    return dataset


def _map_windows(
    examples: datasets.Dataset | Iterable[SquadExample],
    batch_function: Any,
    tokenizer: PreTrainedTokenizerBase,
    max_sequence_length: int,
    doc_stride: int,
    num_proc: int | None,
    progress: bool = True,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """`(examples as a dataset, their windows)`: `batch_function` mapped over batches of examples; without
    `progress`, applied to all of them at once in this process (a few questions per request in predict and serve:
    `Dataset.map` would draw a progress bar per call, and datasets can switch bars off only process-wide)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"extractive QA needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    if not 0 < doc_stride < max_sequence_length:
        raise ValueError(f"need 0 < --doc_stride < --max_sequence_length, got {doc_stride} and {max_sequence_length}")
    dataset = _as_dataset(examples)
    function = partial(
        batch_function, tokenizer=tokenizer, max_sequence_length=max_sequence_length, doc_stride=doc_stride
    )
    if not progress:
        return dataset, datasets.Dataset.from_dict(function(dataset[:]))
    features = dataset.map(
        function, batched=True, num_proc=num_proc, remove_columns=dataset.column_names, desc="Windowing"
    )
    return dataset, features


def _num_windowed(example_ids: list[str]) -> int:
    """Examples cut into more than one window."""
    return sum(count > 1 for count in Counter(example_ids).values())


def prepare_train_features(
    examples: datasets.Dataset | Iterable[SquadExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    doc_stride: int = DEFAULT_DOC_STRIDE,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, WindowStats]:
    """Training windows with `start_positions` / `end_positions` (token indices of the first answer).

    Each question and context become one or more windows of at most `max_sequence_length` tokens, consecutive
    windows sharing `doc_stride` context tokens. A window that does not hold the whole answer is labelled with the
    CLS token's index (0 where the tokenizer has none), as in transformers' recipe. Columns: the tokenizer's model
    inputs (`input_ids`, `attention_mask`, `token_type_ids` where it makes them), `start_positions`,
    `end_positions`. Windows are not padded (pad in the collator), unless the tokenizer pads on the left: then the
    context comes first and every window is padded to `max_sequence_length`. Filter the examples with
    `drop_unknown_answer_starts` first.
    """
    dataset, features = _map_windows(examples, _train_batch, tokenizer, max_sequence_length, doc_stride, num_proc)
    flags = features.select_columns(_TRAIN_FLAG_COLUMNS).to_dict()
    lost = [qid for qid, lost in zip(flags["_example_id"], flags["_answer_in_no_window"], strict=True) if lost]
    stats = WindowStats(
        num_examples=len(dataset),
        num_features=len(features),
        num_examples_windowed=_num_windowed(flags["_example_id"]),
        num_features_without_answer=sum(flags["_no_answer"]),
        num_answers_in_no_window=len(lost),
        answer_in_no_window_ids=lost[:_IDS_SHOWN],
    )
    logger.info("Training windows: %s", stats)
    if lost:
        logger.warning(
            "%d of %d training answers lie wholly inside none of their windows (longer than a window can hold?); "
            "they are trained as 'no answer here' (first ids: %s)",
            len(lost),
            len(dataset),
            ", ".join(stats.answer_in_no_window_ids),
        )
    return features.remove_columns(_TRAIN_FLAG_COLUMNS), stats


def prepare_eval_features(
    examples: datasets.Dataset | Iterable[SquadExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    doc_stride: int = DEFAULT_DOC_STRIDE,
    num_proc: int | None = None,
    progress: bool = True,
) -> tuple[datasets.Dataset, WindowStats]:
    """Evaluation windows, cut as in `prepare_train_features`, with `example_id` and `offset_mapping` kept for
    `postprocess_predictions`: `offset_mapping[t]` is the `(start, end)` character span of token `t` in the context,
    None for question, special and padding tokens. `Trainer` drops both columns before the forward pass
    (`remove_unused_columns`); examples need no answers. `progress=False`: no progress bar, no `num_proc` (for the
    few questions of one request)."""
    dataset, features = _map_windows(
        examples, _eval_batch, tokenizer, max_sequence_length, doc_stride, num_proc, progress
    )
    stats = WindowStats(
        num_examples=len(dataset),
        num_features=len(features),
        num_examples_windowed=_num_windowed(features.select_columns(["example_id"]).to_dict()["example_id"]),
    )
    logger.info("Evaluation windows: %s", stats)
    return features, stats


# --- post-processing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerSpan:
    """The best answer of one question: its text, character span in the context, and score (start + end logit)."""

    text: str
    start: int
    end: int  # exclusive
    score: float


def _context_char_spans(features: datasets.Dataset, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`(starts, ends)`, each `(num_features, width)`: every token's character span in the context, -1 where the
    token is not a context token (offset None) or past the window's end. Read from Arrow without Python lists."""
    column = features.with_format("arrow")["offset_mapping"]
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    if lengths.max(initial=0) > width:
        raise ValueError(f"features have windows of {lengths.max()} tokens but the logits only {width} positions")
    pairs = column.flatten()  # one (start, end) pair or null per token
    token_starts = pc.fill_null(pc.list_element(pairs, 0), -1).to_numpy(zero_copy_only=False)
    token_ends = pc.fill_null(pc.list_element(pairs, 1), -1).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    columns = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    starts = np.full((len(lengths), width), -1, dtype=np.int64)
    ends = np.full((len(lengths), width), -1, dtype=np.int64)
    starts[rows, columns] = token_starts
    ends[rows, columns] = token_ends
    return starts, ends


def _top_n(logits: np.ndarray, n: int) -> np.ndarray:
    """`(rows, n)` indices of each row's `n` largest values, largest first (a partition, then a sort of `n`)."""
    top = np.argpartition(-logits, n - 1, axis=1)[:, :n] if n < logits.shape[1] else np.argsort(-logits, axis=1)
    order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def best_answer_spans(
    examples: datasets.Dataset | Iterable[SquadExample],
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = DEFAULT_N_BEST_SIZE,
    max_answer_length: int = DEFAULT_MAX_ANSWER_LENGTH,
) -> dict[str, AnswerSpan | None]:
    """The best answer span of every example across all its windows; None where no window has a valid span.

    Args:
        examples: the examples the features were made from (ids and contexts), in any order.
        features: `prepare_eval_features` output, in the order of the logits.
        start_logits, end_logits: `(num_features, sequence_length)`, as `Trainer.predict` returns them (batches
            padded on the right, e.g. with -100, are fine: padding has no offsets).

    In each window the `n_best_size` highest start and end logits are paired; a pair is a candidate when both
    tokens are context tokens, end ≥ start, and it spans at most `max_answer_length` tokens. The candidate with the
    highest start + end logit over all windows of an example wins.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if start_logits.ndim != 2 or start_logits.shape != end_logits.shape or len(start_logits) != len(features):
        raise ValueError(
            f"need start and end logits of shape (num_features={len(features)}, sequence_length), got "
            f"{start_logits.shape} and {end_logits.shape}"
        )
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size and max_answer_length must be positive, got {n_best_size}, {max_answer_length}")
    num_features, width = start_logits.shape
    char_starts, char_ends = _context_char_spans(features, width)
    n = min(n_best_size, width)
    # top_starts, top_ends: (num_features, n) token indices, best first
    top_starts, top_ends = _top_n(start_logits, n), _top_n(end_logits, n)
    # every (start, end) pair of a window: (num_features, n, n)
    valid = (
        (np.take_along_axis(char_starts, top_starts, axis=1)[:, :, None] >= 0)
        & (np.take_along_axis(char_ends, top_ends, axis=1)[:, None, :] >= 0)
        & (top_ends[:, None, :] >= top_starts[:, :, None])
        & (top_ends[:, None, :] - top_starts[:, :, None] < max_answer_length)
    )
    scores = (
        np.take_along_axis(start_logits, top_starts, axis=1)[:, :, None]
        + np.take_along_axis(end_logits, top_ends, axis=1)[:, None, :]
    ).astype(np.float64)
    scores = np.where(valid, scores, -np.inf).reshape(num_features, n * n)
    best_pair = scores.argmax(axis=1)  # (num_features,)
    best_score = scores[np.arange(num_features), best_pair]
    start_token = top_starts[np.arange(num_features), best_pair // n]
    end_token = top_ends[np.arange(num_features), best_pair % n]

    if isinstance(examples, datasets.Dataset):
        contexts = dict(zip(examples["id"], examples["context"], strict=True))
    else:
        contexts = {example.id: example.context for example in examples}
    example_ids = features.select_columns(["example_id"]).to_dict()["example_id"]  # a list: fast to index
    unknown = next((qid for qid in example_ids if qid not in contexts), None)
    if unknown is not None:
        raise ValueError(f"feature of example {unknown!r}, which is not among the examples")
    spans: dict[str, AnswerSpan | None] = dict.fromkeys(contexts)
    for f in np.argsort(-best_score, kind="stable"):  # best windows first: the first seen per example wins
        qid = example_ids[f]
        if spans[qid] is not None or best_score[f] == -np.inf:
            continue
        start, end = int(char_starts[f, start_token[f]]), int(char_ends[f, end_token[f]])
        spans[qid] = AnswerSpan(contexts[qid][start:end], start, end, float(best_score[f]))
    return spans


def postprocess_predictions(
    examples: datasets.Dataset | Iterable[SquadExample],
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = DEFAULT_N_BEST_SIZE,
    max_answer_length: int = DEFAULT_MAX_ANSWER_LENGTH,
) -> dict[str, str]:
    """Predictions in the official format, `{id: answer text}`, for `mixt5.metrics.squad_metrics`; the empty string
    where no window has a valid span. See `best_answer_spans` for the arguments."""
    spans = best_answer_spans(
        examples, features, start_logits, end_logits, n_best_size=n_best_size, max_answer_length=max_answer_length
    )
    return {qid: "" if span is None else span.text for qid, span in spans.items()}
