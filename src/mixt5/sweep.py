"""`mixt5 sweep SPEC --output_dir D`: run `mixt5 train` / `mixt5 evaluate` for every arm × seed of a YAML spec, then
aggregate the results with error bars and paired tests (`D/results.md`, `D/results.csv`, `D/report.md`).

The spec (a file, or the name of a built-in one under `mixt5/sweeps/`) is validated into `SweepSpec` and every run's
command line is parsed by `mixt5 train`'s own parser before anything runs. Runs go to `D/runs/<arm>/seed-<s>/`, one
after another as subprocesses (`python -m mixt5 train ...`, or `accelerate launch -m mixt5 train ...` with
`--launcher accelerate`); `--dry_run` prints those command lines instead. Re-running the same command skips finished
runs (`metrics.json` and `predictions.json` present) and resumes half-finished ones from their last checkpoint.

Spec values may name the bundled demo assets: `demo` (as a model path) is the small pretrained checkpoint
`mixt5/resources/demo-t5/`, and `demo:train` / `demo:validation` (as a data file) are the synthetic QA splits of
`mixt5.data.demo`, generated into `D/data/demo/` on first use. `minilm` (as a model path) is all-MiniLM-L6-v2 from
the optional extra (`mixt5.pretrained.minilm_path()`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.resources
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from .data import demo as demo_data
from .report import MANIFEST, missing_markdown, run_status, table_markdown, write_report, write_results
from .utils import atomic_output_dir, atomic_write, read_json, write_json_atomic

Command = Literal["train", "evaluate"]
Launcher = Literal["python", "accelerate"]
Scalar = bool | int | float | str
ArgValue = Scalar | list[Scalar]
ArgName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")]

SPEC_COPY = "sweep.yaml"
# Flags the sweep sets itself, per run.
_RESERVED = {
    "output_dir": "runs go to OUTPUT_DIR/runs/<arm>/seed-<s>",
    "save_dir": "runs go to OUTPUT_DIR/runs/<arm>/seed-<s>",
    "seed": "the seeds come from `seeds`",
    "resume_from_checkpoint": "the sweep resumes half-finished runs itself",
}
_MODEL_KEYS = ("model_name_or_path", "pretrained_model_name_or_path", "reference_model_name_or_path", "tokenizer_name")
_DATA_KEYS = ("train_file", "validation_file")
DEMO_MODEL = "demo"
MINILM_MODEL = "minilm"
DEMO_SPLITS = {"demo:train": "train.json", "demo:validation": "validation.json"}


def _check_args(args: dict[str, Any]) -> dict[str, Any]:
    for name in args:
        if name in _RESERVED:
            raise ValueError(f"`{name}` is set by the sweep ({_RESERVED[name]}); remove it from the spec")
    return args


def _check_seeds(seeds: list[int] | None) -> list[int] | None:
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a seed")
    return seeds


class ArmSpec(BaseModel):
    """One arm: a set of `mixt5 train` (or `mixt5 evaluate`) arguments, run once per seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(description="Unique; names the run folders D/runs/<name>/.")
    command: Command = Field("train", description="train, or evaluate (scores a checkpoint without training).")
    description: str = ""
    args: dict[ArgName, ArgValue] = Field(default_factory=dict, description="Flags without `--`; override `common`.")
    seeds: list[int] | None = Field(None, min_length=1, description="Overrides the sweep's seeds for this arm.")

    @field_validator("args")
    @classmethod
    def _no_reserved_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        return _check_args(args)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        return _check_seeds(seeds)


