"""Configuration: `MoEConfig` (how to upcycle) and `MixT5Config` (the saved model's config).

`MoEConfig` plays the role of peft's `LoraConfig`: a validated dataclass that travels with the checkpoint
(as the `moe` block of `config.json`). `MixT5Config` is a `T5Config` with `model_type="mixt5"`, registered
with the Auto classes in `mixt5.modeling`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from transformers import BertConfig, ElectraConfig, RobertaConfig, T5Config, XLMRobertaConfig

ExpertInit = Literal["copy", "noisytune", "drop_upcycling", "gaussian"]
RouterType = Literal["topk", "noisy_topk", "expert_choice"]
RouterInit = Literal["linear_default", "normal", "zeros"]
STACKS = ("encoder", "decoder")

_MOE_CACHE = "_moe_config_cache"  # MixT5Config's cached `MoEConfig`, kept out of config.json
# Settings that only one value of another field reads: field -> (that field, the value that reads it).
_USED_ONLY_WITH = {
    "noise_lambda": ("expert_init", "noisytune"),
    "drop_ratio": ("expert_init", "drop_upcycling"),
    "noise_std": ("expert_init", "gaussian"),
    "router_init_std": ("router_init", "normal"),
}
_LAYER_SPEC = re.compile(r"^(all|none|(first|last|every):(\d+))$")


def _check_choice(name: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"MoEConfig.{name}={value!r} is not supported; choose one of {list(choices)}.")


def _check_layer_spec(spec: Any, where: str) -> None:
    """Syntax check of one stack's `moe_layers` entry (a spec string or a list of block indices)."""
    if isinstance(spec, str):
        match = _LAYER_SPEC.match(spec.strip())
        if match is None:
            raise ValueError(
                f"MoEConfig.moe_layers{where}={spec!r} is not understood; use 'last:N', 'first:N', 'every:K', 'all', "
                "'none', a list of block indices, or {'encoder': ..., 'decoder': ...}."
            )
        if match.group(2) == "every" and int(match.group(3)) < 1:
            raise ValueError(f"MoEConfig.moe_layers{where}={spec!r}: 'every:K' needs K >= 1.")
        return
    if isinstance(spec, (list, tuple)):
        for index in spec:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"MoEConfig.moe_layers{where} has {index!r}; block indices are integers >= 0.")
        return
    raise TypeError(
        f"MoEConfig.moe_layers{where} must be a string or a list of block indices, got {type(spec).__name__}."
    )


def non_default_fields(instance: Any) -> list[str]:
    """The fields of a dataclass instance whose value differs from the field's default: those a user set."""
    return [f.name for f in dataclasses.fields(instance) if getattr(instance, f.name) != f.default]


def resolve_layer_spec(spec: str | list[int], num_blocks: int, stack: str) -> list[int]:
    """Turn one stack's spec into sorted block indices, checking them against `num_blocks`.

    `every:K` marks every K-th block counting from one (K-1, 2K-1, ...), as Switch Transformers' `sparse_step`.
    """
    _check_layer_spec(spec, f"[{stack!r}]")
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "all":
            return list(range(num_blocks))
        if spec == "none":
            return []
        kind, n = spec.split(":")
        n = int(n)
        if kind in ("first", "last") and n > num_blocks:
            raise ValueError(f"moe_layers {spec!r} names {n} blocks but the {stack} has only {num_blocks}.")
        if kind == "first":
            return list(range(n))
        if kind == "last":
            return list(range(num_blocks - n, num_blocks))
        return [i for i in range(num_blocks) if i % n == n - 1]
    bad = [i for i in spec if i >= num_blocks]
    if bad:
        raise ValueError(f"moe_layers names {stack} block(s) {bad}, but the {stack} has blocks 0..{num_blocks - 1}.")
    return sorted(set(spec))


