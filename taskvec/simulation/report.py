"""Simulation reports: `report.md`, and PNG plots made with matplotlib (headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from taskvec.io.files import atomic_output

GROUP_ORDER = {"base": 0, "local": 1, "merged": 2, "calibrated": 3, "async": 4, "centralised": 5}
SHOWN = ("auroc", "accuracy", "balanced_accuracy", "macro_f1", "dice", "jaccard", "pixel_accuracy")


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _cell(r: dict[str, Any], c: str) -> str:
    """A metric, as mean ± sd when the row aggregates seeds."""
    sd = r.get("metrics_sd", {}).get(c)
    return _fmt(r["metrics"].get(c)) + ("" if sd is None else f" ± {sd:.4f}")


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by report.md and the terminal table."""
    cols = [c for c in SHOWN if any(c in r["metrics"] for r in rows)]
    header = ["model", "kind", "ε", *cols]
    body = [[r["name"], r["group"], "∞" if r["epsilon"] is None else f"{r['epsilon']:g}",
             *[_cell(r, c) for c in cols]]
            for r in sorted(rows, key=lambda r: (r["epsilon"] or 0, GROUP_ORDER[r["group"]]))]
    return header, body


def _markdown(summary: dict[str, Any], plots: list[Path]) -> str:
    header, body = table_rows(summary["rows"])
    cfg = summary["config"]
    lines = [
        "# taskvec simulation report", "",
        f"Data `{cfg['data']}`, task {cfg['task']}, {cfg['sites']} sites split `{cfg['split']}` "
        f"(samples per site: {', '.join(map(str, summary['site_samples']))}), architecture `{cfg['arch']}`, "
        f"training `{cfg.get('train', 'all')}`, {cfg['epochs'] or 'default'} epochs per site, test split of "
        f"{summary['test_samples']} samples never used for training.",
        "", *[f"- {n}" for n in summary["notes"]], "",
        f"Primary metric: **{summary['metric']}**. `local` = one site alone; `merged` = base + combine(vectors); "
        "`calibrated` = λ chosen on the merger's validation share; `centralised` = the union of all sites' data, "
        "same epochs. ε = ∞ means no DP; otherwise DP-SGD at that ε (δ = "
        f"{cfg['delta']:g}) for every site and for the centralised run.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in body], "",
        *_rounds_markdown(summary),
        *[f"![{p.stem}]({p.name})" for p in plots], "",
    ]
    return "\n".join(lines)


def _rounds_markdown(summary: dict[str, Any]) -> list[str]:
    """How the asynchronous rounds ran, and each site's ε composed over its rounds."""
    cfg, schedule = summary["config"], summary.get("schedule")
    if schedule is None:
        return []
    order = " ".join(f"site{a['site']}→v{a['base_version']}" for a in schedule["arrivals"])
    speeds = ("given" if cfg["speeds"] is not None else "drawn uniformly from 1 to 4 with each seed"
              + ("; those of the first seed" if "seeds" in cfg else ""))
    lines = [
        f"`async-vN@A` = version N of asynchronous rounds, published after A arrivals: each site arrives up to "
        f"{schedule['rounds']} times, re-basing each fine-tune on the newest version published when it starts; "
        f"the merger combines every {schedule['buffer']} arrivals with `{cfg['round_method']}` onto the newest "
        f"version, each vector weighted by (1 + staleness) ^ -{cfg['staleness']:g} (FedBuff). Relative time per "
        f"fine-tune ({speeds}): {', '.join(f'site{i} {s:g}' for i, s in enumerate(schedule['speeds']))}; "
        f"arrivals (site→version it trained from): {order}.", "",
    ]
    composed = [r for r in summary["rows"] if r.get("composed_epsilon") and r.get("final")]
    if composed:
        sites = list(composed[0]["composed_epsilon"])
        lines += ["Each site's ε (DP-SGD, per image, add-remove) composed over all its arrivals, from the last "
                  "version's merge record:", "", "| target ε per arrival | " + " | ".join(sites) + " |",
                  "|" + "---|" * (1 + len(sites))]
        lines += [f"| {r['epsilon']:g} | " + " | ".join(f"{e:.3g}" for e in r["composed_epsilon"].values()) + " |"
                  for r in composed] + [""]
    return lines


