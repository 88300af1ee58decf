"""``dcal report RUN [RUN ...]``: training curves (PNG) and a Markdown summary of one run or an overlay of several
(e.g. the variants of an ablation).

Reads what ``dcal train`` writes: ``metrics.jsonl`` (one record per epoch, then a ``final`` record) and
``config.yaml``. Curves: loss per branch (and the total), the learned loss weights, the learning rate, and top-1
per branch (FGVC) or mAP / rank-1 (Re-ID); for FGVC runs that measured it, the mechanism (:mod:`dcal.mechanism`):
the mark hits of the rollout, last-layer and chance selections and PWCA's mean distractor share per epoch, and
the per-block share of the last evaluated epoch. The summary gives best and last epoch, training time and
throughput, what each backbone started from (a pretrained file or run, timm's weights, or from scratch), the last
mechanism values, and the config: the main keys of one run, or for several runs the keys in which they differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

from dcal.pretrain import describe_backbone
from dcal.run_folder import CONFIG, METRICS, read_config, read_metrics
from dcal.visualize import new_figure, save_figure
from dcal.vocabulary import BEST_METRIC, BRANCHES, SCORE_KEYS

# dcal.mechanism's per-epoch numbers: mark hits in %, the PWCA share as a fraction (plotted in % beside them)
MARK_HITS = ("mark_hit_rollout", "mark_hit_last_layer", "mark_hit_chance")
PWCA_SHARE = "pwca_share_mean"
SUMMARY_KEYS = ("task", "data.dataset", "model.backbone", "model.img_size", "model.top_r", "model.glca_blocks",
                "model.pwca_blocks", "train.epochs", "train.batch_size", "train.optimizer", "train.lr", "train.amp")


@dataclass
class RunLog:
    """One run's per-epoch records, final record (None while it trains) and config."""

    path: Path
    label: str
    epochs: list[dict[str, Any]]
    final: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.config.get("task", "fgvc"))


def read_run(run: str | Path, label: str | None = None) -> RunLog:
    """Load ``metrics.jsonl`` and ``config.yaml`` of a run directory (clear errors naming the file)."""
    run = Path(run)
    metrics = run / METRICS
    if not metrics.is_file():
        raise FileNotFoundError(f"{run} is not a dcal run: {metrics} does not exist")
    records = read_metrics(metrics)  # a cut last line dropped, other bad lines named
    config = read_config(run) or {}
    epochs = [r for r in records if not r.get("final")]
    if not epochs:
        raise ValueError(f"{metrics} holds no epoch record yet")
    final = next((r for r in reversed(records) if r.get("final")), None)
    return RunLog(run, label or run.name, epochs, final, config)


def _labels(runs: Sequence[str | Path]) -> list[str]:
    """Run directory names, with their parents when names repeat (runs/a/dcal vs runs/b/dcal)."""
    names = [Path(r).name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(*Path(r).parts[-2:])) for r in runs]


def read_runs(runs: Sequence[str | Path]) -> list[RunLog]:
    logs = [read_run(r, label) for r, label in zip(runs, _labels(runs), strict=True)]
    if len({log.task for log in logs}) > 1:
        raise ValueError(f"cannot overlay FGVC and Re-ID runs: {[(str(g.path), g.task) for g in logs]}")
    return logs