@dataclass
class MoEConfig:
    """How to turn a dense T5 into a sparse Mixture-of-Experts ("sparse upcycling").

    Defaults are the study's MoE fine-tuning: 8 experts, top-2, the last 6 blocks of each stack, exact copies of
    the dense feed-forward block, a fresh router (softmax, top-k, renormalise).
    """

    num_experts: int = field(default=8, metadata={"help": "Experts per MoE layer."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})
    # Typed `str` for HfArgumentParser; a dict {"encoder": ..., "decoder": ...} (or its JSON) is accepted too.
    moe_layers: str = field(
        default="last:6",
        metadata={
            "help": "Blocks of each stack made sparse: 'last:N', 'first:N', 'every:K', 'all', 'none', or a JSON "
            'object {"encoder": [...], "decoder": [...]} of block-index lists or specs.'
        },
    )
    expert_init: ExpertInit = field(
        default="copy",
        metadata={"help": "How experts start: copy | noisytune | drop_upcycling | gaussian."},
    )
    noise_lambda: float = field(
        default=0.1, metadata={"help": "NoisyTune lambda: W + U(-l/2, l/2) * std(W), per expert and matrix."}
    )
    drop_ratio: float = field(
        default=0.5, metadata={"help": "Drop-Upcycling: fraction of hidden units re-initialised per expert."}
    )
    noise_std: float = field(default=0.01, metadata={"help": "'gaussian' init: absolute N(0, noise_std) noise."})
    seed: int = field(default=0, metadata={"help": "Seed of the expert initialisation and the router init."})
    router_type: RouterType = field(
        default="topk",
        metadata={"help": "topk (softmax, top-k, renormalise) | noisy_topk (Shazeer 2017) | expert_choice."},
    )
    decoder_router_type: RouterType | None = field(
        default=None,
        metadata={"help": "Router of decoder MoE layers; defaults to router_type. expert_choice is refused there."},
    )
    norm_topk_prob: bool = field(
        default=True, metadata={"help": "Renormalise the top-k probabilities to sum to 1 (study, Mixtral)."}
    )
    router_jitter_noise: float = field(
        default=0.0, metadata={"help": "Multiplicative jitter eps on the router input during training (Switch)."}
    )
    router_init: RouterInit = field(
        default="linear_default",
        metadata={"help": "linear_default (nn.Linear's init, as the study) | normal (std router_init_std) | zeros."},
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the 'normal' router init."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Switch load-balancing loss weight."})
    router_z_loss_coef: float = field(default=0.001, metadata={"help": "ST-MoE router z-loss weight."})
    capacity_factor: float | None = field(
        default=None,
        metadata={"help": "Expert capacity = ceil(cf * tokens * top_k / experts); None is dropless."},
    )
    output_router_logits: bool = field(
        default=False, metadata={"help": "Return router logits per MoE layer in the model output."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.moe_layers, str) and self.moe_layers.strip().startswith("{"):
            try:
                self.moe_layers = json.loads(self.moe_layers)
            except json.JSONDecodeError as err:
                raise ValueError(f"MoEConfig.moe_layers is not valid JSON: {err}") from err
        for name in ("num_experts", "top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MoEConfig.{name} must be an int, got {value!r}.")
        for name in _float_fields():  # NaN passes every range check below, and makes all-NaN experts
            value = getattr(self, name)
            if value is None and name == "capacity_factor":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"MoEConfig.{name} must be a number, got {value!r}.")
            if not math.isfinite(value):
                raise ValueError(f"MoEConfig.{name}={value} is not a finite number.")
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts={self.num_experts}: need at least 1 expert.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be between 1 and num_experts={self.num_experts}.")
        _check_choice("expert_init", self.expert_init, ExpertInit)
        _check_choice("router_type", self.router_type, RouterType)
        if self.decoder_router_type is not None:
            _check_choice("decoder_router_type", self.decoder_router_type, RouterType)
        _check_choice("router_init", self.router_init, RouterInit)
        if self.noise_lambda < 0:
            raise ValueError(f"MoEConfig.noise_lambda={self.noise_lambda} must be >= 0.")
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise ValueError(f"MoEConfig.drop_ratio={self.drop_ratio} must be in [0, 1].")
        if self.noise_std < 0:
            raise ValueError(f"MoEConfig.noise_std={self.noise_std} must be >= 0.")
        if self.router_jitter_noise < 0 or self.router_jitter_noise >= 1:
            raise ValueError(f"MoEConfig.router_jitter_noise={self.router_jitter_noise} must be in [0, 1).")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor={self.capacity_factor} must be > 0 (or None: dropless).")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)} must be >= 0.")
        if isinstance(self.moe_layers, dict):
            unknown = set(self.moe_layers) - set(STACKS)
            if unknown:
                raise ValueError(f"MoEConfig.moe_layers has unknown stack(s) {sorted(unknown)}; use {list(STACKS)}.")
            for stack, spec in self.moe_layers.items():
                _check_layer_spec(spec, f"[{stack!r}]")
        else:
            _check_layer_spec(self.moe_layers, "")

    def check_settings_used(self) -> None:
        """Refuse a setting changed from its default that this configuration would ignore, saying what to do.

        Not part of `__post_init__`: a saved `moe` block lists every field, and must load whatever it holds. Called
        where a new upcycle is configured (`upcycle()`, the CLI), where a changed value is one the user chose.
        """
        for name in non_default_fields(self):
            if name in _USED_ONLY_WITH:
                selector, value = _USED_ONLY_WITH[name]
                if getattr(self, selector) != value:
                    raise ValueError(
                        f"{name}={getattr(self, name)} has no effect with {selector}={getattr(self, selector)!r} "
                        f"(only {selector}={value!r} uses it): set --{selector} {value}, or leave {name} at its "
                        "default."
                    )

    def router_type_for(self, stack: str) -> str:
        """The router type of the MoE layers of `stack` ("encoder" or "decoder")."""
        if stack == "decoder" and self.decoder_router_type is not None:
            return self.decoder_router_type
        return self.router_type

    def resolve_layers(self, num_layers: dict[str, int]) -> dict[str, list[int]]:
        """Block indices made sparse per stack, checked against the model's `num_layers` per stack."""
        resolved = {}
        for stack, n_blocks in num_layers.items():
            spec = self.moe_layers.get(stack, "none") if isinstance(self.moe_layers, dict) else self.moe_layers
            resolved[stack] = resolve_layer_spec(spec, n_blocks, stack)
        if resolved.get("decoder") and self.router_type_for("decoder") == "expert_choice":
            raise ValueError(
                "expert_choice routing is not allowed in the decoder: it picks tokens across the whole sequence, "
                f"which leaks future tokens in a causal decoder (decoder MoE blocks {resolved['decoder']}). "
                "Use it for encoder layers only: set decoder_router_type='topk' or moe_layers={'decoder': []}."
            )
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"Unknown MoEConfig field(s) {sorted(unknown)}; known: {sorted(names)}.")
        return cls(**values)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MoEConfig:
        """Read the MoE settings saved in a MixT5 checkpoint's `config.json`."""
        config_file = Path(path) / "config.json"
        with open(config_file, encoding="utf-8") as handle:
            data = json.load(handle)
        if "moe" not in data:
            raise ValueError(f"{config_file} has no 'moe' block: it is not a MixT5 checkpoint.")
        return cls.from_dict(data["moe"])