def _plot_methods(out: Path, rows: list[dict[str, Any]], metric: str, eps: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["epsilon"] == eps]
    local = [r["value"] for r in sel if r["group"] == "local" and r["value"] is not None]
    merged = [r for r in sel if r["group"] in ("merged", "calibrated")]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(merged) + 2), 4))
    names = [r["name"] for r in merged]
    colors = ["tab:blue" if r["group"] == "merged" else "tab:cyan" for r in merged]
    ax.bar(range(len(merged)), [r["value"] or 0 for r in merged], color=colors,
           yerr=[r.get("value_sd") or 0 for r in merged], capsize=3)
    if local:
        ax.axhspan(min(local), max(local), color="tab:orange", alpha=0.2,
                   label=f"single sites (min–max of {len(local)})")
        ax.axhline(sum(local) / len(local), color="tab:orange", lw=1, label="single sites (mean)")
    for group, style in (("centralised", "tab:green"), ("base", "tab:gray")):
        for r in sel + ([rows[0]] if group == "base" else []):
            if r["group"] == group and r["value"] is not None:
                ax.axhline(r["value"], color=style, ls="--", label=group)
                if r.get("value_sd"):
                    ax.axhspan(r["value"] - r["value_sd"], r["value"] + r["value_sd"], color=style, alpha=0.1)
                break
    ax.set_xticks(range(len(merged)), names, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"Merged models vs single sites and centralised ({'no DP' if eps is None else f'ε = {eps:g}'})")
    ax.legend(loc="lower right", fontsize=8)
    values = [r["value"] for r in sel if r["value"] is not None] + [rows[0]["value"] or 0]
    ax.set_ylim(max(0.0, min(values) - 0.1), min(1.0, max(values) + 0.05))
    fig.tight_layout()
    path = out / ("metric_by_method.png" if eps is None else f"metric_by_method_eps{eps:g}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_epsilon(out: Path, rows: list[dict[str, Any]], metric: str, epsilons: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["epsilon"] is None or r["value"] is None or r["group"] == "base" or (
                r["group"] == "async" and not r["final"]):
            continue
        key = r["method"] if r["group"] == "merged" else r["group"]
        if r["group"] == "calibrated":
            key = f"{r['method']}+cal"
        series.setdefault(key, []).append((r["epsilon"], r["value"], r.get("value_sd") or 0.0))
    for key, pts in sorted(series.items()):
        if key == "local":  # mean over sites at each ε (error bars: the spread over sites)
            by: dict[float, list[float]] = {}
            for e, v, _ in pts:
                by.setdefault(e, []).append(v)
            pts = [(e, sum(v) / len(v), float(np.std(v))) for e, v in by.items()]
            key = "single sites (mean)"
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=key)
    ax.set_xscale("log")
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.set_xlabel("ε (DP-SGD, per site)")
    ax.set_ylabel(metric)
    ax.set_title("Utility against the privacy budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "utility_vs_epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_arrivals(out: Path, rows: list[dict[str, Any]], metric: str, eps: float | None) -> Path:
    """Utility of the newest version against the number of arrivals, beside one-shot merging with the same
    method, the best single site and centralised training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["epsilon"] == eps]
    versions = sorted((r for r in sel if r["group"] == "async"), key=lambda r: r["arrivals"])
    points = [(0, rows[0]), *((r["arrivals"], r) for r in versions)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([a for a, _ in points], [r["value"] for _, r in points],
                yerr=[r.get("value_sd") or 0 for _, r in points], marker="o", capsize=3, color="tab:blue",
                label=f"asynchronous ({versions[0]['method']}), v0 = base")
    local = [r for r in sel if r["group"] == "local"]
    best = [max(local, key=lambda r: r["value"])] if local else []
    lines = [("one-shot " + versions[0]["method"], "tab:purple",
              [r for r in sel if r["group"] == "merged" and r["method"] == versions[0]["method"]]),
             (f"best single site ({best[0]['name'] if best else ''})", "tab:orange", best),
             ("centralised", "tab:green", [r for r in sel if r["group"] == "centralised"])]
    for label, color, found in lines:
        for r in found:
            ax.axhline(r["value"], color=color, ls="--", label=label)
            if r.get("value_sd"):
                ax.axhspan(r["value"] - r["value_sd"], r["value"] + r["value_sd"], color=color, alpha=0.1)
    ax.set_xlabel("arrivals (site fine-tunes received by the merger)")
    ax.set_ylabel(metric)
    ax.set_title(f"Asynchronous rounds ({'no DP' if eps is None else f'DP-SGD ε = {eps:g} per arrival'})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / ("utility_vs_arrivals.png" if eps is None else f"utility_vs_arrivals_eps{eps:g}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict[str, Any]) -> tuple[Path, list[Path]]:
    """Write the plots and `report.md` into `out`; return their paths."""
    rows, metric = summary["rows"], summary["metric"]
    epsilons = summary["config"]["epsilons"]
    plots = [_plot_methods(out, rows, metric, eps) for eps in [None, *epsilons]]
    if "schedule" in summary:
        plots += [_plot_arrivals(out, rows, metric, eps) for eps in [None, *epsilons]]
    if epsilons:
        plots.append(_plot_epsilon(out, rows, metric, epsilons))
    with atomic_output(out / "report.md", force=True) as tmp:
        tmp.write_text(_markdown(summary, plots))
    return out / "report.md", plots
