"""`RoutingDiagnosticsCallback`: routing statistics and expert similarity, checked against the routing records."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from mixt5 import MoEConfig, upcycle
from mixt5.diagnostics import (
    DIAGNOSTICS_FILE,
    RoutingDiagnosticsCallback,
    expert_cosine_similarity,
    read_diagnostics,
)
from tiny import batch, tiny_dense


def _moe(**moe):
    return upcycle(tiny_dense(), MoEConfig(**{"num_experts": 4, "top_k": 2, "moe_layers": "last:1", **moe}))


def _events(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(), TrainerControl()


def _lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_routing_statistics_match_the_routing_records(tmp_path, capacity_factor):
    model = _moe(capacity_factor=capacity_factor).train()
    callback = RoutingDiagnosticsCallback()
    args, state, control = _events(tmp_path)
    callback.on_train_begin(args, state, control, model=model)
    inputs = batch()
    with torch.no_grad(), model.collect_routing() as records:
        model(**inputs)
        model(**batch(seed=1))
    state.global_step = 2
    callback.on_log(args, state, control, logs={"loss": 1.0})

    routing = [line for line in _lines(tmp_path) if line["event"] == "routing"]
    assert len(routing) == 1 and routing[0]["phase"] == "train" and routing[0]["step"] == 2
    layers = routing[0]["layers"]
    names = {f"{stack}.{block}" for stack, block, _ in model.sparse_layers()}
    assert set(layers) == names == {"encoder.3", "decoder.2"}
    for stack in ("encoder", "decoder"):
        (layer,) = [v for k, v in layers.items() if k.startswith(stack)]
        outputs = records[stack]  # the same two forward passes, recorded by the model itself
        masks = [
            o.token_mask if o.token_mask is not None else torch.ones(len(o.router_probs), dtype=torch.bool)
            for o in outputs
        ]
        probs = torch.cat([o.router_probs[m] for o, m in zip(outputs, masks, strict=True)])
        entropy = -(probs * probs.log()).sum(-1).mean()
        kept = torch.cat([o.expert_index[m].reshape(-1) for o, m in zip(outputs, masks, strict=True)])
        kept = kept[kept < 4]
        dropped = sum(int(o.num_dropped) for o in outputs)
        assert layer["tokens"] == probs.shape[0]
        assert layer["entropy"] == pytest.approx(float(entropy), rel=1e-5)
        assert 0 <= layer["entropy"] <= layer["max_entropy"] == pytest.approx(math.log(4))
        assert layer["load"] == pytest.approx((torch.bincount(kept, minlength=4) / kept.numel()).tolist())
        assert layer["dropped_fraction"] == pytest.approx(dropped / (probs.shape[0] * 2))
        assert (layer["dropped_fraction"] > 0) == (capacity_factor is not None)


def test_evaluation_routing_is_recorded_apart_from_training(tmp_path):
    model = _moe()
    callback = RoutingDiagnosticsCallback()
    args, state, control = _events(tmp_path)
    callback.on_train_begin(args, state, control, model=model)
    model.train()(**batch())
    with torch.no_grad():
        model.eval()(**batch(seed=2))
    callback.on_log(args, state, control, logs={"eval_f1": 1.0})  # an evaluation's log: no training flush
    callback.on_evaluate(args, state, control, metrics={"eval_f1": 1.0})
    callback.on_log(args, state, control, logs={"loss": 1.0})
    phases = [line["phase"] for line in _lines(tmp_path) if line["event"] == "routing"]
    assert phases == ["eval", "train"]
    callback.on_log(args, state, control, logs={"loss": 1.0})  # nothing ran since: nothing written
    assert len(_lines(tmp_path)) == 3  # similarity at train begin, eval, train; no empty record


def _flat_experts(layer):
    return torch.cat([p.detach().reshape(4, -1) for p in layer.experts.parameters() if p.dim() == 3], dim=1)


def test_similarity_is_one_for_copies_and_below_one_for_noisytune(tmp_path):
    copies = _moe()
    for _, _, layer in copies.sparse_layers():
        torch.testing.assert_close(expert_cosine_similarity(layer), torch.ones(4, 4, dtype=torch.float64))
    noisy = _moe(expert_init="noisytune", noise_lambda=0.3)
    for _, _, layer in noisy.sparse_layers():
        flat = _flat_experts(layer).double()
        by_hand = torch.nn.functional.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=-1)
        torch.testing.assert_close(expert_cosine_similarity(layer), by_hand)
        assert by_hand[~torch.eye(4, dtype=torch.bool)].max() < 1.0

    callback = RoutingDiagnosticsCallback()
    args, state, control = _events(tmp_path)
    callback.on_train_begin(args, state, control, model=noisy)
    state.global_step = 5
    callback.on_save(args, state, control, model=noisy)
    similarity = [line for line in _lines(tmp_path) if line["event"] == "similarity"]
    assert [line["step"] for line in similarity] == [0, 5]
    for entry in similarity[0]["layers"].values():
        off = [v for i, row in enumerate(entry["matrix"]) for j, v in enumerate(row) if i != j]
        assert entry["mean"] == pytest.approx(sum(off) / len(off)) and entry["min"] == pytest.approx(min(off))


def test_dense_models_are_left_alone(tmp_path):
    callback = RoutingDiagnosticsCallback()
    args, state, control = _events(tmp_path)
    model = tiny_dense()
    callback.on_train_begin(args, state, control, model=model)
    model(**batch())
    callback.on_log(args, state, control, logs={"loss": 1.0})
    callback.on_evaluate(args, state, control)
    callback.on_save(args, state, control, model=model)
    assert not (tmp_path / DIAGNOSTICS_FILE).exists()


def test_read_diagnostics_keeps_the_last_record_per_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / DIAGNOSTICS_FILE
    rows = [
        {"event": "routing", "phase": "train", "step": 2, "layers": {}, "tag": "first run"},
        {"event": "routing", "phase": "train", "step": 4, "layers": {}},
        {"event": "routing", "phase": "train", "step": 2, "layers": {}, "tag": "resumed"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"event": "rout')
    records = read_diagnostics(path)
    assert [(r["step"], r.get("tag")) for r in records] == [(2, "resumed"), (4, None)]
    path.write_text('{"event": \n' + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=f"{DIAGNOSTICS_FILE}:1"):
        read_diagnostics(path)
