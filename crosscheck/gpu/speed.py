from __future__ import annotations

import gc
from pathlib import Path

from crosscheck.gpu.settings import (Clock, Settings, benchmark_module,
                                     free_device_memory, say)

STEP_TIME_IMPLS = ("jax_impl.adamw", "jax_impl.adamw[xla; torch-cpu rounding]", "optax.adamw",
                   "torch.optim.AdamW(fused)", "torch.optim.AdamW(foreach)")


def part_step_time(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    step_time = benchmark_module("step_time")
    impls = list(STEP_TIME_IMPLS) + [step_time.COPY]
    rows, skipped = [], []
    partial.update({"rows": rows, "skipped": skipped})
    for n in settings.sizes:
        for layout in ("one", "many"):
            if clock.expired():
                skipped.append({"layout": layout, "params": n, "why": "budget"})
                continue
            groups = _memory_groups(n, impls, step_time.COPY, settings)
            for group in groups:
                say(f"step_time: {layout} layout, {n:.0e} params: {', '.join(group)}")
                try:
                    rows += step_time.run(settings.device if settings.device == "cpu" else "gpu", [n], [layout],
                                          group, "float32", settings.repeats if n < 10**9 else 5, progress=False,
                                          leaves=settings.leaves)
                except Exception as err:  # noqa: BLE001  -- e.g. out of memory at 1e9: the row says so
                    skipped.append({"layout": layout, "params": n, "impls": group,
                                    "why": f"{type(err).__name__}: {str(err)[:300]}"})
                finally:
                    gc.collect()
                    free_device_memory(settings)
    step_time.plot(rows, out / "step_time.png") if rows else None
    return {"status": "pass" if not any(s["why"] == "budget" for s in skipped) else "timeout", "rows": rows,
            "skipped": skipped, "files": ["step_time.png"] if rows else [],
            "note": "fraction_of_copy_bandwidth: 28 B/param over the device-to-device copy's bandwidth, "
                    "measured in the same interleaved rounds"}


def _memory_groups(n: int, impls: list[str], copy: str, settings: Settings) -> list[list[str]]:
    """All implementations in one interleaved group if they fit in the device memory, else each with the copy."""
    if settings.device != "cuda":
        return [impls]
    import torch

    free, _ = torch.cuda.mem_get_info()
    # params, grads, two moments (16 B/param) per implementation, foreach's temporaries, the bandwidth kernels.
    need = n * (24 * (len(impls) - 1) + 12 + 8)
    if need < 0.8 * free:
        return [impls]
    return [[name, copy] for name in impls if name != copy]
