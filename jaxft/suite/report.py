"""``jaxft suite report``: one table over every run of a suite, and plots.

Read from each run's ``metrics.jsonl`` (never recomputed): the last dev loss per direction,
the last evaluation's BLEU / chrF / chrF++ per direction (runs with ``eval.every``) with
their macro average and, when the experiment sets ``eval.tier_high / tier_mid / tier_low``,
per-tier averages as ML50 reports them; the averages over answer-choice sources (``avg_acc`` /
``avg_acc_norm``) and generation sources (``avg_em`` / ``avg_gen_chrf``); the trainable size
from ``params.json`` (the entries the method updates: all for full fine-tuning, the adapters
for LoRA, K + dense tensors for LT-SFT; and as a % of the model); tokens/s: target tokens (``tokens_per_s``; runs from before it
existed: padded slots, ``seq_tokens_per_s``), mean over logged steps after the first;
the wall time from the suite's state.  Runs that differ only in their seed are also
summarised as mean ± std.  A run that has not finished is reported with what it has so far
and its state; a missing value is ``-``.

Written to ``<suite_dir>/report/`` (``report.md``, ``report.csv``, ``report.json``, each
atomically) with PNG plots: ``loss_curves.png`` (train loss of every run), ``chrf_by_tier.png``
(per-direction chrF grouped by tier, per run; when runs were evaluated) and, with ``axis``,
``<metric>_vs_<axis>.png`` (the metric of each run against that axis's values).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from jaxft.outputs import atomic_write_text, read_jsonl
from jaxft.suite.runner import read_state
from jaxft.suite.spec import RunPlan, Suite

_TIERS = ("high", "mid", "low")
# averages over sources, not directions: accuracies (jaxft.eval.choice), exact match / chrF (jaxft.eval.generation)
_SOURCE_METRICS = ("acc", "acc_norm", "em", "gen_chrf")


def _tier(direction: str, tiers: dict[str, tuple[str, ...]]) -> str | None:
    langs = direction.split("-") if direction.count("-") == 1 else [direction]
    for name, members in tiers.items():
        if direction in members or any(lang in members for lang in langs if not lang.startswith("en")):
            return name
    return None


def run_summary(plan: RunPlan, state: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run (see the module docstring)."""
    metrics = read_jsonl(plan.run_dir / "metrics.jsonl")
    train = [m for m in metrics if m.get("kind") == "train"]
    dev = [m for m in metrics if m.get("kind") == "dev" and isinstance(m.get("dev_loss"), dict)]
    evals = [m for m in metrics if m.get("kind") == "eval" and isinstance(m.get("scores"), dict)]
    speed_key = "tokens_per_s" if any("tokens_per_s" in m for m in train) else "seq_tokens_per_s"  # older runs
    speeds = [m[speed_key] for m in train[1:] if isinstance(m.get(speed_key), (int, float))]
    cfg = plan.config
    tiers = {t: getattr(cfg.eval, f"tier_{t}") for t in _TIERS if cfg is not None and getattr(cfg.eval, f"tier_{t}")}
    out: dict[str, Any] = {
        "run": plan.id, "stage": plan.stage, "axes": plan.axes, "state": state.get("status", "pending"),
        "step": train[-1]["step"] if train else 0, "steps": cfg.train.steps if cfg else None,
        "loss": train[-1].get("loss") if train else None,
        "dev_loss": dict(dev[-1]["dev_loss"]) if dev else {},
        "scores": dict(evals[-1]["scores"]) if evals else {},
        "tokens_per_s": statistics.fmean(speeds) if speeds else None,
        "wall_s": state.get("wall_s"), "loss_curve": [(m["step"], m.get("loss")) for m in train],
    }
    scores = out["scores"]
    for metric in ("bleu", "chrf", "chrfpp"):
        values = [s[metric] for s in scores.values() if isinstance(s.get(metric), (int, float))]
        out[f"avg_{metric}"] = statistics.fmean(values) if values else None
        for t in tiers:
            tv = [s[metric] for d, s in scores.items() if _tier(d, tiers) == t and isinstance(s.get(metric), (int, float))]
            out[f"{t}_{metric}"] = statistics.fmean(tv) if tv else None
    average = evals[-1].get("average") if evals else None  # answer-choice and generation sources' averages
    for metric in _SOURCE_METRICS:
        value = average.get(metric) if isinstance(average, dict) else None
        out[f"avg_{metric}"] = value if isinstance(value, (int, float)) else None
    out["tiers"] = {d: _tier(d, tiers) for d in scores}
    try:
        sizes = json.loads((plan.run_dir / "params.json").read_text(encoding="utf-8"))
        out["trainable"], out["trainable_pct"] = int(sizes["updated"]), 100 * sizes["updated"] / sizes["params"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        out["trainable"] = out["trainable_pct"] = None
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float) and abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _columns(summaries: list[dict[str, Any]]) -> list[str]:
    directions = sorted({d for s in summaries for d in s["dev_loss"]})
    scored = sorted({d for s in summaries for d in s["scores"]})
    cols = ["run", "state", "step", "loss", *[f"dev_loss:{d}" for d in directions]]
    for metric in ("bleu", "chrf", "chrfpp"):
        cols += [f"{metric}:{d}" for d in scored]
        if scored:
            cols.append(f"avg_{metric}")
            cols += [f"{t}_{metric}" for t in _TIERS if any(s.get(f"{t}_{metric}") is not None for s in summaries)]
    cols += [f"avg_{m}" for m in _SOURCE_METRICS if any(s.get(f"avg_{m}") is not None for s in summaries)]
    return cols + ["trainable", "trainable_pct", "tokens_per_s", "wall_s"]


