"""`MixT5Trainer`: the logged expert load is what the dispatch ran, and the model's loss is the one trained."""

from __future__ import annotations

import pytest
import torch
from transformers import Seq2SeqTrainingArguments

from mixt5 import MoEConfig, router_logits_to_expert_load, upcycle
from mixt5.trainer import MixT5Trainer
from tiny import batch, tiny_dense


def _dataset(num_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    rows = []
    for seed in range(num_batches):
        inputs = batch(seed=seed, batch_size=batch_size, pad_last=seed % 2 == 0)  # batches of unequal label counts
        rows += [{key: value[i] for key, value in inputs.items()} for i in range(batch_size)]
    return rows


def _args(tmp_path, **overrides) -> Seq2SeqTrainingArguments:
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=3, learning_rate=1e-3, max_steps=2, logging_steps=1,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return Seq2SeqTrainingArguments(**{**values, **overrides})


def test_logged_load_is_what_the_dispatch_ran_with_capacity_dropping(tmp_path):
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="last:2", capacity_factor=0.5)
    model = upcycle(tiny_dense(dropout_rate=0.0), moe).train()
    seen: dict[str, list] = {}  # per layer, per training forward: (expert_index, token_mask, router_logits)
    for stack, block, layer in model.sparse_layers():
        name = f"{stack}.{block}"
        layer.router.register_forward_hook(
            lambda router, args, out, name=name: seen.setdefault(name, []).append(
                (out.expert_index.tolist(), out.token_mask.tolist(), out.router_logits.detach().clone())
            )
        )
    trainer = MixT5Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(2, 3))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["moe/dropped_assignments"] > 0 for entry in logs)
    for name, forwards in seen.items():
        assert len(forwards) == 2
        for log, (expert_index, token_mask, logits) in zip(logs, forwards, strict=True):
            # an independent count: each real token's slots that reached an expert (4 = dropped / unused)
            counts = [0] * 4
            for slots, real in zip(expert_index, token_mask, strict=True):
                for expert in slots:
                    if real and expert < 4:
                        counts[expert] += 1
            logged = [log[f"moe/load/{name}/e{e}"] for e in range(4)]
            assert logged == pytest.approx([c / sum(counts) for c in counts], abs=1e-6)
            # what the trainer logged before: a top-k of the router logits, blind to the capacity limit
            top_k_load = router_logits_to_expert_load((logits,), 2, torch.tensor(token_mask))[0].tolist()
            assert logged != pytest.approx(top_k_load, abs=1e-3)


def test_the_trained_loss_is_the_models_over_the_whole_step(tmp_path):
    """Gradient accumulation: the logged loss is the step's token-mean LM loss plus the batches' mean router loss,
    computed by the model from the Trainer's `num_items_in_batch`."""
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="last:2", router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = upcycle(tiny_dense(dropout_rate=0.0), moe).train()
    data = _dataset(2, 3)
    expected = 0.0
    with torch.no_grad():
        batches = [{key: torch.stack([row[key] for row in data[i : i + 3]]) for key in data[0]} for i in (0, 3)]
        tokens = sum(int(b["labels"].ne(-100).sum()) for b in batches)
        for b in batches:
            out = model(**b)
            token_sum = out.lm_loss * int(b["labels"].ne(-100).sum())  # the model's per-batch mean, undone
            expected += token_sum / tokens + (0.5 * out.aux_loss + 0.25 * out.router_z_loss) / 2
    args = _args(
        tmp_path, gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0, train_sampling_strategy="sequential"
    )
    trainer = MixT5Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert logged == pytest.approx(float(expected), rel=1e-5)
