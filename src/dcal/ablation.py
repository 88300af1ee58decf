"""``dcal ablation``: the paper's ablations as one command, over several seeds.

A *set* is a list of variants, each a name and the config keys it sets on top of the recipe and the user's
``key=value`` overrides (so a variant always wins over a conflicting override and sets every key it needs: no
GLCA means ``eval.fusion=sa`` without the user saying so). Sets:

* ``table3``: SA only, +GLCA, +PWCA, DCAL (the paper's Table 3 rows);
* ``selection``: how GLCA's local queries are chosen: rollout, random, last layer only, and ``glca_pool=cls``
  (the class-token reading of GLCA, under which the selection has no effect: docs/design.md, GLCA);
* ``pairs``: the PWCA distractor (Table 4): random, intra-class, inter-class, 1:1 mix, Gaussian noise;
* ``blocks``: the number of GLCA blocks M and PWCA blocks T (Fig. 2).

Each variant is trained with ``dcal.engine.fit`` for every seed into ``OUT/<variant>/seed<k>/``; several sets
can share one folder (``--set table3,selection``) and a variant whose keys equal an earlier one's reuses its
runs (``selection``'s rollout is ``table3``'s DCAL). A finished run (its ``metrics.jsonl`` has the final record)
is reused when the command runs again and a started one is resumed, so an interrupted ablation continues. The
summary gives the **last** epoch's metric (mean ± std over seeds), the best epoch's for reference (selected on
the evaluation split, so optimistic), the training time per run and the difference to the first row of the
variant's set (its *reference*: SA only, rollout, random, M=1 T=L) with that difference's standard error, written
to ``ablation.md``, ``ablation.json`` and ``ablation.png`` in ``OUT``. ``--max-seeds`` then gives the rows within
two standard errors of their reference (and those references) more seeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dcal.config import ConfigError, default_config, load_config, to_yaml
from dcal.run_folder import (
    CONFIG,
    METRICS,
    TRAIN_LOG,
    RunLock,
    check_ours,
    check_output_dir,
    claim_folder,
    final_record,
    has_checkpoint,
    other_config_changes,
    read_config_text,
    read_made_by,
    read_metrics,
)
from dcal.vocabulary import SCORE_KEYS

logger = logging.getLogger(__name__)
NO_GLCA = {"model.glca_blocks": 0, "eval.fusion": "sa"}


def _table3(depth: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("SA only", {**NO_GLCA, "model.pwca_blocks": 0}),
        ("+GLCA", {"model.glca_blocks": 1, "model.pwca_blocks": 0}),
        ("+PWCA", {**NO_GLCA, "model.pwca_blocks": depth}),
        ("DCAL", {"model.glca_blocks": 1, "model.pwca_blocks": depth}),
    ]


def _selection(depth: int) -> list[tuple[str, dict[str, Any]]]:
    full = {"model.glca_blocks": 1, "model.pwca_blocks": depth, "model.glca_pool": "mean"}
    return [
        ("rollout", {**full, "model.query_selection": "rollout"}),
        ("random", {**full, "model.query_selection": "random"}),
        ("last layer", {**full, "model.query_selection": "last_layer"}),
        ("glca_pool=cls", {**full, "model.query_selection": "rollout", "model.glca_pool": "cls"}),
    ]


def _pairs(depth: int) -> list[tuple[str, dict[str, Any]]]:
    full = {"model.glca_blocks": 1, "model.pwca_blocks": depth}
    names = {"random": "random", "intra": "intra-class", "inter": "inter-class", "mix": "1:1 mix", "noise": "noise"}
    return [(label, {**full, "model.pair_strategy": key}) for key, label in names.items()]


def _blocks(depth: int) -> list[tuple[str, dict[str, Any]]]:
    rows = [(f"M=1, T={depth}", {"model.glca_blocks": 1, "model.pwca_blocks": depth})]
    rows += [(f"M={m}, T={depth}", {"model.glca_blocks": m, "model.pwca_blocks": depth}) for m in (2, 3)]
    for t in sorted({max(1, depth // 2), 1}, reverse=True):
        if t != depth:
            rows.append((f"M=1, T={t}", {"model.glca_blocks": 1, "model.pwca_blocks": t}))
    return rows


SETS: dict[str, Callable[[int], list[tuple[str, dict[str, Any]]]]] = {
    "table3": _table3,
    "selection": _selection,
    "pairs": _pairs,
    "blocks": _blocks,
}


@dataclass
class Variant:
    name: str
    keys: dict[str, Any]
    slug: str
    reference: str = ""  # the row its difference is taken to: the first variant of its set
    runs: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- planning
def backbone_depth(cfg: Any) -> int:
    """L, the number of SA blocks of the recipe's backbone (``timm_kwargs.depth`` or the timm default)."""
    depth = cfg.model.timm_kwargs.get("depth")
    if isinstance(depth, int):
        return depth
    import timm

    return len(timm.create_model(cfg.model.backbone, pretrained=False, num_classes=0).blocks)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("+", "plus_")).strip("_").lower()


