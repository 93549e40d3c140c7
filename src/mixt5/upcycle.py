"""Dense → MoE surgery ("sparse upcycling") and the ways to initialise the expert copies."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.mt5.modeling_mt5 import MT5EncoderModel, MT5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5EncoderModel, T5ForConditionalGeneration

from .config import MixT5Config, MoEConfig
from .modeling.modeling_mixt5 import MixT5EncoderModel, MixT5ForConditionalGeneration, MixT5PreTrainedModel
from .modeling.router import init_router_weight_
from .modeling.tying import has_separate_lm_head

# Dense class -> MixT5 class (MT5's modules mirror T5's, parameter names included; flan-t5 is T5).
SUPPORTED = {
    T5ForConditionalGeneration: MixT5ForConditionalGeneration,
    MT5ForConditionalGeneration: MixT5ForConditionalGeneration,
    T5EncoderModel: MixT5EncoderModel,
    MT5EncoderModel: MixT5EncoderModel,
}
_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map")


def _target_class(model: nn.Module) -> type[MixT5PreTrainedModel]:
    if isinstance(model, MixT5PreTrainedModel):
        raise TypeError(f"{type(model).__name__} is already a MixT5 (sparse) model; upcycle a dense T5 model.")
    for dense_class, moe_class in SUPPORTED.items():
        if isinstance(model, dense_class):
            return moe_class
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    supported = ", ".join(cls.__name__ for cls in SUPPORTED)
    raise TypeError(
        f"upcycle() got {type(model).__name__} (model_type {model_type!r}), which is not supported. Currently only "
        f"T5-family models are: {supported} (t5, t5-v1.1, flan-t5, mt5)."
    )


def _layer_generator(seed: int, stack: str, block: int) -> torch.Generator:
    """One generator per MoE layer, so a layer's init depends on (seed, stack, block) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + (0 if stack == "encoder" else 1000) + block)