class SweepSpec(BaseModel):
    """A sweep: arms × seeds, the arm the others are compared with, and the bootstrap settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    description: str = ""
    seeds: list[int] = Field(min_length=1, description="Seeds every arm runs with (unless the arm sets its own).")
    baseline: str | None = Field(None, description="Arm the others are tested against; default: the first train arm.")
    common: dict[ArgName, ArgValue] = Field(default_factory=dict, description="Flags shared by every arm.")
    arms: list[ArmSpec] = Field(min_length=1)
    bootstrap_resamples: int = Field(10_000, ge=100, description="Paired-bootstrap resamples of the questions.")
    bootstrap_seed: int = 0

    @field_validator("common")
    @classmethod
    def _no_reserved_args(cls, common: dict[str, Any]) -> dict[str, Any]:
        return _check_args(common)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        return _check_seeds(seeds)

    @model_validator(mode="after")
    def _check_arms(self) -> SweepSpec:
        names = [arm.name for arm in self.arms]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"arm name(s) {repeated} used more than once; arm names must be unique")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not an arm; the arms are {names}")
        return self

    @property
    def baseline_arm(self) -> str:
        if self.baseline is not None:
            return self.baseline
        return next((arm.name for arm in self.arms if arm.command == "train"), self.arms[0].name)

    def seeds_of(self, arm: ArmSpec) -> list[int]:
        return arm.seeds if arm.seeds is not None else self.seeds


# --- loading ---------------------------------------------------------------------------------------------------------


def builtin_specs() -> dict[str, Any]:
    """Built-in spec name → its file (a `Traversable` inside the installed package)."""
    folder = importlib.resources.files("mixt5") / "sweeps"
    return {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def read_spec_text(spec: str) -> tuple[str, str]:
    """(YAML text, where it came from) of a spec file path or a built-in spec name."""
    if os.path.isfile(spec):
        return Path(spec).read_text(encoding="utf-8"), spec
    builtins = builtin_specs()
    if spec in builtins:
        return builtins[spec].read_text(encoding="utf-8"), f"built-in spec {spec}"
    raise FileNotFoundError(f"{spec}: no such spec file, and not a built-in spec; built-in specs: {sorted(builtins)}")


def _read_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a sweep spec is a YAML mapping, got {type(data).__name__}")
    return data


def _extend(data: dict[str, Any], source: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply `extends: BASE` (a spec file or built-in name): the base's fields, with `common` merged key by key and
    everything else (`arms`, `seeds`, ...) replaced by this spec's own (`common: {flag: null}` removes a base flag).
    A base's baseline only stays with its arms."""
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str) or base_name in chain:
        raise ValueError(f"{source}: `extends` must name another spec (file or built-in), got {base_name!r}")
    base_text, base_source = read_spec_text(base_name)
    base = _extend(_read_mapping(base_text, base_source), base_source, (*chain, base_name))
    if "arms" in data:
        base.pop("baseline", None)
    common = {**(base.get("common") or {}), **(data.get("common") or {})}
    common = {name: value for name, value in common.items() if value is not None}  # `flag: null` drops a base flag
    return {**base, **data, "common": common}


def parse_spec(text: str, source: str) -> SweepSpec:
    """Validate YAML text into a `SweepSpec` (after `extends`); errors name the source and the offending field."""
    data = _extend(_read_mapping(text, source), source)
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in err.errors()
        )
        raise ValueError(f"{source}: invalid sweep spec:\n{problems}") from None


def load_spec(spec: str) -> SweepSpec:
    return parse_spec(*read_spec_text(spec))


# --- planning --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One arm × seed: the `mixt5 <command>` arguments and the folder they write."""

    arm: str
    seed: int
    command: Command
    output_dir: Path
    argv: tuple[str, ...]

    def status(self) -> str:
        """`done` (metrics.json and predictions.json), `partial` (a checkpoint, no metrics), ... (`run_status`)."""
        return run_status(self.output_dir)

    def command_line(self, launcher: Launcher = "python", launcher_args: Sequence[str] = ()) -> list[str]:
        """The command as printed by `--dry_run` (`python` stands for the running interpreter when executed)."""
        if launcher == "accelerate":
            return ["accelerate", "launch", *launcher_args, "-m", "mixt5", self.command, *self.argv]
        return ["python", "-m", "mixt5", self.command, *self.argv]