def plan(set_names: list[str], depth: int, only: list[str] | None = None) -> list[Variant]:
    """The variants of the named sets in order (names made unique), each with its set's first variant as its
    reference; ``only``: just these, by name or folder name (e.g. ``["SA only", "dcal"]``), in the sets' order
    (a variant whose reference is left out is compared with the first one kept)."""
    unknown = [s for s in set_names if s not in SETS]
    if unknown or not set_names:
        raise ValueError(f"unknown ablation set(s) {unknown or set_names}; choose from {', '.join(SETS)}")
    variants: list[Variant] = []
    for set_name in set_names:
        reference = ""
        for name, keys in SETS[set_name](depth):
            if any(v.name == name for v in variants):
                name = f"{name} ({set_name})"
            reference = reference or name
            variants.append(Variant(name, keys, _slug(name), reference))
    if only:
        missing = [o for o in only if not any(o in (v.name, v.slug) for v in variants)]
        if missing:
            raise ValueError(f"variant(s) {missing} not in the set(s) {', '.join(set_names)}: choose from "
                             f"{', '.join(repr(v.name) for v in variants)}")
        variants = [v for v in variants if v.name in only or v.slug in only]
        for v in variants:
            if not any(r.name == v.reference for r in variants):
                v.reference = variants[0].name
    return variants


def check_no_output_dir(overrides: list[str] | tuple[str, ...]) -> None:
    """``output_dir=`` would send every variant and seed into one folder: the ablation's folder is ``--output-dir``."""
    if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        raise ConfigError("dcal ablation: output_dir=... is not used (each run goes to <ablation folder>/<variant>/"
                          "seed<k>): give the ablation folder with --output-dir")


def _overrides(keys: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in keys.items()]


# -------------------------------------------------------------------------------------------------- running
def _epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if not r.get("final") and not r.get("partial")]


def _check_same_config(run_dir: Path, cfg: Any) -> None:
    """Refuse a run directory trained with another config; where it lies (``output_dir``) does not count, so a
    moved or copied ablation folder is reused (:func:`dcal.run_folder.other_config_changes`)."""
    diff = other_config_changes(run_dir, OmegaConf.to_container(cfg), OmegaConf.to_container(default_config()))
    if diff:
        raise FileExistsError(
            f"{run_dir} holds a run with another config than this ablation asks for ({'; '.join(diff[:6])}"
            f"{' ...' if len(diff) > 6 else ''}); remove it or write the ablation to another --output-dir"
        )


MADE_BY = "dcal ablation"


def check_run_dir(run_dir: Path) -> None:
    """A run folder of this ablation is absent, one that ``dcal ablation`` made (it may repair and reuse it), or an
    unmarked one that holds a dcal run (written before folders were marked; reused only if its config is the
    variant's, :func:`_check_same_config`)."""
    if not run_dir.is_symlink() and run_dir.is_dir() and read_made_by(run_dir) is None and read_config_text(run_dir):
        return
    check_ours(run_dir, MADE_BY, "run", "move it away or write the ablation to another --output-dir")


