"""What every MixT5 model class shares, whatever its family: its MoE layers and the routing they ran."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..config import STACKS
from ..model_card import write_model_card
from .router import RouterOutput
from .sparse_ff import SparseFFMixin


class MoEModelMixin:
    """Mixed into each family's `PreTrainedModel` subclass (first in the bases); the family says where its MoE layers
    are. Also writes the model card beside the weights, and for `push_to_hub` (`write_card`, see
    `mixt5._compat.CardBeforeUploadMixin`)."""

    def save_pretrained(self, save_directory: Any, is_main_process: bool = True, *args: Any, **kwargs: Any) -> Any:
        """transformers' `save_pretrained`, plus the model card (`README.md`, see `mixt5.model_card`)."""
        result = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if is_main_process:
            write_model_card(self, save_directory)
        return result

    def write_card(self, folder: Any) -> None:
        """The card `push_to_hub` uploads (see `CardBeforeUploadMixin`)."""
        write_model_card(self, folder)

    def sparse_layers(self) -> Iterator[tuple[str, int, SparseFFMixin]]:
        """(stack name, block index, layer) for every MoE layer, encoder first."""
        raise NotImplementedError

    @contextmanager
    def collect_routing(self) -> Iterator[dict[str, list[RouterOutput]]]:
        """Collect every MoE layer's `RouterOutput` during the enclosed calls, per stack, in call order.

        Nests: an enclosing collection (e.g. around `generate()`, whose steps call `forward`) receives the records too.
        """
        records: dict[str, list[RouterOutput]] = {stack: [] for stack in STACKS}
        layers = list(self.sparse_layers())
        previous = [layer.routing_records for _, _, layer in layers]
        for stack_name, _, layer in layers:
            layer.routing_records = records[stack_name]
        try:
            yield records
        finally:
            outer: dict[str, list[RouterOutput]] = {}
            for (stack_name, _, layer), old in zip(layers, previous, strict=True):
                layer.routing_records = old
                if old is not None:
                    outer[stack_name] = old
            for stack_name, old in outer.items():
                old.extend(records[stack_name])
