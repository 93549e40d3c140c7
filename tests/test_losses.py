"""Router aux losses against a hand computation, and their wiring into the model's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixt5 import MoEConfig, router_logits_to_expert_load, upcycle
from mixt5.losses import load_balancing_loss_func, router_z_loss_func
from tiny import batch, tiny_dense


def _hand_load_balancing(probs: np.ndarray, selected: np.ndarray, mask: np.ndarray) -> float:
    num_experts = probs.shape[1]
    real = np.flatnonzero(mask)
    fraction = np.zeros(num_experts)
    for t in real:
        for e in selected[t]:
            fraction[e] += 1.0
    fraction /= len(real) * selected.shape[1]
    mean_prob = probs[real].mean(axis=0)
    return float(num_experts * np.sum(fraction * mean_prob))


def _hand_z_loss(logits: np.ndarray, mask: np.ndarray) -> float:
    real = logits[np.flatnonzero(mask)]
    peak = real.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(real - peak).sum(axis=1)) + peak[:, 0]
    return float(np.mean(log_z**2))


def test_losses_match_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 5, generator=gen, dtype=torch.float64) * 3
    probs = logits.softmax(-1)
    selected = probs.topk(2, dim=-1).indices
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    expected = _hand_load_balancing(probs.numpy(), selected.numpy(), mask.numpy())
    assert load_balancing_loss_func(probs, selected, mask).item() == pytest.approx(expected, rel=1e-12)
    assert router_z_loss_func(logits, mask).item() == pytest.approx(
        _hand_z_loss(logits.numpy(), mask.numpy()), rel=1e-12
    )
    # without a mask every token counts
    all_tokens = np.ones(11, dtype=bool)
    assert load_balancing_loss_func(probs, selected).item() == pytest.approx(
        _hand_load_balancing(probs.numpy(), selected.numpy(), all_tokens), rel=1e-12
    )


def test_load_balancing_is_one_when_uniform_and_grows_with_collapse():
    uniform = torch.full((8, 4), 0.25)
    spread = torch.arange(8).remainder(4).unsqueeze(-1)
    assert load_balancing_loss_func(uniform, spread).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert load_balancing_loss_func(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_z_loss_receives_logits_not_probabilities():
    logits = torch.tensor([[10.0, 0.0, -3.0]])
    # logsumexp of probabilities would be near log(e + ...) of values in [0, 1]; of the logits, ~10.
    assert router_z_loss_func(logits).item() == pytest.approx(torch.logsumexp(logits, -1).item() ** 2)
    assert router_z_loss_func(logits).item() > 99


def test_model_loss_adds_weighted_router_losses_over_real_tokens():
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="last:2", router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = upcycle(tiny_dense(), moe).eval()
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    assert len(out.encoder_router_logits) == 2 and len(out.decoder_router_logits) == 2
    enc_mask = inputs["attention_mask"].reshape(-1).bool().numpy()
    dec_mask = inputs["labels"].ne(-100).reshape(-1).numpy()
    aux, z = [], []
    for logits, mask in [(lg, enc_mask) for lg in out.encoder_router_logits] + [
        (lg, dec_mask) for lg in out.decoder_router_logits
    ]:
        probs = logits.softmax(-1)
        aux.append(_hand_load_balancing(probs.numpy(), probs.topk(2, -1).indices.numpy(), mask))
        z.append(_hand_z_loss(logits.numpy(), mask))
    assert out.aux_loss.item() == pytest.approx(np.mean(aux), rel=1e-5)
    assert out.router_z_loss.item() == pytest.approx(np.mean(z), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.5 * np.mean(aux) + 0.25 * np.mean(z), rel=1e-5)


def test_padding_changes_nothing_but_is_excluded():
    """Adding padding to a batch changes neither the real tokens' routing nor the losses."""
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:2")).eval()
    inputs = batch(batch_size=1, pad_last=False, src_len=6, tgt_len=4)
    padded = {
        "input_ids": torch.cat([inputs["input_ids"], torch.zeros(1, 3, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.zeros(1, 3, dtype=torch.long)], dim=1),
        "labels": torch.cat([inputs["labels"], torch.full((1, 2), -100)], dim=1),
    }
    with torch.no_grad():
        a, b = model(**inputs), model(**padded)
    assert b.aux_loss.item() == pytest.approx(a.aux_loss.item(), rel=1e-5)
    assert b.router_z_loss.item() == pytest.approx(a.router_z_loss.item(), rel=1e-5)


def test_router_logits_to_expert_load():
    logits = (torch.tensor([[5.0, 1.0, 0.0], [5.0, 0.0, 1.0], [0.0, 5.0, 1.0]]),)
    load = router_logits_to_expert_load(logits, top_k=1)
    torch.testing.assert_close(load, torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64))
    masked = router_logits_to_expert_load(logits, top_k=2, token_mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(masked, torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))


def test_aux_loss_trains_the_router():
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:1")).train()
    out = model(**batch())
    out.loss.backward()
    router = model.encoder.block[3].layer[-1].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_model_loss_over_an_optimizer_step_of_several_batches():
    """With `num_items_in_batch` (the step's label tokens) the LM loss is this batch's token sum over it; with
    `num_batches_in_step` the router losses (per-batch means) are divided by the step's number of batches."""
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="last:2", router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = upcycle(tiny_dense(), moe).eval()
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, num_items_in_batch=torch.tensor(40), num_batches_in_step=3)
    log_probs = out.logits.double().log_softmax(-1)
    labels = inputs["labels"]
    token_sum = -sum(
        log_probs[b, t, labels[b, t]].item()
        for b in range(labels.shape[0])
        for t in range(labels.shape[1])
        if labels[b, t] != -100
    )
    router = 0.5 * out.aux_loss.item() + 0.25 * out.router_z_loss.item()
    assert out.lm_loss.item() == pytest.approx(token_sum / 40, rel=1e-5)
    assert out.loss.item() == pytest.approx(token_sum / 40 + router / 3, rel=1e-5)