def run_one(cfg: Any, run_dir: Path) -> tuple[dict[str, Any], str]:
    """Train (or reuse, or resume) one run; its own log goes to ``run_dir/train.log``. The run folder is locked
    before it is read or repaired, so a second ablation on a busy folder changes nothing."""
    from dcal.engine import fit

    check_run_dir(run_dir)
    lock = RunLock(run_dir)
    with lock, lock.lend():
        claim_folder(run_dir, MADE_BY, "run")
        check_run_dir(run_dir)
        final = final_record(run_dir)
        _check_same_config(run_dir, cfg)
        if final is not None:
            return final, "reused"
        resume = has_checkpoint(run_dir)
        with open(run_dir / TRAIN_LOG, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            final = fit(cfg, resume=True)  # resumes a started run; a start that saved nothing is redone
    return final, "resumed" if resume else "trained"


def run_result(final: dict[str, Any], run_dir: Path, task: str, seed: int) -> dict[str, Any]:
    """The numbers of one finished run: last epoch's metrics, best epoch's, time."""
    keys = SCORE_KEYS[task]
    main = keys[0]
    evaluated = [r for r in _epoch_records(run_dir) if main in r]
    last_epoch = final["epoch"]
    last = next((r for r in evaluated if r["epoch"] == last_epoch), None)
    if last is None:
        raise ValueError(f"{run_dir / METRICS}: no {main} recorded for the last epoch ({last_epoch})")
    best = max(evaluated, key=lambda r: r[main])
    return {
        "seed": seed, "run_dir": str(run_dir), "epochs": last_epoch, "curve": run_curve(run_dir, task),
        "last": {k: last[k] for k in keys if k in last},
        "mechanism": {k: last[k] for k in MECHANISM_KEYS if k in last},
        "best": {k: best[k] for k in keys if k in best}, "best_epoch": best["epoch"],
        "train_time_s": final.get("train_time_s", math.nan),
    }


CURVE_KEYS = ("train_top1", "loss", "pwca_share_mean", "pwca_same_class", "weight_sa", "weight_glca", "weight_pwca")


def run_curve(run_dir: Path, task: str) -> list[dict[str, Any]]:
    """Every epoch record of a run reduced to what the curves show: the evaluated scores (where evaluated), the
    training top-1 and loss, PWCA's distractor share and the loss weights."""
    keys = (*SCORE_KEYS[task], *CURVE_KEYS)
    return [{"epoch": r["epoch"], **{k: r[k] for k in keys if k in r}} for r in _epoch_records(run_dir)]


def _pretrained(cfg: Any) -> Path:
    """Train (once) the ablation's pretraining config ``cfg`` (:func:`dcal.pretrain.pretrain_config`, writing to
    ``pretrain/<recipe stem>`` beside the ablation folder, so sibling ablations naming the same recipe share it);
    its log goes to its train.log."""
    from dcal.pretrain import ensure_pretrained

    folder = Path(cfg.output_dir)
    t0 = time.perf_counter()
    lock = RunLock(folder)
    with lock, lock.lend():
        with open(folder / TRAIN_LOG, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), \
                contextlib.redirect_stderr(f):
            ensure_pretrained(cfg)
    logger.info(f"pretrained backbone: {folder} ({time.perf_counter() - t0:.0f}s; log in {folder / TRAIN_LOG})")
    return folder


def run_ablation(
    config: str | Path,
    sets: list[str],
    seeds: int = 3,
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | Path | None = None,
    pretrain: str | Path | None = None,
    only: list[str] | None = None,
    max_seeds: int | None = None,
) -> dict[str, Any]:
    """Train every variant of ``sets`` (or those named in ``only``) on the recipe ``config`` for ``seeds`` seeds;
    write and return the summary.

    ``max_seeds``: then give every row within two standard errors of its reference (:func:`close_rows`), and that
    reference, seeds up to ``max_seeds`` (an evidence protocol's "3 seeds, 5 where two variants are closer than
    2 SE", decided once, at ``seeds`` seeds); the rows then differ in their number of seeds.

    With a pretraining recipe (``pretrain``, or ``model.pretrain`` in the recipe) every variant and seed
    fine-tunes from one SA-only backbone trained once into ``pretrain/<recipe stem>`` beside ``OUT``
    (``dcal.pretrain``)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    max_seeds = max_seeds or seeds
    if max_seeds < seeds:
        raise ValueError(f"max_seeds ({max_seeds}) must be at least seeds ({seeds})")
    check_no_output_dir(overrides)
    base = load_config(config, overrides)  # bad recipes and overrides fail here, before anything is written
    variants = plan(sets, backbone_depth(base), only)
    out = check_output_dir(output_dir or Path("runs") / f"ablation_{'_'.join(sets)}_{Path(config).stem}")
    pretrain = pretrain or base.model.pretrain
    pre_cfg = None
    if pretrain:  # named now, trained after every stage of the job has been checked
        from dcal.pretrain import cache_folder, pretrain_config

        pre_cfg = pretrain_config(pretrain, cache_folder(pretrain, out.parent))
        overrides = [*overrides, "model.pretrain=null", f"model.pretrained_file={pre_cfg.output_dir}"]
        base = load_config(config, overrides)
    base_seed = base.train.seed
    cfgs, slug_of = {}, {}
    for v in variants:  # every config is checked before the first run starts
        try:
            cfg = load_config(config, [*overrides, *_overrides(v.keys), "output_dir=."])
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from None
        key = to_yaml(cfg)  # the same config is trained once (e.g. rollout = DCAL), also across commands sharing OUT
        if key not in slug_of:
            slug_of[key] = _twin(out, v.slug, cfg, base_seed)
        v.slug = slug_of[key]
        for k in range(max_seeds):  # the seeds --max-seeds may add are loaded (checked as configs) now too
            cfgs[v.slug, k] = load_config(config, [*overrides, *_overrides(v.keys), f"train.seed={base_seed + k}",
                                                   f"output_dir={out / v.slug / f'seed{base_seed + k}'}"])
    _check_folders([c for (_, k), c in cfgs.items() if k < seeds])
    _check_data(base)
    if pre_cfg is not None:
        from dcal.pretrain import check_backbones_match, pretrain_state

        check_backbones_match(base, pre_cfg)
        pretrain_state(pre_cfg)  # a folder holding another config's pretraining is refused now
        _check_data(pre_cfg)
        _pretrained(pre_cfg)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    n = [0, len({s for s, _ in cfgs}) * seeds]  # runs done, runs planned

    def train(todo: list[Variant], ks: range) -> None:
        for v in todo:
            for k in ks:
                seed = base_seed + k
                if (v.slug, k) not in done:
                    n[0] += 1
                    cfg = cfgs[v.slug, k]
                    t0 = time.perf_counter()
                    final, how = run_one(cfg, Path(cfg.output_dir))
                    done[v.slug, k] = run_result(final, Path(cfg.output_dir), base.task, seed)
                    logger.info(f"[{n[0]}/{n[1]}] {v.name} seed {seed}: {_one_line(done[v.slug, k], base.task)} "
                                f"({how}, {time.perf_counter() - t0:.0f}s)")
                v.runs.append(done[v.slug, k])

    train(variants, range(seeds))
    summary = summarize(variants, base.task)
    extended: list[str] = []
    if max_seeds > seeds:
        by_name = {v.name: v for v in variants}
        close = {name for r, _ in close_rows(summary) for name in (r, by_name[r].reference)}
        slugs = {by_name[name].slug for name in close}  # a row sharing another's runs (rollout = DCAL) gets them too
        more = [v for v in variants if v.slug in slugs]
        extended = [v.name for v in more]
        n[1] += len(slugs) * (max_seeds - seeds)
        if more:
            logger.info(f"within two standard errors of their reference at {seeds} seeds: {', '.join(extended)}; "
                        f"{max_seeds} seeds for them (--max-seeds)")
        # only the folders the extra seeds use: one of a seed no row needs (busy, say) stops nothing
        _check_folders([cfgs[slug, k] for slug in sorted(slugs) for k in range(seeds, max_seeds)])
        train(more, range(seeds, max_seeds))
        summary = summarize(variants, base.task)
    from dcal.pretrain import describe_backbone

    command = shlex.join(["dcal", "ablation", *sys.argv[2:]]) if sys.argv[1:2] == ["ablation"] else ""
    summary.update({"backbone": describe_backbone(OmegaConf.to_container(base.model)),
                    "recipe": str(config), "overrides": list(overrides), "sets": sets, "seeds": seeds,
                    "max_seeds": max_seeds, "extended": extended, "command": command})
    write_outputs(summary, out)
    logger.info(f"ablation: {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}"
                f"{', ' + str(out / 'ablation_curves.png') if (out / 'ablation_curves.png').is_file() else ''}")
    return summary


def _twin(out: Path, slug: str, cfg: Any, seed: int) -> str:
    """The folder of ``out`` whose ``seed<seed>`` run has exactly ``cfg`` (``output_dir`` aside): ``slug`` when its
    own does, else another one, so a variant that an earlier command trained under another name (``--set pairs``
    after ``--set table3``: random is DCAL) reuses those runs instead of training them again. ``slug`` when none
    has (a ``slug`` folder holding another config is then refused by the checks that follow)."""
    if not out.is_dir():
        return slug
    new, defaults = OmegaConf.to_container(cfg), OmegaConf.to_container(default_config())

    def same(folder: Path) -> bool:  # a busy or unreadable run is no twin (the checks that follow report the slug's)
        run = folder / f"seed{seed}"
        if not (run / CONFIG).is_file():
            return False
        try:
            RunLock(run).check()  # locks before it reads: a run being written is not read
            return not other_config_changes(run, new, defaults)
        except (OSError, ValueError):
            return False

    if same(out / slug):
        return slug
    return next((f.name for f in sorted(out.iterdir()) if f.name != slug and f.is_dir() and same(f)), slug)


def _check_folders(cfgs: list[Any]) -> None:
    """A busy run folder, one not ours, or another config's run: refused before any of ``cfgs`` trains."""
    for c in cfgs:
        RunLock(Path(c.output_dir)).check()
        check_run_dir(Path(c.output_dir))
        _check_same_config(Path(c.output_dir), c)


def _check_data(cfg: Any) -> None:
    """The config's data sets can be read (layout, roots, class ranges), before anything trains."""
    from dcal.engine import build_datasets

    build_datasets(cfg)


def _one_line(run: dict[str, Any], task: str) -> str:
    last = run["last"]
    if task == "fgvc":
        return f"top-1 {last.get('top1', math.nan):.2f} (last epoch)"
    return f"mAP {last.get('mAP', math.nan):.2f} rank-1 {last.get('rank1', math.nan):.2f} (last epoch)"


# ------------------------------------------------------------------------------------------------- summary
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1))