def _diversify(matrix: torch.Tensor, moe: MoEConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-expert noise on one dense matrix (fp32 on CPU, so results do not depend on the device)."""
    if moe.expert_init == "noisytune":  # Wu et al. 2022: W + U(-λ/2, λ/2) * std(W)
        noise = torch.rand(matrix.shape, generator=generator) - 0.5
        return matrix + noise * (moe.noise_lambda * matrix.std())
    if moe.expert_init == "gaussian":  # mergekit-moe: absolute N(0, σ) noise
        return matrix + torch.randn(matrix.shape, generator=generator) * moe.noise_std
    return matrix


def _drop_upcycle(
    in_mats: list[torch.Tensor], out_mat: torch.Tensor, ratio: float, generator: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Drop-Upcycling (Nakamura et al., ICLR 2025) for one expert: re-initialise round(ratio * d_ff) hidden units.

    The chosen units' rows of each input projection (`wi_0`/`wi_1`/`wi`: (d_ff, d_model)) and columns of the output
    projection (`wo`: (d_model, d_ff)) are drawn from N(mean, std) of the original matrix.
    """
    d_ff = out_mat.shape[1]
    units = torch.randperm(d_ff, generator=generator)[: round(ratio * d_ff)]
    new_in = []
    for mat in in_mats:
        mat = mat.clone()
        mat[units] = torch.randn(len(units), mat.shape[1], generator=generator) * mat.std() + mat.mean()
        new_in.append(mat)
    out_mat = out_mat.clone()
    out_mat[:, units] = torch.randn(out_mat.shape[0], len(units), generator=generator) * out_mat.std() + out_mat.mean()
    return new_in, out_mat


def build_experts(dense_ff: nn.Module, moe: MoEConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """3-D expert weights from one dense `T5DenseGatedActDense` / `T5DenseActDense`, per `moe.expert_init`.

    Returns `gate_up_proj` (E, 2*d_ff, d_model) or `up_proj` (E, d_ff, d_model), and `down_proj` (E, d_model, d_ff),
    in the dense weights' dtypes and device.
    """
    gated = hasattr(dense_ff, "wi_0")
    in_weights = [dense_ff.wi_0.weight, dense_ff.wi_1.weight] if gated else [dense_ff.wi.weight]
    out_weight = dense_ff.wo.weight
    in_key = "gate_up_proj" if gated else "up_proj"
    if moe.expert_init == "copy":
        fused = torch.cat(in_weights, dim=0) if gated else in_weights[0]
        return {
            in_key: fused.detach().unsqueeze(0).repeat(moe.num_experts, 1, 1),
            "down_proj": out_weight.detach().unsqueeze(0).repeat(moe.num_experts, 1, 1),
        }
    in_fp32 = [w.detach().float().cpu() for w in in_weights]
    out_fp32 = out_weight.detach().float().cpu()
    experts_in, experts_out = [], []
    for _ in range(moe.num_experts):
        if moe.expert_init == "drop_upcycling":
            mats, out = _drop_upcycle(in_fp32, out_fp32, moe.drop_ratio, generator)
        else:
            mats = [_diversify(w, moe, generator) for w in in_fp32]
            out = _diversify(out_fp32, moe, generator)
        experts_in.append(torch.cat(mats, dim=0))
        experts_out.append(out)
    return {
        in_key: torch.stack(experts_in).to(in_weights[0].device, in_weights[0].dtype),
        "down_proj": torch.stack(experts_out).to(out_weight.device, out_weight.dtype),
    }


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes that can still be allocated on `device`, and where the figure comes from."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"torch.cuda.mem_get_info({device})"
    import psutil  # a dependency of accelerate; on Linux this is /proc/meminfo's MemAvailable

    return psutil.virtual_memory().available, "psutil.virtual_memory().available"


def check_memory(stacks: dict[str, nn.Module], layer_indices: dict[str, list[int]], moe: MoEConfig) -> None:
    """Refuse an upcycle whose new tensors would not fit in memory, before allocating any of them.

    Counted per device: `num_experts` copies of each MoE layer's feed-forward weights plus its router, and for the
    diversifying inits the fp32 working copies of the largest layer (built on the CPU, stacked, then cast).
    """
    need: dict[torch.device, int] = {}
    layers, per_expert_max, fp32_work = 0, 0, 0
    for stack_name, indices in layer_indices.items():
        for block in indices:
            ff = stacks[stack_name].block[block].layer[-1].DenseReluDense
            weights = [getattr(ff, name).weight for name in ("wi_0", "wi_1", "wi", "wo") if hasattr(ff, name)]
            per_expert = sum(w.numel() * w.element_size() for w in weights) + ff.wo.weight.shape[0] * 4  # + router row
            device = ff.wo.weight.device
            need[device] = need.get(device, 0) + moe.num_experts * per_expert
            if moe.expert_init != "copy":
                fp32_work = max(fp32_work, 2 * moe.num_experts * sum(w.numel() for w in weights) * 4)
            layers, per_expert_max = layers + 1, max(per_expert_max, per_expert)
    cpu = torch.device("cpu")
    need[cpu] = need.get(cpu, 0) + fp32_work
    for device, needed in need.items():
        available, source = available_memory(device)
        if needed > available:
            work = f", plus {fp32_work / 2**30:.1f} GiB of fp32 working copies" if fp32_work and device == cpu else ""
            raise MemoryError(
                f"num_experts={moe.num_experts}: upcycling needs about {needed / 2**30:.1f} GiB on {device} "
                f"({moe.num_experts} experts x {layers} MoE layers x up to {per_expert_max / 2**20:.2f} MiB each{work})"
                f" but {available / 2**30:.1f} GiB is available ({source}); use fewer experts or MoE layers."
            )


def mixt5_config_from_dense(
    dense_config: Any,
    moe: MoEConfig,
    layer_indices: dict[str, list[int]],
    provenance: dict[str, Any],
    *,
    tie_word_embeddings: bool,
) -> MixT5Config:
    """A `MixT5Config` carrying every field of a dense T5/MT5 config plus the MoE settings.

    `tie_word_embeddings` says whether the dense weights' `lm_head` is `shared` (the dense config cannot: transformers
    forces it to True); the decoder-output rescale is the dense model's own (MT5 never rescales).
    """
    values = {k: v for k, v in dense_config.to_dict().items() if k not in _CONFIG_KEYS_NOT_COPIED}
    values["tie_word_embeddings"] = tie_word_embeddings
    values["scale_decoder_outputs"] = bool(getattr(dense_config, "scale_decoder_outputs", False))
    return MixT5Config(moe=moe, moe_layer_indices=layer_indices, upcycled_from=provenance, **values)


def _dense_ties_lm_head(model: PreTrainedModel) -> bool:
    """Whether the dense model's output layer is its input embedding. An encoder has none: it follows the family
    (T5Config's decoder-output rescale is on exactly for tied configs; MT5Config has none, and mt5 is untied)."""
    if model.get_output_embeddings() is not None:
        return not has_separate_lm_head(model)
    return bool(getattr(model.config, "scale_decoder_outputs", False))


def provenance_for(model: PreTrainedModel, moe: MoEConfig, base_model: str | None = None) -> dict[str, Any]:
    """What the config records about where an upcycled model came from."""
    record: dict[str, Any] = {
        "base_model": base_model or model.config.name_or_path or None,
        "base_model_type": model.config.model_type,
        "base_architecture": type(model).__name__,
        "method": moe.expert_init,
        "seed": moe.seed,
    }
    if moe.expert_init == "noisytune":
        record["noise_lambda"] = moe.noise_lambda
    elif moe.expert_init == "drop_upcycling":
        record["drop_ratio"] = moe.drop_ratio
    elif moe.expert_init == "gaussian":
        record["noise_std"] = moe.noise_std
    return record


def upcycle(model: PreTrainedModel, moe_config: MoEConfig | None = None, *, base_model: str | None = None) -> Any:
    """Turn a dense T5-family model into a sparse MixT5 model (peft-style: one call on a stock model).

    Each configured block's FF sub-layer becomes a router plus `num_experts` experts made from its weights. All
    other weights are shared with `model`, not copied (as peft wraps the model it is given): keep using the
    returned model, or `copy.deepcopy(model)` first if the dense one must stay independent.

    Raises:
        TypeError: `model` is not a T5-family model.
        ValueError: `moe_config` names blocks the model does not have, or expert-choice routing in a decoder.
        MemoryError: the experts would not fit in the memory available (see `check_memory`).
    Bad input raises before anything is changed.
    """
    moe = moe_config if moe_config is not None else MoEConfig()
    if not isinstance(moe, MoEConfig):
        raise TypeError(f"moe_config must be a MoEConfig, got {type(moe).__name__}.")
    moe.check_settings_used()
    target_class = _target_class(model)
    stacks = {"encoder": model.encoder}
    if getattr(model, "decoder", None) is not None:
        stacks["decoder"] = model.decoder
    layer_indices = moe.resolve_layers({name: len(stack.block) for name, stack in stacks.items()})
    check_memory(stacks, layer_indices, moe)
    config = mixt5_config_from_dense(
        model.config,
        moe,
        {**{"encoder": [], "decoder": []}, **layer_indices},
        provenance_for(model, moe, base_model),
        tie_word_embeddings=_dense_ties_lm_head(model),
    )

    with torch.device("meta"):
        moe_model = target_class(config)
    moe_state = moe_model.state_dict()
    state = {name: tensor for name, tensor in model.state_dict().items() if name in moe_state}
    for stack_name, indices in layer_indices.items():
        for block in indices:
            generator = _layer_generator(moe.seed, stack_name, block)
            prefix = f"{stack_name}.block.{block}.layer.{len(stacks[stack_name].block[block].layer) - 1}"
            dense_ff = stacks[stack_name].block[block].layer[-1].DenseReluDense
            for name, tensor in build_experts(dense_ff, moe, generator).items():
                state[f"{prefix}.experts.{name}"] = tensor
            router_weight = moe_state[f"{prefix}.router.weight"]
            device, dtype = dense_ff.wo.weight.device, dense_ff.wo.weight.dtype
            router = init_router_weight_(torch.empty(router_weight.shape), moe, generator)  # fp32 on CPU: seeded
            state[f"{prefix}.router.weight"] = router.to(device, dtype)
            if f"{prefix}.router.noise_weight" in moe_state:
                state[f"{prefix}.router.noise_weight"] = torch.zeros(router_weight.shape, device=device, dtype=dtype)
    missing = sorted(set(moe_state) - set(state))
    if missing:
        raise RuntimeError(f"upcycle() has no weights for {missing[:5]} (dense model {type(model).__name__}).")
    moe_model.load_state_dict(state, assign=True, strict=True)
    moe_model.tie_weights()  # embed_tokens (and a tied lm_head) become `shared` again; a separate lm_head stays
    if getattr(model, "generation_config", None) is not None:
        moe_model.generation_config = copy.deepcopy(model.generation_config)
    moe_model.train(model.training)
    return moe_model
