"""The HTTP API's request and response bodies (pydantic: FastAPI validates requests and documents both)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AnswerRequest(BaseModel):
    """One question about one context, with optional per-request generation settings."""

    # strict: "10" is not an int nor "yes" a bool (pydantic's lax mode would convert them); docs/serve.md promises 422
    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(description="The question.")
    context: str = Field(description="The paragraph that holds the answer.")
    max_length: int | None = Field(
        default=None, ge=2, description="Max decoder tokens, as generation_max_length (default: the server's)."
    )
    num_beams: int | None = Field(default=None, ge=1, description="Beams; 1 is greedy (default: the server's).")
    show_routing: bool | None = Field(
        default=None, description="Return the routing (greedy only); default: whenever decoding is greedy."
    )

    @field_validator("question", "context")
    @classmethod
    def _encodable(cls, text: str) -> str:
        """JSON may escape a lone surrogate (`"\\ud800"`), which no tokenizer can take."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"not valid Unicode text: {err.reason} at character {err.start}") from None
        return text


class LayerRouting(BaseModel):
    layer: str = Field(description="e.g. `encoder.1`: the stack and block index of the MoE layer.")
    tokens: list[str] = Field(description="Input tokens (encoder layers) or generated tokens (decoder layers).")
    experts: list[list[int]] = Field(description="Per token, its experts, top-1 first.")
    weights: list[list[float]] = Field(description="Per token, the combine weight of each of its experts.")


class Routing(BaseModel):
    encoder: list[LayerRouting]
    decoder: list[LayerRouting]


class AnswerResponse(BaseModel):
    answer: str
    routing: Routing | None = Field(description="Per MoE layer; empty lists for a dense model; null with beams.")


class Example(BaseModel):
    title: str
    context: str
    question: str
    answers: list[str]


class Health(BaseModel):
    status: str
    model: str
    model_type: str
    device: str
    num_moe_layers: int
    moe_layers: dict[str, list[int]]
    num_experts: int
    top_k: int
    generation: dict[str, int | str]
    limits: dict[str, int]
    micro_batching: dict[str, float | int]