def difference_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of the difference of the means of ``a`` and ``b`` (Welch: sqrt(s_a²/n_a + s_b²/n_b), sample
    std); None under two values in either, or where both are constant (no spread to measure against)."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(mean_std(a)[1] ** 2 / len(a) + mean_std(b)[1] ** 2 / len(b))
    return se or None


def _delta_cell(row: dict[str, Any], m: str) -> str:
    delta, se = row[f"delta_{m}"], row[f"delta_se_{m}"]
    return f"{delta:+.2f} ({abs(delta) / se:.1f} SE)" if se else f"{delta:+.2f}"


def summarize(variants: list[Variant], task: str) -> dict[str, Any]:
    metrics = ["top1"] if task == "fgvc" else ["mAP", "rank1"]
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, "keys": v.keys, "runs": v.runs}
        for m in metrics:
            row[f"last_{m}"] = mean_std([r["last"][m] for r in v.runs])
            row[f"best_{m}"] = mean_std([r["best"][m] for r in v.runs])
        row["train_time_s"] = mean_std([r["train_time_s"] for r in v.runs])
        for k, (_, scale) in MECHANISM_COLUMNS.items():
            values = [r.get("mechanism", {}).get(k) for r in v.runs]
            row[k] = mean_std([scale * x for x in values]) if None not in values else None
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    for v, row in zip(variants, rows, strict=True):
        ref = by_name.get(v.reference, rows[0])
        row["reference"] = ref["variant"]
        for m in metrics:
            row[f"delta_{m}"] = row[f"last_{m}"][0] - ref[f"last_{m}"][0]
            row[f"delta_se_{m}"] = None if ref is row else difference_se(
                [r["last"][m] for r in v.runs], [r["last"][m] for r in ref["runs"]])
    return {"task": task, "metrics": metrics, "rows": rows}