@functools.cache
def _float_fields() -> tuple[str, ...]:
    """`MoEConfig`'s float (and optional float) fields, from its type hints."""
    hints = get_type_hints(MoEConfig)
    return tuple(name for name, hint in hints.items() if float in (hint, *get_args(hint)))


class MoESettingsMixin:
    """What every MixT5 model config adds to its dense family's config: the `moe` block (a plain dict, the `moe`
    block of `config.json`) read through a typed, cached `moe_config`. Put before the dense config class."""

    @property
    def moe_config(self) -> MoEConfig:
        """The `moe` settings as a validated `MoEConfig`, built once (and again only if `moe` has changed since).

        `moe` stays a plain dict (the `moe` block of `config.json`), so checkpoints load as they always have.
        """
        cached = self.__dict__.get(_MOE_CACHE)
        if cached is None or cached[0] != self.moe:
            cached = (copy.deepcopy(self.moe), MoEConfig.from_dict(self.moe))
            self.__dict__[_MOE_CACHE] = cached  # not through __setattr__: the cache is no config field
        return cached[1]

    @property
    def num_experts(self) -> int:
        return self.moe_config.num_experts

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop(_MOE_CACHE, None)
        return output

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MoESettingsMixin):
            return super().__eq__(other)
        fields = {k: v for k, v in self.__dict__.items() if k != _MOE_CACHE}
        return fields == {k: v for k, v in other.__dict__.items() if k != _MOE_CACHE}


