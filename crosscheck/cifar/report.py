"""The CIFAR-10 parity report: report.json, report.md and cifar10.png (written atomically)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from crosscheck.cifar.parity import Result
from crosscheck.common.report import strict_json, write_report


def markdown(result: Result) -> str:
    cfg = result.config
    lines = [f"CIFAR-10 parity, mode {cfg['mode']}: data {result.data}, batch {cfg['batch_size']}, lr {cfg['lr']:g}, "
             f"weight decay {cfg['weight_decay']:g}, seed {cfg['seed']}"
             + (f", {cfg['replicas']} torch replicas with initial weights x (1 + {cfg['perturbation']:g} N(0,1))"
                if cfg["mode"] == "independent" else ""),
             "", f"Logit gap before training (test set, torch vs Flax): {result.logit_gap:.3g}", "",
             "| epoch | run | train loss | test loss | test acc. | s/epoch |", "|---|---|---|---|---|---|"]
    for record in result.epochs:
        for name in result.runs:
            r = record[name]
            lines.append(f"| {record['epoch']} | {name} | {r['train_loss']:.4f} | {r['test_loss']:.4f} | "
                         f"{100 * r['accuracy']:.2f}% | {r['seconds']:.1f} |")
    lines += ["", "| check | value | bound | where | pass |", "|---|---|---|---|---|"]
    for c in result.checks:
        where = []
        if "epoch" in c:
            where.append(f"epoch {c['epoch']}, band {c['band']:.3g}, at {c['position']:.2f} of the band")
        if "replicas" in c:
            where.append(f"replicas reach {c['replicas']:.3g}")
        if c.get("first_failing_step"):
            where.append(f"first at step {c['first_failing_step']}")
        lines.append(f"| {c['check']} | {c['value']:.4g} | {c['bound']:.4g} | {'; '.join(where) or '-'} | "
                     f"{'pass' if c['pass'] else '**FAIL**'} |")
    lines.append("")
    return "\n".join(lines)


def _smooth(values, window: int = 20) -> np.ndarray:
    values = np.asarray(values, float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def colors(result: Result) -> dict[str, object]:
    """One colour per implementation, the same in every panel (torch's baseline first); replicas grey.

    A measurement of an implementation ("jax_impl.adamw (Flax forward)") has
    the implementation's colour (drawn dashed).
    """
    import matplotlib.pyplot as plt

    palette: dict[str, object] = {}
    implementations: list[str] = []
    for name in [*result.runs, *result.step_loss]:
        if name.startswith("torch replica"):
            palette[name] = "0.6"
            continue
        base = name.split(" (")[0]
        if base not in implementations:
            implementations.append(base)
        palette[name] = plt.cm.tab10(implementations.index(base) % 10)
    return palette


def figure(result: Result):
    """Loss, accuracy and parameter divergence from torch; runs that stay bitwise are named where nothing is drawn.

    Curves that (nearly) coincide (shared-grads: one loss for torch and
    jax_impl) are drawn widest first, so every colour shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = colors(result)
    fig, (loss_ax, acc_ax, div_ax) = plt.subplots(1, 3, figsize=(18, 4.5))
    replicas = [n for n in result.runs if n.startswith("torch replica")]
    if replicas:
        band = np.asarray([_smooth(result.step_loss[n]) for n in replicas])
        x = np.arange(1, band.shape[1] + 1)
        loss_ax.fill_between(x, band.min(0), band.max(0), color="0.8", label="torch replicas (band)")
    for index, name in enumerate(n for n in result.step_loss if n not in replicas):
        smoothed = _smooth(result.step_loss[name])
        loss_ax.plot(np.arange(1, len(smoothed) + 1), smoothed, lw=max(0.8, 2.6 - 0.8 * index), color=palette[name],
                     ls="--" if " (" in name else "-", label=name)
    loss_ax.set(xlabel="step", ylabel="train loss (20-step mean)", title="training loss")
    loss_ax.legend(fontsize=7)

    epochs = [r["epoch"] for r in result.epochs]
    for index, name in enumerate(result.runs):
        style = dict(lw=0.8) if name in replicas else dict(marker="o", lw=max(0.8, 2.2 - 0.7 * index),
                                                           ms=max(3.0, 7.0 - 2.0 * index))
        acc_ax.plot(epochs, [100 * r[name]["accuracy"] for r in result.epochs], color=palette[name],
                    label=None if name in replicas[1:] else name, **style)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    acc_ax.legend(fontsize=7)

    bitwise = []
    for name, layers in result.divergence.items():
        worst = np.max(np.asarray(list(layers.values())), axis=0)
        if not np.any(worst > 0):
            bitwise.append(name)  # a zero has no point on a log axis: said in words below
            continue
        style = dict(lw=0.8) if name in replicas else dict(lw=1.5)
        div_ax.plot(result.divergence_steps, np.where(worst > 0, worst, np.nan), color=palette[name],
                    label=None if name in replicas[1:] else name, **style)
    div_ax.set(xlabel="step", ylabel="max over layers of |p - p_torch| / |p_torch|",
               title="parameter divergence from torch")
    curves = div_ax.has_data()
    if curves:
        div_ax.set_yscale("log")
        div_ax.legend(fontsize=7)
    else:  # no empty log axis with made-up decades
        div_ax.set(xticks=[], yticks=[])
    if bitwise:
        baseline = result.runs[0] if result.runs else "torch"
        div_ax.text(0.5, 0.95 if curves else 0.5, f"bitwise at every step:\n{', '.join(bitwise)} = {baseline}",
                    transform=div_ax.transAxes, ha="center", va="top" if curves else "center", fontsize=9)
    fig.tight_layout()
    return fig


def plot(result: Result, path: Path) -> None:
    write_report({}, path, figure(result))


def write(result: Result, out_dir: Path) -> list[Path]:
    """report.json (strict JSON), report.md and cifar10.png, renamed into place together."""
    out_dir = Path(out_dir)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "cifar10.png"]
    text_json, text_md = strict_json({"passed": result.passed, **asdict(result)}), markdown(result)
    write_report({paths[0]: text_json, paths[1]: text_md}, paths[2], figure(result))
    return paths
