"""Side-by-side timing: every case runs once per round, rounds interleave the cases, results are medians.

Each run records wall-clock seconds and the process's CPU seconds. On a shared machine other processes steal
cores: wall-clock then measures the neighbours as much as the code, while CPU time (all threads of this process)
does not count the time it waited, so `--timer cpu` gives steadier ratios there. Wall-clock is the default.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

Timer = Literal["wall", "cpu"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Per-round wall and CPU seconds of one case."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self, timer: Timer) -> float:
        return statistics.median(self.wall if timer == "wall" else self.cpu)

    def to_dict(self) -> dict[str, float | list[float]]:
        return {
            "median_wall_s": statistics.median(self.wall),
            "median_cpu_s": statistics.median(self.cpu),
            "wall_s": self.wall,
            "cpu_s": self.cpu,
        }


def interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, Measurement]:
    """Run `warmup` untimed rounds, then `repeats` timed rounds; each round calls every case once.

    The order of the cases rotates from round to round, so no case always runs right after the same other one.
    """
    names = list(cases)
    results = {name: Measurement() for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize(device)
            if round_index >= warmup:
                results[name].wall.append(time.perf_counter() - wall)
                results[name].cpu.append(time.process_time() - cpu)
    return results
