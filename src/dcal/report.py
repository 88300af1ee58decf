"""``dcal report RUN [RUN ...]``: training curves (PNG) and a Markdown summary of one run or an overlay of several
(e.g. the variants of an ablation).

Reads what ``dcal train`` writes: ``metrics.jsonl`` (one record per epoch, then a ``final`` record) and
``config.yaml``. Curves: loss per branch (and the total), the learned loss weights, the learning rate, and top-1
per branch (FGVC) or mAP / rank-1 (Re-ID). The summary gives best and last epoch, training time and throughput,
and the config: the main keys of one run, or for several runs the keys in which they differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from dcal.config import read_yaml
from dcal.visualize import save_figure  # sets the Agg backend: files only, no display on servers

BRANCHES = ("sa", "glca", "pwca")
SCORES = {"fgvc": ("top1", "top1_sa", "top1_glca"), "reid": ("mAP", "rank1")}
BEST = {"fgvc": "top1", "reid": "mAP"}
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
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run} is not a dcal run: {metrics} does not exist")
    from dcal.engine import read_metrics  # the engine's reader: a cut last line dropped, other bad lines named

    records = read_metrics(metrics)
    config_path = run / "config.yaml"
    config = read_yaml(config_path.read_text(encoding="utf-8"), str(config_path)) if config_path.is_file() else {}
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


def _series(log: RunLog, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"] + 1, r[key]) for r in log.epochs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(logs: Sequence[RunLog], path: str | Path) -> Path:
    """Four panels (loss per branch, loss weights, lr, scores); one colour per run, one line style per series."""
    task = logs[0].task
    panels = [
        ("loss", ["loss", *(f"loss_{b}" for b in BRANCHES)]),
        ("learned loss weight", [f"weight_{b}" for b in BRANCHES]),
        ("learning rate", ["lr"]),
        ("test score (%)", list(SCORES[task])),
    ]
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for r, log in enumerate(logs):
            for s, key in enumerate(keys):
                x, y = _series(log, key)
                if x:
                    label = key if len(logs) == 1 else f"{log.label}: {key}"
                    ax.plot(x, y, styles[s % len(styles)], color=colors[r % len(colors)], marker="." if len(x) < 30
                            else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if ax.lines:
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
    metric = BEST[log.task]
    scored = [r for r in log.epochs if metric in r]
    best = max(scored, key=lambda r: r[metric]) if scored else None
    last = log.epochs[-1]
    rates = [r["images_per_s"] for r in log.epochs if "images_per_s" in r]
    return {
        "run": log.label, "epochs": f"{last['epoch'] + 1}/{_flat(log.config).get('train.epochs', '?')}",
        f"best {metric}": best[metric] if best else None, "best epoch": best["epoch"] + 1 if best else None,
        **{f"last {k}": last.get(k) for k in SCORES[log.task]},
        "last loss": last.get("loss"),
        "train time (min)": log.final["train_time_s"] / 60 if log.final and "train_time_s" in log.final else None,
        "images/s": sum(rates) / len(rates) if rates else None,
        "finished": log.final is not None,
    }


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
            *("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows)]


def summary_markdown(logs: Sequence[RunLog], curves: str | None = None) -> str:
    """The Markdown summary (``curves``: the PNG's file name, embedded when given)."""
    lines = ["# Training report", ""]
    lines += _table([run_summary(log) for log in logs]) + [""]
    if curves:
        lines += [f"![training curves]({curves})", ""]
    flats = [_flat(log.config) for log in logs]
    if len(logs) == 1:
        lines += ["## Config", "", *(f"- `{k}`: {_fmt(flats[0].get(k))}" for k in SUMMARY_KEYS if k in flats[0]),
                  "", f"Full config: `{logs[0].path / 'config.yaml'}`."]
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