def demo_checkpoint() -> Path:
    """The bundled small pretrained T5 of the offline demo; a clear error where this installation lacks it."""
    path = demo_data.DEMO_CHECKPOINT  # read at call time, so that tests can point it elsewhere
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the spec uses the model `{DEMO_MODEL}`, the bundled demo checkpoint {path}, which this installation "
            "lacks; point model_name_or_path at a checkpoint instead"
        )
    return path


def _resolve(name: str, value: ArgValue, output_dir: Path) -> ArgValue:
    if name in _MODEL_KEYS and value == DEMO_MODEL:
        return str(demo_checkpoint())
    if name in _MODEL_KEYS and value == MINILM_MODEL:
        from .pretrained import minilm_path

        try:
            return str(minilm_path())
        except ImportError as err:  # a user's missing install: one line, as for the demo checkpoint
            raise FileNotFoundError(f"the spec uses the model `{MINILM_MODEL}`: {err}") from None
    if name in _DATA_KEYS and isinstance(value, str) and value.startswith("demo:"):
        if value not in DEMO_SPLITS:
            raise ValueError(f"{name}: {value!r} is not a demo split; use one of {sorted(DEMO_SPLITS)}")
        return str(output_dir / "data" / "demo" / DEMO_SPLITS[value])
    return value


def to_flags(args: dict[str, ArgValue]) -> list[str]:
    """`{"enable_moe": True, "report_to": ["none"], "lr": 1e-5}` → `--enable_moe true --report_to none --lr 1e-05`.

    Booleans are always spelt out: some Trainer flags (`--disable_tqdm`) take a value, not a bare switch.
    """
    flags: list[str] = []
    for name, value in args.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(str(item).lower() if isinstance(item, bool) else str(item) for item in values)]
    return flags


def _check_run(run: PlannedRun) -> None:
    """Parse the run's arguments with `mixt5 train`'s (or `evaluate`'s) own parser: a bad flag fails here, not hours
    into the sweep."""
    from .arguments import moe_config_from_arguments
    from .commands import UsageError
    from .evaluate import parse_evaluate_args
    from .train import parse_train_args

    where = f"arm {run.arm!r} (seed {run.seed})"
    try:
        # The spec is checked, not this machine: `--use_cpu` keeps TrainingArguments' bf16 hardware check from
        # refusing a GPU sweep planned on a CPU-only machine (`--dry_run` for a cluster).
        parsed = (parse_train_args if run.command == "train" else parse_evaluate_args)([*run.argv, "--use_cpu"])
    except UsageError as err:  # the parser's own message (unknown flag, bad choice, ...)
        raise ValueError(f"{where}: {err} (in `mixt5 {run.command} {shlex.join(run.argv)}`)") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    # argparse also takes unambiguous prefixes (`--num_expert` for `--num_experts`); a spec names flags exactly
    known = {alias.lstrip("-") for group in parsed for f in dataclasses.fields(group) for alias in _flag_names(f)}
    for flag in (token[2:] for token in run.argv if token.startswith("--")):
        if flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"{where}: `mixt5 {run.command}` has no flag --{flag}{hint}")
    model_args, data_args = parsed[0], parsed[1]
    if not (data_args.validation_file or data_args.dataset_name):
        raise ValueError(f"{where}: no validation data (validation_file or dataset_name); the sweep compares on it")
    if run.command == "train" and model_args.enable_moe:
        try:
            moe_config_from_arguments(parsed[2], parsed[3].seed)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from err


def _flag_names(field: dataclasses.Field) -> list[str]:
    """A dataclass field's flag names in `HfArgumentParser`: its name, its aliases, `no_<name>` for booleans."""
    names = [field.name, *field.metadata.get("aliases", [])]
    return [*names, f"no_{field.name}"] if field.type in (bool, "bool") else names


