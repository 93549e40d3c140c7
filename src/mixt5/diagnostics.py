"""What the routers and experts did during a run, appended to `output_dir/diagnostics.jsonl` (one JSON object a line).

`RoutingDiagnosticsCallback` (a `TrainerCallback`; it does nothing for dense models) records, per MoE layer:

- ``{"event": "routing", "phase": "train" | "eval", "step", "epoch", "layers": {"encoder.4": {...}}}`` at every
  training log (averaged over the forward passes since the previous one) and at every evaluation (over all of its
  forward passes, generation included). Per layer: `load` (fraction of the kept token→expert assignments that went
  to each expert, after any capacity limit), `entropy` (mean over real tokens of the entropy of the router's softmax,
  in nats; `max_entropy` = ln E), `dropped_fraction` (assignments dropped by the capacity limit / (tokens × top_k)),
  `unrouted_fraction` (tokens that reached no expert at all) and `tokens`.
- ``{"event": "similarity", "step", "epoch", "layers": {"encoder.4": {"matrix", "mean", "min"}}}`` when training
  starts and at every checkpoint save: the pairwise cosine similarity of the experts' flattened weights (`mean` and
  `min` over the off-diagonal pairs). Copies start at 1.0; how fast it falls says how fast the experts diverge.

The statistics come from forward hooks on the routers, accumulated on the model's device (no host sync per step).
Under data parallelism each process sees its own shard; the main process writes what it saw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .modeling import MixT5Router, MoEModelMixin, RouterOutput, expert_counts, layer_name
from .modeling.sparse_ff import SparseFFMixin

DIAGNOSTICS_FILE = "diagnostics.jsonl"
_COLUMN_CHUNK = 1 << 20  # Gram matrices in float64, a column block at a time: bounded extra memory


@dataclass
class _LayerTotals:
    """Running sums of one MoE layer's routing over some forward passes, as 0-dim/1-dim tensors on the device."""

    num_experts: int
    top_k: int
    tokens: torch.Tensor | float = 0.0
    entropy: torch.Tensor | float = 0.0
    dropped: torch.Tensor | float = 0.0
    unrouted: torch.Tensor | float = 0.0
    load: torch.Tensor | float = 0.0

    @torch.no_grad()
    def add(self, routing: RouterOutput) -> None:
        probs = routing.router_probs.detach().float()  # (tokens, E)
        expert_index = routing.expert_index.detach()  # (tokens, slots); E marks an unused slot
        real = (
            torch.ones(probs.shape[0], device=probs.device)
            if routing.token_mask is None
            else routing.token_mask.to(probs.dtype)
        )
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # (tokens,)
        unrouted = (expert_index == self.num_experts).all(dim=-1).to(probs.dtype)
        self.tokens = self.tokens + real.sum()
        self.entropy = self.entropy + (entropy * real).sum()
        self.dropped = self.dropped + routing.num_dropped.detach().to(probs.dtype)
        self.unrouted = self.unrouted + (unrouted * real).sum()
        self.load = self.load + expert_counts(routing)

    def summary(self) -> dict[str, Any]:
        tokens = float(self.tokens)
        load = torch.as_tensor(self.load, dtype=torch.float64).cpu()
        total = float(load.sum())
        return {
            "load": (load / total).tolist() if total > 0 else [0.0] * self.num_experts,
            "entropy": float(self.entropy) / tokens if tokens else float("nan"),
            "max_entropy": math.log(self.num_experts),
            "dropped_fraction": float(self.dropped) / (tokens * self.top_k) if tokens else 0.0,
            "unrouted_fraction": float(self.unrouted) / tokens if tokens else 0.0,
            "tokens": int(tokens),
        }


@torch.no_grad()
def expert_cosine_similarity(layer: SparseFFMixin) -> torch.Tensor | None:
    """(E, E) float64 cosine similarity of the experts' weights (all their matrices flattened and concatenated).

    None when the expert weights are not materialised as (E, ...) tensors here (e.g. sharded by FSDP/ZeRO-3).
    """
    num_experts = layer.router.num_experts
    weights = [p for p in layer.experts.parameters() if p.dim() >= 2 and p.shape[0] == num_experts]
    if not weights:
        return None
    gram = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=weights[0].device)
    for weight in weights:
        for block in weight.detach().reshape(num_experts, -1).split(_COLUMN_CHUNK, dim=1):
            block = block.double()
            gram += block @ block.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    return (gram / norms.unsqueeze(0) / norms.unsqueeze(1)).cpu()


