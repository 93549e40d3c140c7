"""Model families `upcycle()` knows, one module each: where a family's FF blocks are, how its dense weights become
3-D expert weights (`DenseFF`, `expert_as_dense`), which MixT5 class replaces each stock class, and its config.

The router, experts, dispatch, losses, diagnostics and sweeps are shared. A new family (e.g. ModernBERT's gated FFN)
is one module here, subclassing `Family`, its model classes under `mixt5.modeling`, and one entry in `FAMILIES`.
"""

from __future__ import annotations

from torch import nn

from .base import DenseFF, Family, expert_as_dense
from .bert import BERT
from .t5 import T5

FAMILIES: tuple[Family, ...] = (T5, BERT)


def family_of(model: nn.Module) -> tuple[Family, type] | None:
    """The family of a stock dense model and the MixT5 class it becomes, or None when no family has it."""
    for family in FAMILIES:
        moe_class = family.moe_class(model)
        if moe_class is not None:
            return family, moe_class
    return None


__all__ = ["FAMILIES", "DenseFF", "Family", "expert_as_dense", "family_of"]
