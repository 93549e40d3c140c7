"""Answer questions about a context with any checkpoint, optionally showing which experts each token used.

`mixt5 predict --model_name_or_path CKPT (--question Q --context C | --input_file F.jsonl [--output_file O.jsonl])`

A seq2seq checkpoint generates its answer (`QAPredictor`); an encoder with a span head picks it from the context
(`ExtractiveQAPredictor`: sliding windows and n-best spans, as `mixt5 evaluate` scores them). `load_predictor` picks
by the model, as training does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .commands import add_dataclass_arguments, dataclasses_from_namespace
from .data.extractive import (
    DEFAULT_DOC_STRIDE,
    DEFAULT_MAX_ANSWER_LENGTH,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_N_BEST_SIZE,
    AnswerSpan,
    best_answer_spans,
    prepare_eval_features,
)
from .data.squad import PromptFormat, SquadExample, format_prompt
from .loading import check_sequence_length, from_pretrained, load_config, load_tokenizer, model_task
from .modeling import MoEModelMixin, layer_name
from .modeling.router import RouterOutput
from .utils import check_output_path


@dataclass
class LayerRouting:
    """Which experts (and with what weight) each token of one MoE layer went to."""

    layer: str  # e.g. "encoder.6"
    tokens: list[str]
    experts: list[list[int]]  # per token, the experts it used (capacity-dropped slots left out)
    weights: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens": self.tokens, "experts": self.experts, "weights": self.weights}


class QAPredictor:
    """Greedy (or beam) answers from a fine-tuned checkpoint, as `mixt5 predict` and the server use them."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        prompt_format: PromptFormat = "t5",
        max_source_length: int = 512,
        max_length: int = 30,
        num_beams: int = 1,
        device: str | None = None,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if num_beams < 1 or max_length < 1 or max_source_length < 1:
            raise ValueError(
                f"num_beams={num_beams}, max_length={max_length}, max_source_length={max_source_length}: "
                "each must be >= 1."
            )
        self.tokenizer = tokenizer or load_tokenizer(model_name_or_path)
        self.model = model or from_pretrained(AutoModelForSeq2SeqLM, model_name_or_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.model_name = model_name_or_path
        self.prompt_format = prompt_format
        self.max_source_length = max_source_length
        self.max_length = max_length  # as Seq2SeqTrainer's generation_max_length: decoder tokens incl. the start
        self.num_beams = num_beams

    @property
    def is_moe(self) -> bool:
        return isinstance(self.model, MoEModelMixin)

    def count_input_tokens(self, question: str, context: str, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
        """Tokens of the model input for one question (what `max_source_length` cuts)."""
        return len((tokenizer or self.tokenizer)(format_prompt(question, context, self.prompt_format))["input_ids"])

    @torch.no_grad()
    def answer(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        *,
        show_routing: bool = False,
        max_length: int | None = None,
        num_beams: int | None = None,
    ) -> list[dict[str, Any]]:
        """One `{"answer": str}` per question (plus `"routing"` with `show_routing` on a MixT5 model)."""
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts")
        num_beams = num_beams or self.num_beams
        if show_routing and num_beams != 1:
            raise ValueError("routing is shown for greedy decoding only (num_beams=1)")
        prompts = [format_prompt(q, c, self.prompt_format) for q, c in zip(questions, contexts, strict=True)]
        inputs = self.tokenizer(
            prompts, max_length=self.max_source_length, truncation=True, padding=True, return_tensors="pt"
        ).to(self.device)
        generate_kwargs = {"max_length": max_length or self.max_length, "num_beams": num_beams}
        if show_routing and self.is_moe:
            with self.model.collect_routing() as records:
                sequences = self.model.generate(**inputs, **generate_kwargs, do_sample=False)
        else:
            records, sequences = None, self.model.generate(**inputs, **generate_kwargs, do_sample=False)
        answers = [text.strip() for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        results: list[dict[str, Any]] = [{"answer": answer} for answer in answers]
        if records is not None:
            for row, result in enumerate(results):
                result["routing"] = self._routing(records, inputs, sequences, row)
        return results

    def _routing(
        self, records: dict[str, list[RouterOutput]], inputs: Any, sequences: torch.Tensor, row: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Per MoE layer, the experts of each input token (encoder) and of each generated token (decoder)."""
        num_experts = self.model.config.num_experts
        layer_names = {"encoder": [], "decoder": []}
        for stack, block, _ in self.model.sparse_layers():
            layer_names[stack].append(layer_name(stack, block))
        routing = {"encoder": _encoder_routing(self.model, self.tokenizer, records, inputs, row), "decoder": []}
        batch_size = inputs["input_ids"].shape[0]
        # decoder: one record per layer per generation step; step t's routing produced output token t
        generated = sequences[row, 1:].tolist()
        stop = self.tokenizer.eos_token_id
        length = generated.index(stop) + 1 if stop in generated else len(generated)
        output_tokens = self.tokenizer.convert_ids_to_tokens(generated[:length])
        num_layers = len(layer_names["decoder"])
        for i, name in enumerate(layer_names["decoder"]):
            steps = records["decoder"][i::num_layers][:length]
            index = torch.cat(
                [step.expert_index.view(batch_size, -1, step.expert_index.shape[-1])[row, -1:] for step in steps]
            )
            weight = torch.cat(
                [step.expert_weights.view(batch_size, -1, step.expert_weights.shape[-1])[row, -1:] for step in steps]
            )
            routing["decoder"].append(
                _layer_routing(name, output_tokens[: len(steps)], index, weight, num_experts).to_dict()
            )
        return routing


def _encoder_routing(
    model: Any, tokenizer: PreTrainedTokenizerBase, records: dict[str, list[RouterOutput]], inputs: Any, row: int
) -> list[dict[str, Any]]:
    """Per encoder MoE layer, the experts of each (non-padding) input token of batch row `row`."""
    names = [layer_name(stack, block) for stack, block, _ in model.sparse_layers() if stack == "encoder"]
    batch_size, src_len = inputs["input_ids"].shape
    num_inputs = int(inputs["attention_mask"][row].sum())
    input_tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][row, :num_inputs].tolist())
    layers = []
    for name, record in zip(names, records["encoder"], strict=True):
        index = record.expert_index.view(batch_size, src_len, -1)[row, :num_inputs]
        weight = record.expert_weights.view(batch_size, src_len, -1)[row, :num_inputs]
        layers.append(_layer_routing(name, input_tokens, index, weight, model.config.num_experts).to_dict())
    return layers


def _answer_window(window_ids: list[str], offsets: list[list[Any]], example_id: str, span: AnswerSpan | None) -> int:
    """The batch row of the first of the example's windows whose context holds `span` (windows overlap by the
    stride); its first window where there is no answer. `offsets`: per window, each token's (start, end) character
    span in the context, None for non-context tokens."""
    rows = [i for i, window_id in enumerate(window_ids) if window_id == example_id]
    if span is not None:
        for row in rows:
            chars = [offset for offset in offsets[row] if offset is not None]
            if chars and chars[0][0] <= span.start and span.end <= chars[-1][1]:
                return row
    return rows[0]


class ExtractiveQAPredictor(QAPredictor):
    """`QAPredictor`'s interface for an encoder with a span head (e.g. `BertForQuestionAnswering`): each context is
    cut into windows of `max_source_length` tokens sharing `doc_stride`, and the best span over all windows
    (`best_answer_spans`, at most `max_answer_length` tokens) is the answer. `max_length` / `num_beams` mean nothing
    here and are ignored. Results also give the answer's character `start` / `end` in the context and its `score`;
    the routing shown is that of the window holding the answer (its first window without one; encoder layers only)."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        max_source_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        doc_stride: int = DEFAULT_DOC_STRIDE,
        n_best_size: int = DEFAULT_N_BEST_SIZE,
        max_answer_length: int = DEFAULT_MAX_ANSWER_LENGTH,
        device: str | None = None,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **unused: Any,  # QAPredictor's generation settings (prompt_format, max_length, num_beams)
    ) -> None:
        if min(max_source_length, doc_stride, n_best_size, max_answer_length) < 1:
            raise ValueError(
                f"max_source_length={max_source_length}, doc_stride={doc_stride}, n_best_size={n_best_size}, "
                f"max_answer_length={max_answer_length}: each must be >= 1."
            )
        self.tokenizer = tokenizer or load_tokenizer(model_name_or_path)
        self.model = model or from_pretrained(AutoModelForQuestionAnswering, model_name_or_path)
        check_sequence_length(self.model.config, max_source_length)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.model_name = model_name_or_path
        self.prompt_format = None  # the tokenizer pairs question and context itself
        self.max_source_length = max_source_length
        self.doc_stride = doc_stride
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.max_length, self.num_beams = unused.get("max_length", 30), 1

    def count_input_tokens(self, question: str, context: str, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
        return len((tokenizer or self.tokenizer)(question, context)["input_ids"])

    @torch.no_grad()
    def answer(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        *,
        show_routing: bool = False,
        max_length: int | None = None,
        num_beams: int | None = None,
    ) -> list[dict[str, Any]]:
        """One `{"answer", "start", "end", "score"}` per question (plus `"routing"` with `show_routing` on an MoE
        model); an empty answer (start and end -1) where no window holds a valid span."""
        if len(questions) != len(contexts):
            raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts")
        examples = [
            SquadExample(str(i), q, c, [], []) for i, (q, c) in enumerate(zip(questions, contexts, strict=True))
        ]
        features, _ = prepare_eval_features(
            examples,
            self.tokenizer,
            max_sequence_length=self.max_source_length,
            doc_stride=self.doc_stride,
            progress=False,  # one request's questions: no progress bar per call
        )
        names = [name for name in self.tokenizer.model_input_names if name in features.column_names]
        inputs = self.tokenizer.pad(features.select_columns(names).to_dict(), return_tensors="pt").to(self.device)
        records = None
        if show_routing and self.is_moe:
            with self.model.collect_routing() as records:
                outputs = self.model(**inputs)
        else:
            outputs = self.model(**inputs)
        spans = best_answer_spans(
            examples,
            features,
            outputs.start_logits.float().cpu().numpy(),  # (num_windows, sequence_length)
            outputs.end_logits.float().cpu().numpy(),
            n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
        )
        window_ids = features["example_id"]
        offsets = features["offset_mapping"] if records is not None else None
        results = []
        for example in examples:
            span = spans[example.id]
            result: dict[str, Any] = (
                {"answer": "", "start": -1, "end": -1, "score": None}
                if span is None
                else {"answer": span.text, "start": span.start, "end": span.end, "score": round(span.score, 4)}
            )
            if records is not None:
                row = _answer_window(window_ids, offsets, example.id, span)
                encoder = _encoder_routing(self.model, self.tokenizer, records, inputs, row)
                result["routing"] = {"encoder": encoder, "decoder": []}  # an encoder has no decoder layers
            results.append(result)
        return results


def load_predictor(model_name_or_path: str, *, task: str = "auto", **kwargs: Any) -> QAPredictor:
    """The predictor for the checkpoint's task (`mixt5.loading.model_task`, or `task`): generative or extractive."""
    if task == "auto":
        task = model_task(load_config(model_name_or_path), flag=f"--model_name_or_path {model_name_or_path}")
    if task == "extractive":
        return ExtractiveQAPredictor(model_name_or_path, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("doc_stride", "n_best_size", "max_answer_length")}
    if kwargs.get("max_source_length") is None:
        kwargs.pop("max_source_length", None)
    return QAPredictor(model_name_or_path, **kwargs)


def _layer_routing(
    name: str, tokens: list[str], index: torch.Tensor, weight: torch.Tensor, num_experts: int
) -> LayerRouting:
    experts, weights = [], []
    for token_index, token_weight in zip(index.tolist(), weight.tolist(), strict=True):
        used = [(e, w) for e, w in zip(token_index, token_weight, strict=True) if e != num_experts]
        used.sort(key=lambda pair: -pair[1])
        experts.append([e for e, _ in used])
        weights.append([round(w, 4) for _, w in used])
    return LayerRouting(name, tokens, experts, weights)


def format_routing(routing: dict[str, list[dict[str, Any]]]) -> str:
    """Readable lines: per layer, each token with its experts (top-1 first)."""
    lines = []
    for stack in ("encoder", "decoder"):
        for layer in routing[stack]:
            cells = [
                f"{tok}→{'/'.join(map(str, ex))}" for tok, ex in zip(layer["tokens"], layer["experts"], strict=True)
            ]
            lines.append(f"{layer['layer']:>11}: " + " ".join(cells))
    return "\n".join(lines)


# --- mixt5 predict ---------------------------------------------------------------------------------------------------


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
    max_sequence_length: int | None = field(
        default=None,
        metadata={"help": "Input tokens kept (default 512); extractive: tokens per window (default 384)."},
    )
    generation_max_length: int = field(default=30, metadata={"help": "Max answer tokens."})
    generation_num_beams: int = field(default=1, metadata={"help": "Beams (1: greedy)."})
    task: Literal["auto", "generative", "extractive"] = field(
        default="auto", metadata={"help": "generative | extractive; auto: follows from the model."}
    )
    doc_stride: int = field(default=DEFAULT_DOC_STRIDE, metadata={"help": "Extractive: tokens windows share."})
    n_best_size: int = field(default=DEFAULT_N_BEST_SIZE, metadata={"help": "Extractive: best starts/ends tried."})
    max_answer_length: int = field(
        default=DEFAULT_MAX_ANSWER_LENGTH, metadata={"help": "Extractive: longest answer, in tokens."}
    )

    def __post_init__(self) -> None:
        if self.output_file is not None:
            check_output_path(self.output_file, "--output_file", is_dir=False)
        for name in (
            "batch_size",
            "max_sequence_length",
            "generation_max_length",
            "generation_num_beams",
            "doc_stride",
            "n_best_size",
            "max_answer_length",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PredictArguments)


def run(args: argparse.Namespace) -> int:
    from .utils import write_jsonl_atomic

    (args,) = dataclasses_from_namespace(args, PredictArguments)
    if args.input_file is None and (args.question is None or args.context is None):
        raise ValueError("give --question and --context, or --input_file (with --output_file).")
    rows = _read_questions(args.input_file) if args.input_file else None
    predictor = load_predictor(
        args.model_name_or_path,
        task=args.task,
        prompt_format=args.prompt_format,
        max_length=args.generation_max_length,
        num_beams=args.generation_num_beams,
        doc_stride=args.doc_stride,
        n_best_size=args.n_best_size,
        max_answer_length=args.max_answer_length,
        **({} if args.max_sequence_length is None else {"max_source_length": args.max_sequence_length}),
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