def plan_sweep(spec: SweepSpec, output_dir: str | os.PathLike) -> list[PlannedRun]:
    """Every run of the sweep with its full argument list, validated by the commands' parsers; no side effects.

    Runs come seed by seed (each arm's first seed, then each arm's second, ...), so a sweep stopped part-way has
    every arm at the same seeds and its paired comparisons stay meaningful.
    """
    output_dir = Path(output_dir)
    runs = []
    for arm in spec.arms:
        args = {**spec.common, **arm.args}
        resolved = {name: _resolve(name, value, output_dir) for name, value in args.items()}
        for seed in spec.seeds_of(arm):
            run_dir = output_dir / "runs" / arm.name / f"seed-{seed}"
            argv = [*to_flags(resolved), "--seed", str(seed), "--output_dir", str(run_dir)]
            if arm.command == "train":
                argv += ["--resume_from_checkpoint", "last"]  # a fresh start where there is no checkpoint yet
            run = PlannedRun(arm.name, seed, arm.command, run_dir, tuple(argv))
            _check_run(run)
            runs.append(run)
    seed_index = {(arm.name, seed): index for arm in spec.arms for index, seed in enumerate(spec.seeds_of(arm))}
    return sorted(runs, key=lambda run: seed_index[run.arm, run.seed])  # stable: arms keep the spec's order


def prepare_data(runs: Sequence[PlannedRun], output_dir: str | os.PathLike) -> None:
    """Generate the demo splits into `output_dir/data/demo/` if a run reads them and they are not there yet."""
    demo_dir = Path(output_dir) / "data" / "demo"
    wanted = {str(demo_dir / name) for name in DEMO_SPLITS.values()}
    if demo_dir.is_dir() or not any(arg in wanted for run in runs for arg in run.argv):
        return
    with atomic_output_dir(demo_dir) as staging:
        demo_data.write_demo_splits(staging)


def write_manifest(spec: SweepSpec, spec_text: str, source: str, runs: Sequence[PlannedRun], output_dir: Path) -> None:
    """Save the input spec as given (`sweep.yaml`) and the resolved plan (`sweep.json`, read by `mixt5 report`);
    `source` is the SPEC argument as given (a file or a built-in name): reports quote it in the command that made them.

    A run whose folder already holds work from different arguments is an error: its results would be mislabelled.
    """
    manifest_path = output_dir / MANIFEST
    if manifest_path.is_file():
        previous = {(r["arm"], r["seed"]): r["argv"] for r in read_json(manifest_path).get("runs", [])}
        changed = [
            f"{run.arm} seed {run.seed}"
            for run in runs
            if previous.get((run.arm, run.seed), list(run.argv)) != list(run.argv) and run.output_dir.exists()
        ]
        if changed:
            raise ValueError(
                f"{output_dir} holds runs made with other arguments than this spec gives them ({', '.join(changed)}); "
                "use another --output_dir, or delete those run folders"
            )
    with atomic_write(output_dir / SPEC_COPY) as handle:
        handle.write(spec_text)
    write_json_atomic(
        manifest_path,
        {
            "name": spec.name,
            "description": spec.description,
            "source": source,
            "baseline": spec.baseline_arm,
            "bootstrap": {"num_resamples": spec.bootstrap_resamples, "seed": spec.bootstrap_seed},
            "arms": [
                {"name": arm.name, "command": arm.command, "description": arm.description, "seeds": spec.seeds_of(arm)}
                for arm in spec.arms
            ],
            "runs": [
                {
                    "arm": run.arm,
                    "seed": run.seed,
                    "command": run.command,
                    "output_dir": os.path.relpath(run.output_dir, output_dir),
                    "argv": list(run.argv),
                }
                for run in runs
            ],
        },
    )


# --- running ---------------------------------------------------------------------------------------------------------