def close_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(row, metric) where the row's difference to its reference is under two of its standard errors: not told
    apart by their seeds."""
    return [(r["variant"], m) for r in summary["rows"] for m in summary["metrics"]
            if r[f"delta_se_{m}"] and abs(r[f"delta_{m}"]) < 2 * r[f"delta_se_{m}"]]


def _seeds_label(rows: list[dict[str, Any]]) -> str:
    """"3 seeds", or each row's count where they differ (``--max-seeds``)."""
    counts = {len(r["runs"]) for r in rows}
    if len(counts) == 1:
        return f"{counts.pop()} seed(s)"
    return "seeds " + ", ".join(f"{r['variant']} {len(r['runs'])}" for r in rows)


LABEL = {"top1": "top-1", "mAP": "mAP", "rank1": "rank-1"}
# the last epoch's mechanism numbers (dcal.mechanism) and learned loss weights kept per run; the first ones are
# table columns (label, scale to %) where every run of a row has them
MECHANISM_KEYS = ("pwca_share_mean", "mark_hit_rollout", "mark_hit_last_layer", "mark_hit_chance", "pwca_share",
                  "pwca_same_class", "weight_sa", "weight_glca", "weight_pwca")
MECHANISM_COLUMNS = {"pwca_share_mean": ("PWCA share on the distractor (%)", 100.0),
                     "pwca_same_class": ("same-class PWCA pairs (%)", 1.0),
                     "mark_hit_rollout": ("mark hit, rollout (%)", 1.0)}


