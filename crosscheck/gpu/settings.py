from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class PartTimeout(Exception):
    """A part overran its deadline (raised by the alarm, or by a part that checks its clock)."""


@dataclasses.dataclass
class Clock:
    """A part's deadline: parts check ``expired()`` between units of work and stop early."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


@dataclasses.dataclass
class Settings:
    """Sizes: full on the GPU, tiny for --dry-run (the CPU backend in CI)."""

    device: str  # torch device: "cuda", or "cpu" in a dry run
    dry_run: bool
    progress: bool
    data_dir: Path | None
    # jax_impl's rounding for the later parts: "auto", or the candidate part (a) found bitwise with torch.
    rounding: object = "auto"

    @property
    def suite_steps(self) -> int | None:
        return 3 if self.dry_run else None  # None: the suite's own step counts

    @property
    def candidate_steps(self) -> int:
        return 2 if self.dry_run else 20

    @property
    def sizes(self) -> list[int]:
        # Largest first: the rows the goal is about (>= 1e8) are measured before the budget runs out.
        return [2000] if self.dry_run else [10**8, 10**9, 10**7, 10**6]

    @property
    def leaves(self) -> int:
        return 12 if self.dry_run else 300  # the "many" layout

    @property
    def cifar_steps(self) -> int | None:
        return 5 if self.dry_run else None  # None: two epochs, or the budget

    @property
    def repeats(self) -> int:
        return 3 if self.dry_run else 15


def say(line: str) -> None:
    print(f"[gpu] {line}", file=sys.stderr, flush=True)


def free_device_memory(settings: Settings) -> None:
    if settings.device == "cuda":
        import torch

        torch.cuda.empty_cache()


def benchmark_module(name: str):
    """benchmarks/<name>.py of this source checkout (benchmarks/ is not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the gpu command runs from a source checkout)")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # train_step.py imports step_time by name
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
