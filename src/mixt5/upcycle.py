"""Dense → MoE surgery ("sparse upcycling") and the ways to initialise the expert copies, for every family.

Where a family's FF blocks are, their dense weights and the classes that replace them live in `mixt5.families`;
this module builds the experts from any family's `DenseFF` and swaps the model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import MoEConfig
from .families import FAMILIES, DenseFF, Family, family_of
from .modeling.moe_model import MoEModelMixin
from .modeling.router import init_router_weight_


def _target(model: nn.Module) -> tuple[Family, type]:
    if isinstance(model, MoEModelMixin):
        raise TypeError(f"{type(model).__name__} is already a MixT5 (sparse) model; upcycle a dense model.")
    found = family_of(model)
    if found is not None:
        return found
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    supported = "; ".join(f"{family.name} ({family.model_types})" for family in FAMILIES)
    classes = ", ".join(cls.__name__ for family in FAMILIES for cls in family.classes)
    raise TypeError(
        f"upcycle() got {type(model).__name__} (model_type {model_type!r}), which is not supported. Currently "
        f"only these families are: {supported}; classes: {classes}."
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


def _drop_upcycle(dense: DenseFF, ratio: float, generator: torch.Generator) -> DenseFF:
    """Drop-Upcycling (Nakamura et al., ICLR 2025) for one expert: re-initialise round(ratio * d_ff) hidden units.

    The chosen units' rows of each input projection ((d_ff, d_model)) and columns of the output projection
    ((d_model, d_ff)) are drawn from N(mean, std) of the original matrix; so are the units' entries of each input
    bias (from that bias vector's statistics). The output bias belongs to no hidden unit: it stays as it is.
    """
    d_ff = dense.output.shape[1]
    units = torch.randperm(d_ff, generator=generator)[: round(ratio * d_ff)]

    def redraw(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * tensor.std() + tensor.mean()

    new_in = []
    for mat in dense.inputs:
        mat = mat.clone()
        mat[units] = redraw(mat, (len(units), mat.shape[1]))
        new_in.append(mat)
    out_mat = dense.output.clone()
    out_mat[:, units] = redraw(out_mat, (out_mat.shape[0], len(units)))
    new_biases = None
    if dense.input_biases is not None:
        new_biases = []
        for bias in dense.input_biases:
            bias = bias.clone()
            bias[units] = redraw(bias, (len(units),))
            new_biases.append(bias)
    return DenseFF(new_in, out_mat, new_biases, dense.output_bias)


def _expert_init(dense: DenseFF, moe: MoEConfig, generator: torch.Generator) -> DenseFF:
    """One expert's weights from the dense FFN (fp32 on CPU), per `moe.expert_init`; biases get the same rule
    as the matrices (NoisyTune with each bias's own std, Gaussian's absolute noise)."""
    if moe.expert_init == "drop_upcycling":
        return _drop_upcycle(dense, moe.drop_ratio, generator)
    # matrices first, in the order T5's experts were always drawn, then the biases
    inputs = [_diversify(w, moe, generator) for w in dense.inputs]
    output = _diversify(dense.output, moe, generator)
    if not dense.has_bias:
        return DenseFF(inputs, output)
    biases = [_diversify(b, moe, generator) for b in dense.input_biases]
    return DenseFF(inputs, output, biases, _diversify(dense.output_bias, moe, generator))


def build_experts(dense: DenseFF, moe: MoEConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """3-D expert weights from one dense FFN, per `moe.expert_init`.

    Returns `gate_up_proj` (E, 2*d_ff, d_model) or `up_proj` (E, d_ff, d_model), and `down_proj` (E, d_model, d_ff),
    plus `gate_up_proj_bias` / `up_proj_bias` (E, rows) and `down_proj_bias` (E, d_model) when the FFN has biases;
    in the dense weights' dtypes and device.
    """
    in_key = "gate_up_proj" if dense.gated else "up_proj"
    if moe.expert_init == "copy":
        experts = [dense] * moe.num_experts
    else:
        fp32 = DenseFF(*[None if t is None else _fp32_cpu(t) for t in dense])
        experts = [_expert_init(fp32, moe, generator) for _ in range(moe.num_experts)]

    def stack(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.detach() for t in tensors]).to(like.device, like.dtype)

    result = {
        in_key: stack([torch.cat(e.inputs, dim=0) for e in experts], dense.inputs[0]),
        "down_proj": stack([e.output for e in experts], dense.output),
    }
    if dense.has_bias:
        result[f"{in_key}_bias"] = stack([torch.cat(e.input_biases) for e in experts], dense.input_biases[0])
        result["down_proj_bias"] = stack([e.output_bias for e in experts], dense.output_bias)
    return result


def _fp32_cpu(tensor: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(tensor, list):
        return [t.detach().float().cpu() for t in tensor]
    return tensor.detach().float().cpu()


def available_memory(device: torch.device, cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str]:
    """Bytes that can still be allocated on `device`, and where the figure comes from.

    On the CPU the smaller of the machine's available memory and what the process's memory cgroup (a container's
    or a batch job's limit) still allows: past that the kernel's OOM killer ends the process without a message.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"torch.cuda.mem_get_info({device})"
    import psutil  # a dependency of accelerate; on Linux this is /proc/meminfo's MemAvailable

    available, source = psutil.virtual_memory().available, "psutil.virtual_memory().available"
    headroom = cgroup_headroom(cgroup_root)
    if headroom is not None and headroom[0] < available:
        return headroom
    return available, source


def cgroup_headroom(root: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str] | None:
    """Bytes this process's memory cgroup may still take (its limit less its usage, reclaimable page cache not
    counted, as `docker stats` counts it) and the file of the limit; None without a cgroup memory limit.

    psutil and torch do not read cgroup limits. cgroup v2 (`memory.max`, `memory.current`, `inactive_file` of
    `memory.stat`) and v1 (`memory/memory.limit_in_bytes`, `memory.usage_in_bytes`, `total_inactive_file`), each in
    the process's own cgroup folder (from /proc/self/cgroup) or, inside a container's cgroup namespace, at the root.
    """
    root = Path(root)
    own = {"v2": "", "v1": ""}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own["v2"] = path.lstrip("/")
            elif "memory" in controllers.split(","):
                own["v1"] = path.lstrip("/")
    layouts = (
        ("v2", root, "memory.max", "memory.current", "inactive_file"),
        ("v1", root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    )
    for version, base, limit_name, usage_name, inactive_name in layouts:
        for folder in dict.fromkeys([base / own[version], base]):
            try:
                limit_text = (folder / limit_name).read_text().strip()
                limit = 2**63 if limit_text == "max" else int(limit_text)
                usage = int((folder / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit >= 2**60:  # no limit: v2 writes "max", v1 a huge number
                return None
            stat = {}
            with contextlib.suppress(OSError, ValueError):
                stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            usage -= min(usage, int(stat.get(inactive_name, 0)))
            return max(0, limit - usage), str(folder / limit_name)
    return None


def check_memory(dense_ffs: list[DenseFF], moe: MoEConfig) -> None:
    """Refuse an upcycle whose new tensors would not fit in memory, before allocating any of them.

    Counted per device: `num_experts` copies of each MoE layer's feed-forward weights (biases included) plus its
    router, and for the diversifying inits the fp32 working copies of the largest layer (built on the CPU, stacked,
    then cast).
    """
    need: dict[torch.device, int] = {}
    layers, per_expert_max, fp32_work = 0, 0, 0
    for dense in dense_ffs:
        weights = dense.tensors()
        per_expert = sum(w.numel() * w.element_size() for w in weights) + dense.output.shape[0] * 4  # + router row
        device = dense.output.device
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
    """Turn a dense model of a supported family (`mixt5.families`: T5, BERT) into a sparse MixT5 model (peft-style:
    one call on a stock model).

    Each configured block's FF sub-layer becomes a router plus `num_experts` experts made from its weights. All
    other weights are shared with `model`, not copied (as peft wraps the model it is given): keep using the
    returned model, or `copy.deepcopy(model)` first if the dense one must stay independent.

    Raises:
        TypeError: `model` is of no supported family.
        ValueError: `moe_config` names blocks the model does not have, or expert-choice routing in a decoder.
        MemoryError: the experts would not fit in the memory available (see `check_memory`).
    Bad input raises before anything is changed.
    """
    moe = moe_config if moe_config is not None else MoEConfig()
    if not isinstance(moe, MoEConfig):
        raise TypeError(f"moe_config must be a MoEConfig, got {type(moe).__name__}.")
    moe.check_settings_used()
    family, target_class = _target(model)
    stacks = family.stacks(model)
    layer_indices = moe.resolve_layers({name: len(blocks) for name, blocks in stacks.items()})
    dense_ffs = {
        (name, i): family.dense_ff(stacks[name][i]) for name, indices in layer_indices.items() for i in indices
    }
    check_memory(list(dense_ffs.values()), moe)
    config = family.moe_config(model, moe, layer_indices, provenance_for(model, moe, base_model))

    with torch.device("meta"):
        moe_model = target_class(config)
    moe_state = moe_model.state_dict()
    state = {name: tensor for name, tensor in model.state_dict().items() if name in moe_state}
    module_names = {id(module): name for name, module in moe_model.named_modules()}
    for stack_name, block, layer in moe_model.sparse_layers():
        prefix = module_names[id(layer)]
        dense = dense_ffs[stack_name, block]
        generator = _layer_generator(moe.seed, stack_name, block)
        for name, tensor in build_experts(dense, moe, generator).items():
            state[f"{prefix}.experts.{name}"] = tensor
        router_weight = moe_state[f"{prefix}.router.weight"]
        device, dtype = dense.output.device, dense.output.dtype
        router = init_router_weight_(torch.empty(router_weight.shape), moe, generator)  # fp32 on CPU: seeded
        state[f"{prefix}.router.weight"] = router.to(device, dtype)
        if f"{prefix}.router.noise_weight" in moe_state:
            state[f"{prefix}.router.noise_weight"] = torch.zeros(router_weight.shape, device=device, dtype=dtype)
    missing = sorted(set(moe_state) - set(state))
    if missing:
        raise RuntimeError(f"upcycle() has no weights for {missing[:5]} (dense model {type(model).__name__}).")
    moe_model.load_state_dict(state, assign=True, strict=True)
    dense_buffers = dict(model.named_buffers())
    for name, buffer in list(moe_model.named_buffers()):
        if buffer.is_meta:  # a non-persistent buffer (BERT's `position_ids`): not in any state dict, the dense model's
            owner, _, attribute = name.rpartition(".")
            moe_model.get_submodule(owner).register_buffer(attribute, dense_buffers[name], persistent=False)
    family.finish(model, moe_model)
    moe_model.train(model.training)
    return moe_model