def _cell(s: dict[str, Any], col: str) -> Any:
    kind, _, direction = col.partition(":")
    if kind == "dev_loss" and direction:
        return s["dev_loss"].get(direction)
    if direction:
        return s["scores"].get(direction, {}).get(kind)
    if col == "step":
        return f"{s['step']}/{s['steps']}" if s["steps"] else s["step"]
    return s.get(col)


def seed_groups(summaries: list[dict[str, Any]], cols: list[str]) -> list[dict[str, Any]]:
    """Runs that differ only in their seed (``seeds:``, or a ``train.seed`` axis): mean ± std
    of every numeric column."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        seed_axes = [k for k in ("seed", "train.seed") if k in s["axes"]]
        if seed_axes:
            rest = "-".join(str(v) for k, v in s["axes"].items() if k not in seed_axes)
            groups.setdefault(f"{s['stage']}.{rest or s['stage']}", []).append(s)
    out = []
    for name, members in groups.items():
        row: dict[str, Any] = {"group": name, "runs": len(members)}
        for col in cols[2:]:
            values = [v for m in members if isinstance(v := _cell(m, col), (int, float))]
            if values:
                row[col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(row)
    return out


_TITLES = {"dev_loss": "Dev loss (nats / target token)", "bleu": "BLEU", "chrf": "chrF", "chrfpp": "chrF++"}


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def to_markdown(summaries: list[dict[str, Any]], groups: list[dict[str, Any]], cols: list[str]) -> str:
    """A summary table (state, loss, averages and tiers, size, speed), then one table per
    metric over the directions, then mean ± std over seeds.  (The CSV has every column.)"""
    per_direction = [c for c in cols if ":" in c]
    summary = [c for c in cols if ":" not in c]
    lines = ["## Runs", "", *_table([[_fmt(_cell(s, c)) for c in summary] for s in summaries], summary)]
    for kind, title in _TITLES.items():
        kcols = [c for c in per_direction if c.startswith(kind + ":")]
        if kcols:
            head = ["run", *[c.split(":", 1)[1] for c in kcols]]
            lines += ["", f"## {title} per direction", "",
                      *_table([[s["run"], *(_fmt(_cell(s, c)) for c in kcols)] for s in summaries], head)]
    if groups:
        gcols = ["group", "runs", *[c for c in summary[2:] if any(c in g for g in groups)]]
        rows = [[g["group"], str(g["runs"]), *(f"{_fmt(g[c][0])} ± {_fmt(g[c][1]) if g[c][1] >= 100 else format(g[c][1], '.2g')}"
                                                    if c in g else "-" for c in gcols[2:])]
                for g in groups]
        lines += ["", "## Mean ± std over seeds", "", *_table(rows, gcols)]
    return "\n".join(lines) + "\n"


def to_csv(summaries: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for s in summaries:
        w.writerow(["" if (v := _cell(s, c)) is None else v for c in cols])
    return buf.getvalue()


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def _plots(summaries: list[dict[str, Any]], out: Path, axis: str | None, metric: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summaries:
        points = [(st, v) for st, v in s["loss_curve"] if isinstance(v, (int, float))]
        if points:
            ax.plot(*zip(*points), label=s["run"])
    ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.set_title("train loss")
    if any(s["loss_curve"] for s in summaries):
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "loss_curves.png"))
    plt.close(fig)
    scored = [s for s in summaries if s["scores"]]
    if scored:
        tiers = {d: t for s in scored for d, t in s["tiers"].items() if t}
        order = {t: i for i, t in enumerate(_TIERS)}
        directions = sorted({d for s in scored for d in s["scores"]}, key=lambda d: (order.get(tiers.get(d), 3), d))
        fig, ax = plt.subplots(figsize=(max(6, len(directions) * 0.8), 5))
        width = 0.8 / len(scored)
        for i, s in enumerate(scored):
            ax.bar([j + i * width for j in range(len(directions))],
                   [s["scores"].get(d, {}).get("chrf") or 0 for d in directions], width, label=s["run"])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(directions))])
        ax.set_xticklabels([f"{d}\n({tiers.get(d) or '-'})" for d in directions], fontsize=7)
        ax.set_ylabel("chrF"), ax.set_title("chrF per direction (tier)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "chrf_by_tier.png"))
        plt.close(fig)
    if axis:
        has_metric = any(isinstance(x.get(metric), (int, float)) for x in summaries)
        label = metric if has_metric else "mean dev loss"

        def value(x: dict[str, Any]) -> Any:
            if has_metric:
                return x.get(metric)
            return statistics.fmean(x["dev_loss"].values()) if x["dev_loss"] else None

        text = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
        series: dict[str, dict[str, list[float]]] = {}  # the other axes' values (not seeds) -> x -> values
        for x in summaries:
            y = value(x)
            if axis in x["axes"] and isinstance(y, (int, float)):
                rest = ", ".join(f"{k}={text(v)}" for k, v in x["axes"].items()
                                 if k not in (axis, "seed", "train.seed", "data.seed"))
                series.setdefault(rest or x["stage"], {}).setdefault(text(x["axes"][axis]), []).append(y)
        if series:
            labels = sorted({p for xs in series.values() for p in xs})
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for name, xs in series.items():
                pts = [(labels.index(p), statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                       for p, v in sorted(xs.items(), key=lambda kv: labels.index(kv[0]))]
                ax.errorbar(*zip(*pts), marker="o", capsize=3, label=name)
            ax.set_xticks(range(len(labels))), ax.set_xticklabels(labels)
            ax.set_xlabel(axis), ax.set_ylabel(label), ax.set_title(f"{label} by {axis} (mean ± std over seeds)")
            ax.legend(fontsize=7)
            name = (metric if has_metric else "dev_loss") + f"_vs_{axis.replace('.', '_')}.png"
            written.append(_save(fig, out / name))
            plt.close(fig)
    return written


def write_report(suite: Suite, *, axis: str | None = None, metric: str = "avg_chrf") -> tuple[str, list[Path]]:
    """The Markdown table, and the files written under ``<suite_dir>/report/``."""
    if axis is not None and not any(axis in r.axes for r in suite.runs):
        raise ValueError(f"--axis {axis}: not an axis of this suite ({sorted({a for r in suite.runs for a in r.axes})})")
    state = read_state(suite)
    summaries = [run_summary(plan, state.get(plan.id, {})) for plan in suite.runs]
    cols = _columns(summaries)
    groups = seed_groups(summaries, cols)
    md = to_markdown(summaries, groups, cols)
    out = suite.suite_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", to_csv(summaries, cols))
    plain = [{k: v for k, v in s.items() if k != "loss_curve"} for s in summaries]
    atomic_write_text(out / "report.json", json.dumps({"runs": plain, "seed_groups": groups}, indent=1) + "\n")
    return md, [out / "report.md", out / "report.csv", out / "report.json", *_plots(summaries, out, axis, metric)]
