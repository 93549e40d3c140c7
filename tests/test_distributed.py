"""Training beyond one process: MoE layers under DDP, FSDP2 and DeepSpeed, on 2 CPU processes (gloo).

The multi-process tests launch `accelerate launch` / `torchrun` as the README does and compare with one process.
The design note's sizes (docs/distributed.md) are recomputed here: `python -m pytest tests/test_distributed.py -k
sizes -s` prints them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mixt5 import MoEConfig, upcycle
from mixt5.arguments import ModelArguments, per_device_batch_size, read_engine_config
from mixt5.cli import main
from mixt5.config import MixT5Config
from mixt5.modeling import MixT5ForConditionalGeneration
from mixt5.modeling.experts import MIXT5_IMPLEMENTATIONS
from mixt5.train import build_model, parse_train_args
from tiny import SAMPLE_SQUAD, save_tiny_qa_model, tiny_dense

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EVAL_QUESTIONS = 10  # 3 per batch on 2 processes: the last batch is padded with repeats that must not be scored
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LAUNCH_TIMEOUT = 600  # seconds; `--ddp_timeout` below makes a hung collective fail well before


# ---------------------------------------------------------------------------------------------------------------
# Every parameter gets a gradient in every step, whatever the routing (what DDP/FSDP/ZeRO need)


def _sparse_layer(experts_implementation: str):
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="last:1", capacity_factor=1.0)
    model = upcycle(tiny_dense(), moe).train()
    model.set_experts_implementation(experts_implementation)
    _, _, layer = next(iter(model.sparse_layers()))
    return layer


# MixT5's dispatch with each of its kernels, and transformers' kernels
@pytest.mark.parametrize("experts_implementation", [*MIXT5_IMPLEMENTATIONS, "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("routing", ["two_experts_idle", "every_slot_dropped"])
def test_every_parameter_gets_a_gradient(experts_implementation, routing):
    layer = _sparse_layer(experts_implementation)
    hidden = torch.randn(2, 5, layer.router.weight.shape[1]).abs()  # positive inputs
    if routing == "two_experts_idle":
        with torch.no_grad():  # logits +s for experts 0 and 1, -s for 2 and 3: top-2 is always {0, 1}
            layer.layer_norm.weight.fill_(1.0)
            layer.router.weight.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]).unsqueeze(1).expand_as(layer.router.weight))
        layer.token_mask = None
    else:  # only padding: it takes no capacity, so every slot is dropped and no token reaches any expert
        layer.token_mask = torch.zeros(2, 5, dtype=torch.bool)
    layer(hidden.requires_grad_()).sum().backward()

    grads = {name: param.grad for name, param in layer.named_parameters()}
    assert all(grad is not None for grad in grads.values()), [name for name, grad in grads.items() if grad is None]
    experts = [name for name in grads if name.startswith("experts.")]
    if routing == "two_experts_idle":
        for name in experts:  # one gradient per 3-D weight: zero rows for the idle experts, real ones for the rest
            assert grads[name][2:].abs().max() == 0 and grads[name][:2].abs().min(dim=-1).values.max() > 0
    else:
        assert all(grads[name].abs().max() == 0 for name in grads)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the flag or file, before anything is loaded


def test_global_batch_sets_the_per_device_batch_or_names_the_mismatch(tmp_path, monkeypatch):
    assert per_device_batch_size(16, world_size=2, gradient_accumulation_steps=2) == 4
    with pytest.raises(ValueError, match=r"--global_train_batch_size 10 .* world size 4 x --gradient_accumulation"):
        per_device_batch_size(10, world_size=4, gradient_accumulation_steps=1)
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), "--use_cpu"]
    assert parse_train_args([*argv, "--global_train_batch_size", "12"])[3].per_device_train_batch_size == 12
    monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun / accelerate launch announce; refused before any start-up
    with pytest.raises(ValueError, match=r"--global_train_batch_size 12 .* world size 8"):
        parse_train_args([*argv, "--global_train_batch_size", "12"])


@pytest.mark.parametrize(
    ("flag", "content", "message"),
    [
        ("--deepspeed", None, "no such file"),
        ("--deepspeed", '{"zero_optimization": {"stage": 2,}}', "not valid JSON"),
        ("--fsdp_config", "[1, 2]", "expected a JSON object"),
        ("--fsdp_config", None, "no such file"),
    ],
)
def test_bad_engine_config_fails_before_training(tmp_path, capsys, flag, content, message):
    if flag == "--deepspeed" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed: --deepspeed then fails on the missing package (tested below)")
    config = tmp_path / "engine.json"
    if content is not None:
        config.write_text(content)
    extra = ["--fsdp"] if flag == "--fsdp_config" else []
    argv = ["train", "--model_name_or_path", "m", "--train_file", str(SAMPLE_SQUAD), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", *extra, flag, str(config)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and str(config) in err and message in err
    assert not (tmp_path / "out").exists()


def test_engine_flags_without_their_engine_are_refused(tmp_path, monkeypatch):
    config = EXAMPLES / "fsdp" / "fsdp.json"
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), "--use_cpu"]
    with pytest.raises(ValueError, match="has no effect without --fsdp"):
        parse_train_args([*argv, "--fsdp_config", str(config)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match="pip install deepspeed"):
        parse_train_args([*argv, "--deepspeed", str(EXAMPLES / "deepspeed" / "zero2.json")])


def test_zero3_refuses_to_upcycle_in_every_process(tmp_path, monkeypatch):
    dense = save_tiny_qa_model(tmp_path / "dense")
    monkeypatch.setattr("mixt5.train.is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="mixt5 upcycle --model_name_or_path"):
        build_model(ModelArguments(model_name_or_path=str(dense)), MoEConfig(num_experts=2, moe_layers="last:1"))


# ---------------------------------------------------------------------------------------------------------------
# The shipped example configs: each starts with the command that uses it, parses, and so does that command


def _example_configs() -> list[Path]:
    return sorted([*EXAMPLES.glob("accelerate/*.yaml"), *EXAMPLES.glob("fsdp/*.json"), *EXAMPLES.glob("deepspeed/*")])


def _documented_command(path: Path) -> str:
    if path.suffix == ".json":
        config = read_engine_config("--deepspeed", str(path))
        assert next(iter(config)) == "//", f"{path}: the first key must be '//' with the command"
        return config["//"]
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# "), f"{path}: the first line must be a comment with the command"
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    return first_line[2:]


@pytest.mark.parametrize("path", _example_configs(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_names_its_command_and_parses(path, monkeypatch):
    command = shlex.split(_documented_command(path))
    assert str(path.relative_to(REPO)) in command  # the command uses this very file
    assert command[command.index("-m") + 1 : command.index("-m") + 3] == ["mixt5", "train"]
    mixt5_argv = command[command.index("-m") + 3 :]
    if "--deepspeed" in mixt5_argv:  # parsed above as JSON; building DeepSpeed's config here would leak global state
        index = mixt5_argv.index("--deepspeed")
        del mixt5_argv[index : index + 2]
    monkeypatch.chdir(REPO)
    args = parse_train_args([*mixt5_argv, "--use_cpu"])  # --use_cpu: this machine has no GPU for --bf16
    assert args[3].global_train_batch_size == 16 and args[3].per_device_train_batch_size == 16  # 1 process here


def test_fsdp_example_wraps_each_t5_block_with_its_moe_layer():
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    argv = ["--model_name_or_path", "m", "--output_dir", "unused", "--use_cpu", "--fsdp", "--fsdp_config"]
    args = parse_train_args([*argv, str(EXAMPLES / "fsdp" / "fsdp.json")])[3]
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    model = upcycle(tiny_dense(), MoEConfig(num_experts=2, moe_layers="last:1"))
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [module for module in model.modules() if policy(module)]
    assert units == [*model.encoder.block, *model.decoder.block]
    moe_layers = [layer for _, _, layer in model.sparse_layers()]
    assert all(any(layer in unit.modules() for unit in units) for layer in moe_layers)


# ---------------------------------------------------------------------------------------------------------------
# Sizes of the design note (docs/distributed.md)

# google/t5-v1_1-base and -xl config.json values (copied here: tests run offline)
T5_V1_1 = {
    "t5-v1_1-base": dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
    "t5-v1_1-xl": dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24),
}
VOCAB = 32128
BYTES_PER_PARAM = 16  # mixed-precision AdamW: bf16 weight + bf16 grad + fp32 master, momentum, variance (ZeRO paper)
GPUS = 8
TOKENS_PER_GPU = {"encoder": 8 * 512, "decoder": 8 * 32}  # 8 questions of 512 input and 32 answer tokens per GPU


def size_rows() -> list[str]:
    """One markdown row per (model, experts) with the study's MoE layout (top-2, `last:6` of each stack).

    Parameters as in the checkpoint (v1.1 has its own lm_head; transformers 5 ties it to the embedding on load), model
    states per GPU for 8 GPUs (no activations), and what moves per step per GPU for the experts: ZeRO-3/FSDP
    all-gathers every expert weight in bf16 for the forward and again for the backward; expert parallelism instead
    sends each routed token's hidden state to its expert's GPU and back, forward and backward (all-to-all, bf16).
    """
    rows = []
    for name, dims in T5_V1_1.items():
        for num_experts in (8, 32):
            moe = MoEConfig(num_experts=num_experts)
            config = MixT5Config(moe=moe, vocab_size=VOCAB, feed_forward_proj="gated-gelu", **dims)
            with torch.device("meta"):
                model = MixT5ForConditionalGeneration(config)
            total = sum(p.numel() for p in model.parameters())
            if model.lm_head.weight is model.shared.weight:
                total += VOCAB * dims["d_model"]
            experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
            layers = config.moe_layer_indices
            routed = sum(len(layers[stack]) * tokens for stack, tokens in TOKENS_PER_GPU.items())
            all_to_all = 4 * moe.top_k * dims["d_model"] * 2 * routed  # (dispatch + combine) x (fwd + bwd)
            gib = 2**30
            rows.append(
                f"| {name} | {num_experts} | {sum(map(len, layers.values()))} | {total / 1e9:.2f} B "
                f"| {experts / 1e9:.2f} B | {BYTES_PER_PARAM * total / gib:.1f} GiB "
                f"| {(2 + (BYTES_PER_PARAM - 2) / GPUS) * total / gib:.1f} GiB "
                f"| {BYTES_PER_PARAM * total / GPUS / gib:.1f} GiB | {2 * 2 * experts / 1e9:.1f} GB "
                f"| {all_to_all / 1e9:.2f} GB |"
            )
    return rows


def test_design_note_sizes_match_the_models():
    rows = size_rows()
    print("\n".join(rows))
    note = (REPO / "docs" / "distributed.md").read_text()
    missing = [row for row in rows if row not in note]
    assert not missing, "docs/distributed.md's size table is stale; replace its rows with:\n" + "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# 2 CPU processes (gloo) against 1: accelerate launch, torchrun -m mixt5, DeepSpeed; DDP/FSDP2 with idle layers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        argv, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _torchrun(*argv: str, env: dict[str, str] | None = None) -> None:
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(_free_port()), *argv], env)  # fmt: skip


def _accelerate_launch(*argv: str, env: dict[str, str] | None = None) -> None:
    """The shipped launcher config, with 2 processes (on CPU here: mixt5's --use_cpu, gloo)."""
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "examples/accelerate/multi_gpu.yaml",
             "--num_processes", "2", "--main_process_port", str(_free_port()), *argv], env)  # fmt: skip


