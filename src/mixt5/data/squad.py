"""SQuAD v1.1 JSON, JSON Lines and `datasets` splits → `SquadExample` → tokenised text-to-text features.

This is the only SQuAD parser in MixT5: `mixt5.metrics` reads gold answers through `load_squad_json` too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

import datasets

from mixt5.utils import data_file_errors, open_text, read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PromptFormat = Literal["t5", "seed"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormat)
SEED_SPECIAL_TOKENS = ["[squad]", "[question]", "[context]"]
_IDS_SHOWN = 5  # how many example ids a warning lists

EXAMPLE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "context": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "answer_starts": datasets.List(datasets.Value("int64")),
    }
)


@dataclass
class SquadExample:
    """One question with its context and gold answers.

    `answer_starts[i]` is the character offset of `answers[i]` in `context` as the data gives it; where the data gives
    none (JSON Lines answers as plain strings) it is `context.find(answers[i])`, so -1 when the text is absent.
    """

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    title: str = ""


class SquadExamples(list):
    """The examples of one file or split, in order, plus what the loader found wrong with their answer offsets."""

    def __init__(
        self,
        examples: Iterable[SquadExample] = (),
        *,
        source: str = "",
        version: str | None = None,
        num_bad_answer_starts: int = 0,
        bad_answer_start_ids: Iterable[str] = (),
    ):
        super().__init__(examples)
        self.source = source
        self.version = version
        self.num_bad_answer_starts = num_bad_answer_starts  # answers whose answer_start does not index their text
        self.bad_answer_start_ids = list(bad_answer_start_ids)  # the questions they belong to


class SquadFormatError(ValueError):
    """A data file or split without the expected layout. The message names the file and the record."""


def _error(source: str, where: str | None, problem: str) -> SquadFormatError:
    return SquadFormatError(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def _get(record: Any, key: str, kind: type | tuple[type, ...], source: str, where: str | None) -> Any:
    """`record[key]`, checked to exist and to be of `kind`."""
    if not isinstance(record, Mapping):
        raise _error(source, where, f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise _error(source, where, f"missing {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _error(source, where, f"{key!r} has type {type(value).__name__}")
    return value


def _parse_answers(raw: Any, source: str, where: str) -> list[tuple[str, int | None]]:
    """Answers as `["text", ...]`, `[{"text", "answer_start"}, ...]` or `{"text": [...], "answer_start": [...]}`."""
    if isinstance(raw, Mapping):  # the `datasets` hub layout
        texts = _get(raw, "text", list, source, where)
        starts = raw.get("answer_start", [None] * len(texts))
        if not isinstance(starts, list) or len(starts) != len(texts):
            raise _error(source, where, "'answers' has 'text' and 'answer_start' lists of different lengths")
        pairs = list(zip(texts, starts, strict=True))
    elif isinstance(raw, list):
        pairs = [
            (answer, None)
            if isinstance(answer, str)
            else (_get(answer, "text", str, source, where), answer.get("answer_start"))
            for answer in raw
        ]
    else:
        raise _error(source, where, f"'answers' has type {type(raw).__name__}")
    for text, start in pairs:
        if not isinstance(text, str) or not (start is None or (isinstance(start, int) and not isinstance(start, bool))):
            raise _error(source, where, f"bad answer {text!r} at {start!r}: expected a string and an integer offset")
    return pairs


def _build_examples(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    source: str,
    *,
    split_name: str,
    require_answers: bool,
    strict: bool,
    version: str | None = None,
) -> SquadExamples:
    """Validate `(location, record)` pairs into examples; records have id, question, context, answers and title."""
    examples, seen, bad_ids, num_bad = [], set(), [], 0
    for where, record in records:
        qid = _get(record, "id", (str, int), source, where)
        where = f"{where} (id {qid!r})"
        qid = str(qid)
        if qid in seen:
            raise _error(source, where, "duplicate id")
        seen.add(qid)
        question = _get(record, "question", str, source, where)
        context = _get(record, "context", str, source, where)
        title = record.get("title") or ""
        pairs = []
        if "answers" in record or require_answers:
            pairs = _parse_answers(_get(record, "answers", (list, Mapping), source, where), source, where)
        if require_answers and not pairs:
            raise _error(source, where, f"empty 'answers' ({split_name} data needs at least one answer)")
        bad = [(t, s) for t, s in pairs if s is not None and (s < 0 or context[s : s + len(t)] != t)]
        if bad and strict:
            text, start = bad[0]
            raise _error(source, where, f"answer_start {start} does not index the answer text {text!r}")
        if bad:
            num_bad += len(bad)
            bad_ids.append(qid)
        texts = [t for t, _ in pairs]
        starts = [context.find(t) if s is None else s for t, s in pairs]
        examples.append(SquadExample(qid, question, context, texts, starts, str(title)))
    if not examples:
        raise _error(source, None, f"no questions in the {split_name} data")
    if num_bad:
        logger.warning(
            "%s: %d answer_start value(s) in %d question(s) do not index their answer text (first ids: %s)",
            source,
            num_bad,
            len(bad_ids),
            ", ".join(bad_ids[:_IDS_SHOWN]),
        )
    return SquadExamples(
        examples, source=source, version=version, num_bad_answer_starts=num_bad, bad_answer_start_ids=bad_ids
    )


def load_squad_json(
    path: str | os.PathLike,
    *,
    split_name: str = "validation",
    require_answers: bool = True,
    strict: bool = False,
) -> SquadExamples:
    """Load a file in the official SQuAD v1.1 layout (`.json` or `.json.gz`).

    Args:
        path: `{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}`.
        split_name: what the data is for; used in error messages only.
        require_answers: every question needs a non-empty `answers` list (training and evaluation data).
            Without it a missing `answers` key reads as no answers.
        strict: raise on an `answer_start` that does not index its answer text, instead of counting it in
            `num_bad_answer_starts` / `bad_answer_start_ids` and logging a warning.

    Raises:
        SquadFormatError: the file is not valid JSON or lacks a key; the message names the file and the record,
            e.g. `dev.json: data[3].paragraphs[1].qas[0] (id 'abc'): missing 'answers'`.
    """
    source = os.fspath(path)
    try:
        raw = read_json(path)
    except ValueError as err:
        raise SquadFormatError(str(err)) from err

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for a, article in enumerate(_get(raw, "data", list, source, None)):
            title = article.get("title", "") if isinstance(article, Mapping) else ""
            for p, paragraph in enumerate(_get(article, "paragraphs", list, source, f"data[{a}]")):
                where = f"data[{a}].paragraphs[{p}]"
                context = _get(paragraph, "context", str, source, where)
                for q, qa in enumerate(_get(paragraph, "qas", list, source, where)):
                    if not isinstance(qa, Mapping):
                        raise _error(source, f"{where}.qas[{q}]", f"expected a JSON object, got {type(qa).__name__}")
                    yield f"{where}.qas[{q}]", {**qa, "context": context, "title": title}

    version = raw.get("version") if isinstance(raw, Mapping) else None
    return _build_examples(
        records(), source, split_name=split_name, require_answers=require_answers, strict=strict, version=version
    )


def load_jsonl(
    path: str | os.PathLike,
    *,
    split_name: str = "validation",
    require_answers: bool = True,
    strict: bool = False,
) -> SquadExamples:
    """Load JSON Lines (`.jsonl` or `.jsonl.gz`): one object per line with `id`, `question`, `context`, `answers`.

    `answers` is a list of strings, a list of `{"text", "answer_start"}` or `{"text": [...], "answer_start": [...]}`;
    an optional `title` is kept. Blank lines are skipped. The other arguments are as for `load_squad_json`, and errors
    name the file, the line number and the column.
    """
    source = os.fspath(path)

    def records() -> Iterator[tuple[str, Any]]:
        with data_file_errors(path), open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise _error(source, f"line {lineno}", f"invalid JSON at column {err.colno}: {err.msg}") from err

    return _build_examples(records(), source, split_name=split_name, require_answers=require_answers, strict=strict)


def load_examples(path: str | os.PathLike, **kwargs: Any) -> SquadExamples:
    """Load `.json`/`.json.gz` (SQuAD layout) or `.jsonl`/`.jsonl.gz` (JSON Lines); `kwargs` go to the loader."""
    name = os.fspath(path).lower()
    if name.endswith((".json", ".json.gz")):
        return load_squad_json(path, **kwargs)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return load_jsonl(path, **kwargs)
    raise ValueError(f"{os.fspath(path)}: unknown data file type; expected .json, .json.gz, .jsonl or .jsonl.gz")


def examples_from_hf(
    dataset: datasets.Dataset,
    *,
    split_name: str = "validation",
    require_answers: bool = True,
    strict: bool = False,
) -> SquadExamples:
    """Examples from a `datasets` SQuAD split (columns id, title, context, question, answers{text, answer_start})."""
    source = f"{dataset.info.dataset_name or 'dataset'}[{dataset.split or split_name}]"
    records = ((f"row {i}", row) for i, row in enumerate(dataset.to_list()))
    return _build_examples(records, source, split_name=split_name, require_answers=require_answers, strict=strict)


def examples_to_dataset(examples: Iterable[SquadExample]) -> datasets.Dataset:
    """A `datasets.Dataset` with columns id, question, context, answers (list[str]) and answer_starts (list[int])."""
    examples = list(examples)
    return datasets.Dataset.from_dict(
        {name: [getattr(example, name) for example in examples] for name in EXAMPLE_FEATURES},
        features=EXAMPLE_FEATURES,
    )


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"Unknown prompt format {prompt_format!r}; valid formats are: {', '.join(PROMPT_FORMATS)}")


def format_prompt(question: str, context: str, prompt_format: PromptFormat) -> str:
    """The model input: `t5` is T5's own SQuAD prompt, `seed` the original study's. The context always comes last."""
    _check_prompt_format(prompt_format)
    if prompt_format == "seed":
        return f"[squad][question]{question}[context]{context}"
    return f"question: {question} context: {context}"


def add_prompt_special_tokens(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None, prompt_format: PromptFormat
) -> int:
    """Register the `seed` format's markers (`SEED_SPECIAL_TOKENS`) as special tokens; `t5` needs none.

    Returns how many tokens were new to the vocabulary. The model's token embeddings (if a model is given) are resized
    only when the vocabulary outgrows them, and never shrink: T5's 32,128 rows already leave room past its
    32,100-token vocabulary.
    """
    _check_prompt_format(prompt_format)
    if prompt_format != "seed":
        return 0
    num_added = tokenizer.add_special_tokens(
        {"extra_special_tokens": list(SEED_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return num_added


@dataclass
class TruncationStats:
    """What cutting inputs at `max_source_length` and labels at `max_target_length` cost."""

    num_examples: int
    num_inputs_truncated: int  # prompts longer than max_source_length tokens
    num_answers_cut: int  # first gold answer wholly or partly past the last kept input token
    num_labels_truncated: int  # first gold answers longer than max_target_length tokens
    answer_cut_ids: list[str] = field(default_factory=list)  # the first few ids counted in num_answers_cut


_FLAG_COLUMNS = ["_input_truncated", "_label_truncated", "_answer_cut"]


def _answer_end_in_prompt(
    question: str, context: str, answers: list[str], answer_starts: list[int], prompt_format: PromptFormat
) -> int | None:
    """Character offset in the prompt just past the first gold answer (its trailing whitespace left out), if found."""
    if not answers:
        return None
    text, start = answers[0], answer_starts[0] if answer_starts else -1
    if start < 0 or context[start : start + len(text)] != text:
        start = context.find(text)
        if start < 0:
            return None
    return len(format_prompt(question, "", prompt_format)) + start + len(text.rstrip())


def _tokenize_batch(
    batch: dict[str, list],
    *,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, list]:
    prompts = [format_prompt(q, c, prompt_format) for q, c in zip(batch["question"], batch["context"], strict=True)]
    inputs = tokenizer(prompts, max_length=max_source_length, truncation=True, return_offsets_mapping=True)
    targets = [answers[0] if answers else "" for answers in batch["answers"]]
    labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)
    input_truncated = [bool(encoding.overflowing) for encoding in inputs.encodings]
    answer_cut = []
    for i, offsets in enumerate(inputs["offset_mapping"]):
        question, context = batch["question"][i], batch["context"][i]
        end = _answer_end_in_prompt(question, context, batch["answers"][i], batch["answer_starts"][i], prompt_format)
        kept_end = max((token_end for _, token_end in offsets), default=0)  # special tokens have (0, 0)
        answer_cut.append(input_truncated[i] and end is not None and end > kept_end)
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "labels": labels["input_ids"],
        "length": [len(ids) for ids in inputs["input_ids"]],
        "_input_truncated": input_truncated,
        "_label_truncated": [bool(encoding.overflowing) for encoding in labels.encodings],
        "_answer_cut": answer_cut,
    }


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_format: PromptFormat,
    max_source_length: int,
    max_target_length: int,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, TruncationStats]:
    """Tokenise an `examples_to_dataset` dataset into seq2seq features.

    Inputs are `format_prompt(question, context)` cut at `max_source_length` tokens; labels are the first gold answer
    cut at `max_target_length`. The result has columns `id` (kept for evaluation), `input_ids`, `attention_mask`,
    `labels` and `length` (input tokens, under `TrainingArguments.length_column_name`'s default name; `Trainer` drops
    it with `remove_unused_columns=True`, like `id`). The stats count the examples whose first answer ends past the
    last kept input token, measured with the fast tokenizer's offset mapping.
    """
    _check_prompt_format(prompt_format)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenize_dataset needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    if max_source_length < 1 or max_target_length < 1:
        raise ValueError(f"max lengths must be positive, got {max_source_length=} and {max_target_length=}")
    missing = [name for name in EXAMPLE_FEATURES if name not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks column(s) {', '.join(missing)}; build it with examples_to_dataset")

    function = partial(
        _tokenize_batch,
        tokenizer=tokenizer,
        prompt_format=prompt_format,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
    )
    features = dataset.map(
        function,
        batched=True,
        num_proc=num_proc,
        remove_columns=[name for name in dataset.column_names if name != "id"],
        desc="Tokenizing",
    )
    flags = features.select_columns(["id", *_FLAG_COLUMNS]).to_dict()
    cut_ids = [qid for qid, cut in zip(flags["id"], flags["_answer_cut"], strict=True) if cut]
    stats = TruncationStats(
        num_examples=len(features),
        num_inputs_truncated=sum(flags["_input_truncated"]),
        num_answers_cut=len(cut_ids),
        num_labels_truncated=sum(flags["_label_truncated"]),
        answer_cut_ids=cut_ids[:_IDS_SHOWN],
    )
    logger.info("Tokenised %d examples: %s", len(features), stats)
    if cut_ids:
        logger.warning(
            "%d of %d examples have their first answer (partly) cut off by max_source_length=%d (first ids: %s)",
            len(cut_ids),
            len(features),
            max_source_length,
            ", ".join(stats.answer_cut_ids),
        )
    return features.remove_columns(_FLAG_COLUMNS), stats