def similarity_summary(matrix: torch.Tensor) -> dict[str, Any]:
    off_diagonal = matrix[~torch.eye(matrix.shape[0], dtype=torch.bool)]
    return {
        "matrix": matrix.tolist(),
        "mean": float(off_diagonal.mean()) if off_diagonal.numel() else 1.0,
        "min": float(off_diagonal.min()) if off_diagonal.numel() else 1.0,
    }


class RoutingDiagnosticsCallback(TrainerCallback):
    """Record routing statistics and expert similarity of a MixT5 model into `output_dir/diagnostics.jsonl`."""

    def __init__(self, file_name: str = DIAGNOSTICS_FILE) -> None:
        self.file_name = file_name
        self._model: MoEModelMixin | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._totals: dict[str, dict[str, _LayerTotals]] = {"train": {}, "eval": {}}

    # --- hooks -------------------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module | None) -> bool:
        """Hook the routers of `model` (once); False for a model without MoE layers."""
        if not isinstance(model, MoEModelMixin):
            return False
        if model is self._model:
            return True
        self.detach()
        for stack, block, layer in model.sparse_layers():
            self._handles.append(layer.router.register_forward_hook(self._hook(layer_name(stack, block))))
        self._model = model
        return bool(self._handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._model = [], None

    def _hook(self, name: str) -> Any:
        def record(router: MixT5Router, args: Any, routing: RouterOutput) -> None:
            totals = self._totals["train" if router.training else "eval"]
            if name not in totals:
                totals[name] = _LayerTotals(router.num_experts, router.top_k)
            totals[name].add(routing)

        return record

    # --- writing -----------------------------------------------------------------------------------------------------

    def _append(self, args: TrainingArguments, state: TrainerState, record: dict[str, Any]) -> None:
        if not state.is_world_process_zero or not args.output_dir:
            return
        path = Path(args.output_dir) / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**record, "step": state.global_step, "epoch": state.epoch}, allow_nan=True) + "\n"
        with open(path, "a", encoding="utf-8") as handle:  # one whole line per write
            handle.write(line)
            handle.flush()

    def _flush_routing(self, phase: str, args: TrainingArguments, state: TrainerState) -> None:
        totals = self._totals[phase]
        if not totals:
            return
        layers = {name: layer_totals.summary() for name, layer_totals in sorted(totals.items(), key=_layer_order)}
        totals.clear()
        self._append(args, state, {"event": "routing", "phase": phase, "layers": layers})

    def _record_similarity(self, args: TrainingArguments, state: TrainerState) -> None:
        if self._model is None or not state.is_world_process_zero:
            return
        layers = {}
        for stack, block, layer in self._model.sparse_layers():
            matrix = expert_cosine_similarity(layer)
            if matrix is not None:
                layers[layer_name(stack, block)] = similarity_summary(matrix)
        if layers:
            self._append(args, state, {"event": "similarity", "layers": layers})

    # --- TrainerCallback events --------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if self.attach(model):
            self._record_similarity(args, state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:  # a training log, not an evaluation's
            self._flush_routing("train", args, state)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        self._flush_routing("eval", args, state)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        self._record_similarity(args, state)


def _layer_order(item: tuple[str, Any]) -> tuple[int, int]:
    stack, block = item[0].split(".")
    return (0 if stack == "encoder" else 1, int(block))


def read_diagnostics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `diagnostics.jsonl`, a resumed run's repeats dropped (the last record per event, phase and
    step wins); a torn last line (a killed process) is skipped."""
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if handle.read().strip():  # not the last line: a real error
                    raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
                break
            key = (record.get("event", ""), record.get("phase", ""), int(record.get("step", 0)))
            records.pop(key, None)
            records[key] = record
    return sorted(records.values(), key=lambda r: (int(r.get("step", 0)), r.get("event", ""), r.get("phase", "")))