def _train_flags(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--train_file", str(SAMPLE_SQUAD), "--validation_file", str(SAMPLE_SQUAD),
        "--max_train_samples", "16", "--max_eval_samples", str(EVAL_QUESTIONS),
        "--global_train_batch_size", "4", "--per_device_eval_batch_size", "3",
        "--num_train_epochs", "2", "--learning_rate", "1e-3", "--seed", "42",
        "--max_sequence_length", "64", "--generation_max_length", "8",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "--ddp_timeout", "120",
        *extra,
    ]  # fmt: skip


# Router losses off for the 1-vs-2 comparisons: each process balances the load over its own tokens (as Switch and GShard
# do per device), which is not the same function of the global batch, and a nudged router can flip a token's experts.
MOE_SETTINGS = ("--num_experts", "4", "--moe_layers", "last:1",
                "--router_aux_loss_coef", "0", "--router_z_loss_coef", "0")  # fmt: skip
MOE_FLAGS = ("--enable_moe", *MOE_SETTINGS)

# Runs `run_training` as `mixt5 train` does, and has every process record its final weights' hash and its log.
RECORDING_TRAINER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from transformers import TrainerCallback

    if os.environ.get("DEEPSPEED_ON_CPU"):
        # CPU-only start-up check. DeepSpeed would first compile its shared-memory allreduce (an optional speed-up;
        # minutes on 2 cores); and with --use_cpu transformers starts torch.distributed but not DeepSpeed's
        # communicator, from which ZeRO-3's partitioned loading reads the world size. On GPUs neither applies.
        import deepspeed, deepspeed.comm.torch
        deepspeed.comm.torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    from mixt5.train import parse_train_args, run_training

    class RecordRank(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            record = {"weights_sha256": digest.hexdigest(), "log_history": state.log_history}
            with open(os.path.join(os.environ["RANK_RECORDS"], f"rank{os.environ['RANK']}.json"), "w") as handle:
                json.dump(record, handle)

    run_training(*parse_train_args(sys.argv[1:]), callbacks=[RecordRank()])
    """
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny QA model with dropout off, so that 1 and 2 processes compute the same function, stored as published
    t5-v1.1 checkpoints are: `tie_word_embeddings: false` and an `lm_head.weight` of its own, so that every
    distributed path (DDP, ZeRO-2, ZeRO-3) has to keep the separate head."""
    path = save_tiny_qa_model(tmp_path_factory.mktemp("model") / "dense")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0, "tie_word_embeddings": False}))
    weights = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    weights["lm_head.weight"] = torch.randn(weights["shared.weight"].shape, generator=generator)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _assert_separate_trained_head(run: Path, dense: Path) -> None:
    """The trained model saved its own `lm_head`, trained apart from `shared`."""
    trained, initial = load_file(run / "model.safetensors"), load_file(dense / "model.safetensors")
    assert json.loads((run / "config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(trained["lm_head.weight"], trained["shared.weight"])
    for name in ("lm_head.weight", "shared.weight"):
        assert not torch.equal(trained[name], initial[name]), f"{name} did not train"


@pytest.fixture(scope="module")
def single_process_run(tiny_model, tmp_path_factory):
    """The reference: one process, the same global batch of 4 (4 per device)."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    assert main(["train", *_train_flags(tiny_model, out, *MOE_FLAGS)]) == 0
    return out


def _losses(output_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def _assert_same_losses(run: Path, reference: Path) -> None:
    # Each step sums the same label tokens of the same global batch, whatever the split into processes; only the
    # float summation order differs (measured: ~1e-6 relative, printed below). 1e-4 leaves room for that noise only.
    losses, expected = _losses(run), _losses(reference)
    assert [step for step, _ in losses] == [step for step, _ in expected] == list(range(1, 9))
    gaps = [abs(loss - other) / other for (_, loss), (_, other) in zip(losses, expected, strict=True)]
    print(f"{run.parent.name}: largest relative loss gap to one process over 8 steps: {max(gaps):.1e}")
    assert max(gaps) < 1e-4, list(zip(losses, expected, strict=True))


@pytest.mark.slow
def test_accelerate_launch_two_processes_trains_like_one(tiny_model, single_process_run, tmp_path):
    out, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    (tmp_path / "trainer.py").write_text(RECORDING_TRAINER)
    flags = _train_flags(tiny_model, out, *MOE_FLAGS)
    _accelerate_launch(str(tmp_path / "trainer.py"), *flags, env={"RANK_RECORDS": str(records)})
    rank0, rank1 = (json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    moe_logs = [
        [{k: v for k, v in e.items() if k.startswith("moe/")} for e in r["log_history"]] for r in (rank0, rank1)
    ]
    assert moe_logs[0] == moe_logs[1] and any(moe_logs[0])  # reduced over the processes: the same on both
    _assert_same_losses(out, single_process_run)
    predictions = json.loads((out / "predictions.json").read_text())
    expected = json.loads((single_process_run / "predictions.json").read_text())
    assert list(predictions) == list(expected)  # each question once, in order, none lost to the padded last batch
    assert json.loads((out / "metrics.json").read_text())["eval"]["eval_num_questions"] == EVAL_QUESTIONS
    _assert_separate_trained_head(out, tiny_model)


@pytest.mark.slow
def test_torchrun_two_processes_evaluate_every_question_once(single_process_run, tmp_path):
    out = tmp_path / "eval"
    _torchrun("-m", "mixt5", "evaluate", "--model_name_or_path", str(single_process_run), "--validation_file",
              str(SAMPLE_SQUAD), "--max_eval_samples", str(EVAL_QUESTIONS), "--per_device_eval_batch_size", "3",
              "--max_sequence_length", "64", "--generation_max_length", "8", "--output_dir", str(out),
              "--use_cpu", "--report_to", "none", "--ddp_timeout", "120")  # fmt: skip
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == json.loads((single_process_run / "predictions.json").read_text())
    assert len(predictions) == EVAL_QUESTIONS
    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads((single_process_run / "metrics.json").read_text())["eval"]
    for key in ("eval_num_questions", "eval_exact_match", "eval_f1", "eval_num_missing_predictions"):
        assert metrics[key] == expected[key], key


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_processes_start_and_train_like_one(tiny_model, single_process_run, tmp_path, stage):
    model, flags = tiny_model, MOE_FLAGS
    if stage == "zero3":  # ZeRO-3 loads partitioned: upcycle once first, as docs/distributed.md says
        model, flags = tmp_path / "moe", ()
        argv = ["upcycle", "--model_name_or_path", str(tiny_model), "--output_dir", str(model), "--seed", "42"]
        assert main([*argv, *MOE_SETTINGS]) == 0
    out, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    (tmp_path / "trainer.py").write_text(RECORDING_TRAINER)
    argv = [
        str(tmp_path / "trainer.py"),
        *_train_flags(model, out, *flags, "--deepspeed", f"examples/deepspeed/{stage}.json"),
    ]
    env = {"RANK_RECORDS": str(records), "DEEPSPEED_ON_CPU": "1"}
    (_accelerate_launch if stage == "zero2" else _torchrun)(*argv, env=env)  # both launchers take the same flags
    _assert_same_losses(out, single_process_run)
    _assert_separate_trained_head(out, tiny_model)
    assert len(json.loads((out / "predictions.json").read_text())) == EVAL_QUESTIONS


# DDP and FSDP2 (wrapped by accelerate with examples/fsdp/fsdp.json) with one process whose batch is all padding, so
# that no token reaches any expert of any MoE layer there; both must finish and agree. (Trainer runs FSDP on GPUs
# only: with --use_cpu it silently uses DDP, so FSDP2 is applied here with accelerate's own preparation function.)
IDLE_LAYERS_WORKER = textwrap.dedent(
    """
    import copy, json, sys, types
    import torch, torch.distributed as dist
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    from mixt5 import MoEConfig, upcycle
    from mixt5.train import parse_train_args
    from mixt5.trainer import share_t5_embedding_modules
    from tiny import batch, tiny_dense

    args = parse_train_args(["--model_name_or_path", "m", "--output_dir", sys.argv[1], "--use_cpu", "--fsdp",
                             "--fsdp_config", "examples/fsdp/fsdp.json", "--ddp_timeout", "60"])[3]
    rank = args.process_index  # parsing started the gloo process group
    moe = MoEConfig(num_experts=4, top_k=2, moe_layers="all", capacity_factor=1.0)
    initial = upcycle(tiny_dense(dropout_rate=0.0), moe).train()
    inputs = batch(seed=0, batch_size=2)
    if rank == 1:  # only padding: it takes no expert capacity, so every slot of every MoE layer is dropped
        inputs = {"input_ids": torch.zeros_like(inputs["input_ids"]), "attention_mask": torch.zeros_like(inputs[
            "attention_mask"]), "labels": torch.full_like(inputs["labels"], -100)}
    num_tokens = inputs["labels"].ne(-100).sum()
    dist.all_reduce(num_tokens)

    def train(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"].flatten(),
                                                     ignore_index=-100, reduction="sum") / num_tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    ddp_model = copy.deepcopy(initial)
    train(DistributedDataParallel(ddp_model, find_unused_parameters=False))
    ddp_state = {name: tensor.clone() for name, tensor in ddp_model.state_dict().items()}
    gathered = [None, None]
    dist.all_gather_object(gathered, {name: tensor.sum().item() for name, tensor in ddp_state.items()})

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        is_main_process=rank == 0, device=torch.device("cpu"))
    fsdp_model = copy.deepcopy(initial)
    share_t5_embedding_modules(fsdp_model)  # as MixT5Trainer does under FSDP
    fsdp_model = fsdp2_prepare_model(accelerator, fsdp_model)
    blocks = [*fsdp_model.encoder.block, *fsdp_model.decoder.block]
    train(fsdp_model)
    fsdp_state = {name: tensor.full_tensor() for name, tensor in fsdp_model.state_dict().items()}
    if rank == 0:
        result = {
            "ddp_ranks_agree": gathered[0] == gathered[1],
            "ddp_moved": max((ddp_state[n] - t).abs().max().item() for n, t in initial.state_dict().items()),
            "fsdp_blocks_wrapped": all(isinstance(block, FSDPModule) for block in blocks),
            "fsdp_vs_ddp": max((fsdp_state[n] - t).abs().max().item() for n, t in ddp_state.items()),
        }
        print("RESULT " + json.dumps(result))
    dist.barrier()  # both ranks leave together: gloo torn down while the other rank still runs can abort it
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ddp_and_fsdp_train_when_a_process_routes_no_token(tmp_path):
    (tmp_path / "worker.py").write_text(IDLE_LAYERS_WORKER)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            str(tmp_path / "worker.py"), str(tmp_path / "unused")]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(result)
    assert result["ddp_ranks_agree"] and result["ddp_moved"] > 0
    assert result["fsdp_blocks_wrapped"]
    assert result["fsdp_vs_ddp"] < 1e-5  # the same 3 SGD steps, sharded or replicated