def format_markdown(summary: dict[str, Any]) -> str:
    metrics, rows = summary["metrics"], summary["rows"]
    uniform = len({len(r["runs"]) for r in rows}) == 1
    head = ["variant"] + ([] if uniform else ["seeds"]) + [f"{LABEL[m]} last epoch" for m in metrics]
    head += [f"Δ {LABEL[m]}" for m in metrics]
    mech = [k for k in MECHANISM_COLUMNS if any(r.get(k) for r in rows)]
    head += [f"{LABEL[m]} best epoch*" for m in metrics] + [MECHANISM_COLUMNS[k][0] for k in mech]
    head += ["time / run", "keys"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 2) + " --- |"]
    for r in rows:
        cells = [r["variant"]] + ([] if uniform else [str(len(r["runs"]))])
        cells += [f"{r[f'last_{m}'][0]:.2f} ± {r[f'last_{m}'][1]:.2f}" for m in metrics]
        cells += [_delta_cell(r, m) for m in metrics]
        cells += [f"{r[f'best_{m}'][0]:.2f} ± {r[f'best_{m}'][1]:.2f}" for m in metrics]
        cells += [f"{r[k][0]:.1f} ± {r[k][1]:.1f}" if r.get(k) else "-" for k in mech]
        cells += [f"{r['train_time_s'][0]:.0f} s", ", ".join(f"{k}={v}" for k, v in r["keys"].items())]
        lines.append("| " + " | ".join(cells) + " |")
    references = list(dict.fromkeys(r["reference"] for r in rows))
    close = [r + (f" ({LABEL[m]})" if len(metrics) > 1 else "") for r, m in close_rows(summary)]
    seeds = f"{len(rows[0]['runs'])} seeds" if uniform else "their seeds"
    notes = [
        "",
        f"Mean ± sample std over {seeds if uniform else 'the seeds of each row (column seeds)'}; Δ = difference of "
        f"the last-epoch means to the first row of the variant's set ({', '.join(references)}), in brackets in "
        "standard errors of that difference (Welch: "
        "sqrt(s₁²/n₁ + s₂²/n₂)).",
        *([f"Within two standard errors of their reference at {summary['seeds']} seeds, so given "
           f"{summary['max_seeds']} (--max-seeds): {', '.join(summary['extended'])}."]
          if summary.get("extended") else []),
        *([f"Within two standard errors of their reference, not told apart by {seeds}: "
           f"{', '.join(close)}."] if close else []),
        *([f"Backbone: {summary['backbone']}."] if summary.get("backbone") else []),
        "*Best epoch = the epoch with the highest metric on the evaluation split, i.e. selected on it: optimistic, "
        "for reference only; the last epoch is the number to compare.",
        *(["PWCA share: of the attention of the target's pooled-feature query (its class token, or the patch mean "
           "where there is none), the part on the distractor's tokens, mean over the pair-wise blocks, on the first "
           "test images (dcal.mechanism; a self-pair gives 50)."] if "pwca_share_mean" in mech else []),
        *(["Same-class PWCA pairs: of the last epoch's training images, those whose distractor was of their own class "
           "(what model.pair_strategy got from the batches: an image with no partner of the requested kind in its "
           "batch keeps a random one)."] if "pwca_same_class" in mech else []),
    ]
    if summary.get("command"):
        notes.append(f"Command: `{summary['command']}`")
    return "\n".join(lines + notes) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """One panel per metric: a bar at each variant's mean (last epoch), its seeds as points over it."""
    from dcal.visualize import new_figure, save_figure

    metrics, rows = summary["metrics"], summary["rows"]
    fig, axes = new_figure(len(metrics), 1, figsize=(max(4.0, 1.3 * len(rows)), 3.6 * len(metrics)))
    for ax, m in zip(axes[:, 0], metrics, strict=True):
        means = [r[f"last_{m}"][0] for r in rows]
        ax.bar(range(len(rows)), means, color="#9ecae1", edgecolor="#3182bd")
        for i, r in enumerate(rows):
            values = [run["last"][m] for run in r["runs"]]
            offsets = [(j - (len(values) - 1) / 2) * 0.12 for j in range(len(values))]
            ax.scatter([i + o for o in offsets], values, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20, ha="right")
        ax.set_ylabel(f"{LABEL[m]} (%), last epoch")
        lo = min(run["last"][m] for r in rows for run in r["runs"])
        hi = max(run["last"][m] for r in rows for run in r["runs"])
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"dcal ablation: {', '.join(summary.get('sets', []))} ({_seeds_label(rows)})")
    return save_figure(fig, path, dpi=110)


