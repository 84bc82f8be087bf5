from __future__ import annotations

from pathlib import Path


def write_report(report: dict, out: Path) -> list[Path]:
    """report.json (strict), report.md and summary.png under ``out``, renamed into place together."""
    from crosscheck.common.report import strict_json
    from crosscheck.common.report import write_report as write_files

    out = Path(out)
    paths = [out / "report.json", out / "report.md", out / "summary.png"]
    texts = {paths[0]: strict_json(report), paths[1]: markdown(report)}
    write_files(texts, paths[2], summary_figure(report))
    return paths


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU report{' (DRY RUN on the CPU: plumbing only, no GPU figures)' if report['dry_run'] else ''}",
             "", ", ".join(f"{k} {v}" for k, v in env.items()),
             f"; budget {report['budget_s']:.0f} s, took {report.get('seconds', 0):.0f} s. "
             f"Overall: **{'pass' if report.get('passed') else 'FAIL'}**.", "",
             "| part | status | seconds (budget) | note |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        note = part.get("error") or part.get("why") or ""
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} ({part.get('budget_s', 0):.0f}) "
                     f"| {str(note)[:200]} |")
    for section in (_md_parity, _md_step_time, _md_train_step, _md_cifar10):
        try:
            lines += section(report)
        except Exception as err:  # noqa: BLE001  -- a part's odd result must not cost the whole report
            lines += ["", f"({section.__name__[4:]}: could not render its result: {type(err).__name__}: {err}; "
                          "see report.json)"]
    return "\n".join(lines) + "\n"


def _md_parity(report: dict) -> list[str]:
    lines: list[str] = []
    parity = report["parts"].get("parity")
    if parity and "cases" in parity:
        lines += ["", f"## (a) Parity: jax_impl.adamw vs {parity.get('baseline', 'torch fused')}", "",
                  "| case | bitwise | max ulps (param / m / v) | drift | first mismatch |", "|---|---|---|---|---|"]
        for row in parity["cases"]:
            if row["status"] != "run":
                lines.append(f"| {row['case']} | {row['status']} | | | |")
                continue
            u = row["max_ulps"]
            lines.append(f"| {row['case']} | {'**yes**' if row['bitwise'] else 'no'} | {u['param']:.0f} / "
                         f"{u['exp_avg']:.0f} / {u['exp_avg_sq']:.0f} | {row['drift']} | {row['first_mismatch']} |")
        lines += ["", "Peers (measured, not judged): see parity/report.md."]
        contraction = parity.get("contraction")
        if contraction:
            dtypes = list(contraction["by_dtype"])
            lines += ["", "### nvcc's FMA contraction: each candidate re-synced to torch every step", "",
                      "| candidate | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
            names = next((list(t) for t in contraction["by_dtype"].values() if "status" not in t), [])
            for name in names:
                cells = []
                for d in dtypes:
                    t = contraction["by_dtype"][d]
                    cells.append(t.get("status", "") if "status" in t else
                                 ("**bitwise**" if t[name]["bitwise"] else
                                  f"{100 * t[name]['min_bitwise_fraction']:.4f}% equal"))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines += ["", f"Bitwise in every dtype: {contraction['bitwise_in_every_dtype'] or 'none'}; "
                          f"the default ({contraction['default_candidate']}) "
                          f"{'is' if contraction['model_bitwise'] else 'is NOT'} among them. "
                          f"{contraction['note']}."]
        bias = parity.get("bias_corrections")
        if bias:
            lines += ["", "### Bias corrections: device pow vs host pow (rounded to float32)", "",
                      "| betas | steps | bc1 differing | bc2_sqrt differing |", "|---|---|---|---|"]
            for k, v in bias.items():
                lines.append(f"| {k} | {v['steps']} | {v['bc1_steps_differing']} {v['bc1_first'] or ''} | "
                             f"{v['bc2_sqrt_steps_differing']} {v['bc2_sqrt_first'] or ''} |")
    return lines


def _md_step_time(report: dict) -> list[str]:
    lines: list[str] = []
    st = report["parts"].get("step_time")
    if st and st.get("rows"):
        lines += ["", "## (b) Optimizer step time (float32, median of interleaved rounds)", "",
                  "| layout | params | implementation | ms (IQR) | % of copy bandwidth | % of addcmul bandwidth | "
                  "vs fastest peer | compile s |", "|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            frac = r.get("fraction_of_copy_bandwidth")
            lines.append(f"| {r['layout']} ({r['leaves']}) | {r['params']:.0e} | {r['implementation']} | "
                         f"{r['ms']:.3f} ({r['iqr_ms']:.3f}) | {_fmt(None if frac is None else 100 * frac, '.0f')} | "
                         f"{100 * r['fraction_of_bandwidth']:.0f} | {r['vs_fastest_peer']:.2f}x | "
                         f"{_fmt(r['compile_s'], '.2f')} |")
        bw = sorted({(r["layout"], r["params"], r.get("copy_bandwidth_gb_per_s")) for r in st["rows"]},
                    key=lambda x: (x[0], x[1]))
        lines += ["", "Device-to-device copy bandwidth (GB/s): "
                  + ", ".join(f"{layout} {n:.0e}: {_fmt(b, '.0f')}" for layout, n, b in bw)]
        for s in st.get("skipped", []):
            lines.append(f"- not measured: {s}")
    return lines


def _md_train_step(report: dict) -> list[str]:
    lines: list[str] = []
    tr = report["parts"].get("train_step")
    if tr and tr.get("rows"):
        lines += ["", "## (c) Training step (forward + backward + AdamW)", "",
                  "| model | batch | params | implementation | ms (IQR) | vs torch eager | compile s |",
                  "|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['params']:.2e} | {r['implementation']} | "
                         f"{r['ms']:.2f} ({r['iqr_ms']:.2f}) | {r['vs_torch_eager']:.2f}x | "
                         f"{_fmt(r['compile_s'], '.1f')} |")
        for e in tr.get("errors", []):
            lines.append(f"- {e}")
    return lines


def _md_cifar10(report: dict) -> list[str]:
    lines: list[str] = []
    cf = report["parts"].get("cifar10")
    if cf and cf.get("status") not in (None, "skipped") and "steps" in cf:
        lines += ["", "## (d) CIFAR-10, shared gradients (torch fused CUDA AdamW vs jax_impl.adamw)", "",
                  f"{cf['steps']} steps (batch {cf['batch']}), max ulps over all params and steps: {cf['max_ulps']}, "
                  f"first mismatching step: {cf['first_mismatch_step']}; data: {cf.get('data')}."]
    return lines


def summary_figure(report: dict):
    """Step time against params per implementation and layout (or a note when nothing was timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (report["parts"].get("step_time") or {}).get("rows") or []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if rows:
        # One colour per implementation; the layout is the line style.
        for index, name in enumerate(dict.fromkeys(r["implementation"] for r in rows)):
            for layout, style in (("one", "-"), ("many", "--")):
                points = sorted((r["params"], r["ms"]) for r in rows
                                if r["implementation"] == name and r["layout"] == layout)
                if points:
                    ax.plot(*zip(*points), style, marker="o", lw=1, color=plt.cm.tab10(index % 10),
                            label=f"{name} ({layout})")
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms / step",
               title="AdamW step time" + (" (dry run, CPU)" if report["dry_run"] else ""))
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no step times measured", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    return fig