class MixT5Config(MoESettingsMixin, T5Config):
    """A `T5Config` plus the MoE settings (`moe`), the sparse blocks per stack and where the model came from.

    Unlike `T5Config`, which always says `tie_word_embeddings=True` (the published t5-v1.1, flan-t5 and mt5 configs'
    `false` only turns off its decoder-output rescale), `MixT5Config` records what the weights are: whether `lm_head`
    is `shared` (t5 v1.0) or a parameter of its own (v1.1, flan-t5, mt5), and, separately, whether the decoder output
    is scaled by `d_model**-0.5` before `lm_head` (v1.0 only).

    Args:
        moe: `MoEConfig` fields as a dict.
        moe_layer_indices: resolved sparse block indices, `{"encoder": [...], "decoder": [...]}`.
        upcycled_from: provenance: base model, base model type, method, lambda/ratio/std and seed.
        tie_word_embeddings: `lm_head` is `shared`. MixT5 checkpoints saved before this was recorded say `true`
            and hold no `lm_head.weight`, so they still load as they were saved: tied.
        scale_decoder_outputs: rescale the decoder output before `lm_head`; defaults to `tie_word_embeddings`, as
            T5 derives it.
    """

    model_type = "mixt5"

    def __init__(
        self,
        moe: dict[str, Any] | MoEConfig | None = None,
        moe_layer_indices: dict[str, list[int]] | None = None,
        upcycled_from: dict[str, Any] | None = None,
        tie_word_embeddings: bool = True,
        scale_decoder_outputs: bool | None = None,
        **kwargs: Any,
    ) -> None:
        moe_config = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(moe or {})
        self.moe = moe_config.to_dict()
        super().__init__(**kwargs)
        # set after T5Config's __post_init__, which forces tie_word_embeddings=True
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.scale_decoder_outputs = (
            self.tie_word_embeddings if scale_decoder_outputs is None else bool(scale_decoder_outputs)
        )
        if moe_layer_indices is None:
            moe_layer_indices = moe_config.resolve_layers(
                {"encoder": self.num_layers, "decoder": self.num_decoder_layers}
            )
        self.moe_layer_indices = {stack: list(moe_layer_indices.get(stack, [])) for stack in STACKS}
        for stack, num_blocks in (("encoder", self.num_layers), ("decoder", self.num_decoder_layers)):
            bad = [i for i in self.moe_layer_indices[stack] if isinstance(i, bool) or not 0 <= i < num_blocks]
            if bad:
                raise ValueError(
                    f"moe_layer_indices names {stack} block(s) {bad}, but the {stack} has blocks 0..{num_blocks - 1}."
                )
        self.upcycled_from = upcycled_from or {}


class MixEncoderConfigMixin(MoESettingsMixin):
    """The MoE settings of a one-stack encoder family (BERT, RoBERTa, XLM-R): `moe`, the sparse layers of its one
    stack, `moe_layer_indices={"encoder": [...]}`, and `upcycled_from`. Put before the dense config class."""

    def __init__(
        self,
        moe: dict[str, Any] | MoEConfig | None = None,
        moe_layer_indices: dict[str, list[int]] | None = None,
        upcycled_from: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        moe_config = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(moe or {})
        self.moe = moe_config.to_dict()
        super().__init__(**kwargs)
        num_blocks = self.num_hidden_layers
        if moe_layer_indices is None:
            moe_layer_indices = moe_config.resolve_layers({"encoder": num_blocks})
        unknown = set(moe_layer_indices) - {"encoder"}
        if any(moe_layer_indices[stack] for stack in unknown):
            raise ValueError(f"moe_layer_indices names stack(s) {sorted(unknown)}; a {self.model_type} has 'encoder'.")
        self.moe_layer_indices = {"encoder": list(moe_layer_indices.get("encoder", []))}
        bad = [i for i in self.moe_layer_indices["encoder"] if isinstance(i, bool) or not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"moe_layer_indices names encoder layer(s) {bad}, but it has layers 0..{num_blocks - 1}.")
        self.upcycled_from = upcycled_from or {}


# One model_type per dense base type, "mix" + its model_type: the saved config must rebuild the right dense
# architecture (RoBERTa's position ids differ from BERT's), and `AutoConfig` maps a model_type to one config class.
# Each class names its `__init__`: transformers makes every config subclass a dataclass, whose generated `__init__`
# would replace an inherited one.
class MixBertConfig(MixEncoderConfigMixin, BertConfig):
    """A `BertConfig` plus the MoE settings (`model_type="mixbert"`)."""

    model_type = "mixbert"
    __init__ = MixEncoderConfigMixin.__init__


class MixRobertaConfig(MixEncoderConfigMixin, RobertaConfig):
    """A `RobertaConfig` plus the MoE settings (`model_type="mixroberta"`)."""

    model_type = "mixroberta"
    __init__ = MixEncoderConfigMixin.__init__


class MixXLMRobertaConfig(MixEncoderConfigMixin, XLMRobertaConfig):
    """An `XLMRobertaConfig` plus the MoE settings (`model_type="mixxlm-roberta"`)."""

    model_type = "mixxlm-roberta"
    __init__ = MixEncoderConfigMixin.__init__


class MixElectraConfig(MixEncoderConfigMixin, ElectraConfig):
    """An `ElectraConfig` plus the MoE settings (`model_type="mixelectra"`)."""

    model_type = "mixelectra"
    __init__ = MixEncoderConfigMixin.__init__