def _band(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs where every run has ``key``, the mean over runs there and the sample std (0 for one run)."""
    per_run = [{p["epoch"]: p[key] for p in r.get("curve", []) if p.get(key) is not None} for r in runs]
    epochs = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
    stats = [mean_std([c[e] for c in per_run]) for e in epochs]
    return epochs, [m for m, _ in stats], [sd for _, sd in stats]


def plot_curves(summary: dict[str, Any], path: Path) -> Path | None:
    """Test score over epochs per variant (mean over seeds, band = ± one sample std, every seed as a thin line),
    the training top-1 beside it, and PWCA's distractor share where a variant has one; None when no run has a curve
    of 2+ points."""
    from dcal.visualize import new_figure, save_figure

    main, rows = summary["metrics"][0], summary["rows"]
    if not any(len(_band(r["runs"], main)[0]) > 1 for r in rows):
        return None
    panels = [(main, f"test {LABEL[main]} (%)"), ("train_top1", "train top-1 (%), SA branch")]
    if any(_band(r["runs"], "pwca_share_mean")[0] for r in rows):
        panels.append(("pwca_share_mean", "PWCA share on the distractor (%)"))
    fig, axes = new_figure(1, len(panels), figsize=(5.0 * len(panels), 4.0))
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        scale = 100.0 if key == "pwca_share_mean" else 1.0
        for r, color in zip(rows, colors, strict=True):
            epochs, mean, sd = _band(r["runs"], key)
            if not epochs:
                continue
            m, s = [scale * x for x in mean], [scale * x for x in sd]
            ax.plot(epochs, m, color=color, label=r["variant"], lw=1.6)
            for run in r["runs"]:  # every seed's own curve, thin: a collapsed seed shows as itself
                points = [(p["epoch"], scale * p[key]) for p in run.get("curve", []) if p.get(key) is not None]
                ax.plot([e for e, _ in points], [v for _, v in points], color=color, lw=0.6, alpha=0.45)
            if len(r["runs"]) > 1:
                ax.fill_between(epochs, [a - b for a, b in zip(m, s, strict=True)],
                                [a + b for a, b in zip(m, s, strict=True)], color=color, alpha=0.18)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"dcal ablation: {', '.join(summary.get('sets', []))}, mean over {_seeds_label(rows)}"
                 f"{' ± one std' if max(len(r['runs']) for r in rows) > 1 else ''}; the reported number is the "
                 "last epoch's")
    return save_figure(fig, path, dpi=110)


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    from dcal.checkpoint import atomic_write_text, json_text

    atomic_write_text(out / "ablation.md", format_markdown(summary))
    atomic_write_text(out / "ablation.json", json_text(summary, default=_json_default))
    plot(summary, out / "ablation.png")
    plot_curves(summary, out / "ablation_curves.png")


def _json_default(o: Any) -> Any:
    if isinstance(o, Variant):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