def _series(log: RunLog, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"], scale * r[key]) for r in log.epochs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def last_with(log: RunLog, key: str) -> dict[str, Any] | None:
    """The last epoch record that has ``key`` (the last evaluated epoch, for evaluation keys)."""
    return next((r for r in reversed(log.epochs) if key in r), None)


def _has_mechanism(log: RunLog) -> bool:
    return any(k in r for r in log.epochs for k in (*MARK_HITS, PWCA_SHARE))


def plot_curves(logs: Sequence[RunLog], path: str | Path) -> Path:
    """Four panels (loss per branch, loss weights, lr, scores), then, when a run measured them, the mechanism
    (mark hits of the three selections and PWCA's mean distractor share, in %) and PWCA's share per block in the
    last evaluated epoch (bars); one colour per quantity, one line style per run (the runs' bars: one hatch each),
    whole-number epoch ticks."""
    from matplotlib.ticker import MaxNLocator

    task = logs[0].task
    panels = [
        ("loss", ["loss", *(f"loss_{b}" for b in BRANCHES)]),
        ("learned loss weight", [f"weight_{b}" for b in BRANCHES]),
        ("learning rate", ["lr"]),
        ("test score (%)", list(SCORE_KEYS[task])),
    ]
    if any(_has_mechanism(log) for log in logs):
        panels.append(("mechanism (%): mark hits, PWCA share", [*MARK_HITS, PWCA_SHARE]))
    per_block = [(log, last_with(log, "pwca_share")) for log in logs]
    per_block = [(log, r) for log, r in per_block if r is not None]
    styles = ["-", "--", ":", "-."]
    hatches = ["", "//", "..", "xx"]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(panels) + bool(per_block)
    fig, axes = new_figure(1, n, figsize=(4.5 * n, 4.2))
    for ax, (title, keys) in zip(axes[0], panels, strict=False):
        for r, log in enumerate(logs):
            for s, key in enumerate(keys):
                x, y = _series(log, key, 100.0 if key == PWCA_SHARE else 1.0)
                if x:
                    label = key if len(logs) == 1 else f"{log.label}: {key}"
                    ax.plot(x, y, styles[r % len(styles)], color=colors[s % len(colors)], marker="." if len(x) < 30
                            else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:  # plain values: no "1e-6+4.999e-1" offset above a panel of nearly equal weights
            ax.ticklabel_format(axis="y", useOffset=False)
        if ax.lines:
            ax.legend(fontsize=7)
    if per_block:
        ax = axes[0, -1]
        width = 0.8 / len(per_block)
        for r, (log, rec) in enumerate(per_block):
            shares = [100.0 * v for v in rec["pwca_share"]]
            ax.bar([i + 1 + (r - (len(per_block) - 1) / 2) * width for i in range(len(shares))], shares, width,
                   color=colors[0], edgecolor="black", hatch=hatches[logs.index(log) % len(hatches)],
                   label=f"{log.label} (epoch {rec['epoch']})")
        ax.axhline(50.0, color="grey", linewidth=0.8, linestyle=":")  # what a self-pair would give
        ax.set_title("PWCA share per block, last epoch (%)")
        ax.set_xlabel("pair-wise block")
        ax.set_xticks(range(1, max(len(rec["pwca_share"]) for _, rec in per_block) + 1))
        ax.legend(fontsize=7)
    fig.suptitle(", ".join(log.label for log in logs), fontsize=10)
    return save_figure(fig, path, dpi=100)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 0.01 else f"{v:.2f}"
    return "-" if v is None else str(v)


def run_summary(log: RunLog) -> dict[str, Any]:
    """Best and last epoch, the scores there, training time and mean throughput."""
    metric = BEST_METRIC[log.task]
    scored = [r for r in log.epochs if metric in r]
    best = max(scored, key=lambda r: r[metric]) if scored else None
    last = log.epochs[-1]
    rates = [r["images_per_s"] for r in log.epochs if "images_per_s" in r]
    return {
        "run": log.label, "epochs": f"{last['epoch']}/{_flat(log.config).get('train.epochs', '?')}",
        f"best {metric}": best[metric] if best else None, "best epoch": best["epoch"] if best else None,
        **{f"last {k}": last.get(k) for k in SCORE_KEYS[log.task]},
        "last loss": last.get("loss"),
        "train time (min)": log.final["train_time_s"] / 60 if log.final and "train_time_s" in log.final else None,
        "images/s": sum(rates) / len(rates) if rates else None,
        "finished": log.final is not None,
    }


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
            *("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows)]


def mechanism_lines(log: RunLog) -> list[str]:
    """The last evaluated epoch's mechanism values of ``log`` as Markdown list items (none if not measured)."""
    lines = []
    rec = last_with(log, MARK_HITS[0])
    if rec is not None:
        lines.append(f"- mark hit of the ⌈R·N⌉ selected patches (epoch {rec['epoch']}): rollout "
                     f"{rec['mark_hit_rollout']:.1f}%, last layer {rec['mark_hit_last_layer']:.1f}%, chance "
                     f"{rec['mark_hit_chance']:.1f}%")
    rec = last_with(log, "pwca_share")
    if rec is not None:
        blocks = ", ".join(f"{100 * v:.1f}" for v in rec["pwca_share"])
        lines.append(f"- PWCA share of the target's pooled-feature query's attention on the distractor (epoch "
                     f"{rec['epoch']}): mean "
                     f"{100 * rec[PWCA_SHARE]:.1f}%, per block {blocks} (%; a self-pair gives 50)")
    images = (last_with(log, "mechanism_images") or {}).get("mechanism_images")
    if lines and images:
        lines.append(f"- measured on the first {images} test images")
    return lines


def summary_markdown(logs: Sequence[RunLog], curves: str | None = None) -> str:
    """The Markdown summary (``curves``: the PNG's file name, embedded when given)."""
    lines = ["# Training report", ""]
    lines += _table([run_summary(log) for log in logs]) + [""]
    if curves:
        lines += [f"![training curves]({curves})", ""]
    lines += ["## Started from", ""]
    started = [describe_backbone(log.config.get("model") or {}) for log in logs]
    lines += [f"- {log.label}: {s}" if len(logs) > 1 else f"- {s}" for log, s in zip(logs, started, strict=True)]
    lines += [""]
    mechanism = [(log, mechanism_lines(log)) for log in logs]
    if any(m for _, m in mechanism):
        lines += ["## Mechanism (last evaluated epoch)", ""]
        for log, m in mechanism:
            if m:
                lines += ([f"{log.label}:", ""] if len(logs) > 1 else []) + m + [""]
    flats = [_flat(log.config) for log in logs]
    if len(logs) == 1:
        lines += ["## Config", "", *(f"- `{k}`: {_fmt(flats[0].get(k))}" for k in SUMMARY_KEYS if k in flats[0]),
                  "", f"Full config: `{logs[0].path / CONFIG}`."]
    else:
        keys = sorted(k for k in set().union(*flats) if k != "output_dir" and len({json.dumps(f.get(k), default=str)
                                                                                    for f in flats}) > 1)
        lines += ["## Config differences", ""]
        if keys:
            lines += _table([{"run": log.label, **{k: f.get(k) for k in keys}} for log, f in zip(logs, flats,
                                                                                              strict=True)])
        else:
            lines.append("The runs have the same config (apart from `output_dir`).")
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[str | Path], output_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``curves.png`` and ``report.md`` in ``output_dir`` (default: the run itself for one run, ``./report`` for
    several); returns their paths."""
    from dcal.checkpoint import atomic_write_text

    if not runs:
        raise ValueError("give at least one run directory")
    logs = read_runs(runs)
    out = Path(output_dir) if output_dir is not None else (Path(runs[0]) if len(runs) == 1 else Path("report"))
    png = plot_curves(logs, out / "curves.png")
    md = atomic_write_text(out / "report.md", summary_markdown(logs, png.name))
    return png, md