Executor = Callable[[list[str], Path], int]


def subprocess_executor(command: list[str], log_file: Path) -> int:
    """Run one command with its output appended to `log_file`; returns its exit status."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)


def execute(
    runs: Sequence[PlannedRun],
    output_dir: Path,
    *,
    launcher: Launcher = "python",
    launcher_args: Sequence[str] = (),
    executor: Executor | None = None,
) -> list[PlannedRun]:
    """Run the unfinished runs one after another (with `subprocess_executor` by default); returns the failed ones."""
    executor = executor or subprocess_executor
    failed = []
    for number, run in enumerate(runs, 1):
        status = run.status()
        label = f"[{number}/{len(runs)}] {run.arm} seed {run.seed}"
        if status == "done":
            print(f"{label}: done, skipped", flush=True)
            continue
        command = run.command_line(launcher, launcher_args)
        command = [sys.executable, *command[1:]] if launcher == "python" else command
        log_file = output_dir / "logs" / run.arm / f"seed-{run.seed}.log"
        verb = "resuming" if status == "partial" else "running"
        print(f"{label}: {verb} (log: {log_file})", flush=True)
        start = time.monotonic()
        returncode = executor(command, log_file)
        if returncode != 0 or run.status() != "done":
            print(f"{label}: FAILED (exit status {returncode}); see {log_file}", flush=True)
            failed.append(run)
        else:
            print(f"{label}: done in {time.monotonic() - start:.0f} s", flush=True)
    return failed


# --- CLI -------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run (or print) every arm x seed of a sweep spec, then aggregate: results.md/.csv, report.md."
    parser.add_argument("spec", nargs="?", help="a YAML spec file, or a built-in spec name (see --list)")
    parser.add_argument("--output_dir", help="where runs/, results.md, results.csv and report.md go")
    parser.add_argument("--dry_run", action="store_true", help="print the commands of the unfinished runs; run none")
    parser.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    parser.add_argument("--launcher_args", default="", help='e.g. "--num_processes 8" (with --launcher accelerate)')
    parser.add_argument("--aggregate_only", action="store_true", help="run nothing; aggregate the finished runs")
    parser.add_argument("--no_report", action="store_true", help="write results.md/.csv but not report.md and plots")
    parser.add_argument("--list", action="store_true", help="list the built-in specs and exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, entry in sorted(builtin_specs().items()):
            spec = parse_spec(entry.read_text(encoding="utf-8"), name)
            print(f"{name:<14} {spec.description.strip().splitlines()[0] if spec.description else ''}")
        return 0
    if not args.spec or not args.output_dir:
        raise ValueError("give a SPEC (file or built-in name; see --list) and --output_dir")
    text, source = read_spec_text(args.spec)  # source: the file's path, or "built-in spec NAME"
    spec = parse_spec(text, source)
    output_dir = Path(args.output_dir)
    runs = plan_sweep(spec, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(spec, text, args.spec, runs, output_dir)
    prepare_data(runs, output_dir)
    launcher_args = shlex.split(args.launcher_args)

    if args.dry_run:
        for run in runs:
            line = shlex.join(run.command_line(args.launcher, launcher_args))
            print(f"# done: {line}" if run.status() == "done" else line)
        return 0
    if not args.aggregate_only:
        execute(runs, output_dir, launcher=args.launcher, launcher_args=launcher_args)

    summary = write_results(output_dir) if args.no_report else write_report(output_dir)[1]
    print(table_markdown(summary) + "\n\n" + missing_markdown(summary))
    written = ["results.md", "results.csv", "results.json"] + ([] if args.no_report else ["report.md", "plots/"])
    print(f"\nwrote {', '.join(str(output_dir / name) for name in written)}")
    missing = [run for run in runs if run.status() != "done"]
    if missing:
        print(f"{len(missing)} of {len(runs)} runs are not finished.", file=sys.stderr)
        return 1
    return 0
