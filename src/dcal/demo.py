"""``dcal demo``: SA-only vs DCAL in the paper's regime (a pretrained backbone, fine-tuned), on the CPU, in minutes.

Two stages, both on sets generated in code (``dcal.data.fgvc.SyntheticFGVC``), one small ViT:

1. **Pretraining** (``<output_dir>/pretrain``, :func:`dcal.pretrain.ensure_pretrained`): the ViT is trained SA-only
   on the generic ``coarse`` task (object shape x background texture; no class mark), so it learns the scene's
   features and nothing about the marks. It is trained once and reused by later runs of the demo.
2. **Fine-tuning** (``<output_dir>/sa_only`` and ``<output_dir>/dcal``): both variants start from that same
   checkpoint (``model.pretrained_file=<output_dir>/pretrain``) and are fine-tuned with one recipe on the
   fine-grained ``mark`` set, where every class shares the global look (random background, a large object of
   random colour and pose, distractor squares) and differs only in the pattern of a small mark on the object:
   the situation GLCA's local queries are meant for. Only ``glca_blocks``/``pwca_blocks`` differ.

It prints both models' test accuracies, then the mechanism (:mod:`dcal.mechanism`): how many of the ⌈R·N⌉
patches the rollout and the last layer select lie on the mark, against chance, and the share of PWCA's attention
that goes to the distractor; and saves the attention pictures. Finished runs are reused (and said to be), so the
command can be run any number of times; ``fresh=True`` (``--fresh``) replaces the demo's own runs, and only them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from dcal.config import load_config
from dcal.pretrain import SA_ONLY
from dcal.run_folder import RunLock, RunLockedError, check_output_dir, claim_folder, has_checkpoint

logger = logging.getLogger(__name__)

# The demo's two stages are the packaged recipes, loaded by name (configs/demo_pretrain.yaml, configs/demo.yaml):
# a 6-block, 96-dim ViT with 8x8 patches (64 tokens at 64x64), the same for both stages.
PRETRAIN_RECIPE, FINETUNE_RECIPE = "demo_pretrain", "demo"
VARIANTS = ("sa_only", "dcal")
PICTURE, SUMMARY = "rollout.png", "summary.json"
DEMO_FILES = (PICTURE, SUMMARY)  # besides the runs: what --fresh removes
FRESH_HINT = "run `dcal demo --fresh` to replace the demo's runs (or choose another --output-dir)"


def demo_pretrain_config(output_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Stage 1's config: the recipe ``demo_pretrain`` (the demo ViT, SA-only, on the ``coarse`` task), writing to
    ``output_dir/pretrain``."""
    return load_config(PRETRAIN_RECIPE, [*overrides, *SA_ONLY, f"output_dir={Path(output_dir) / 'pretrain'}"])


def demo_config(output_dir: str | Path, variant: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Stage 2's config of ``variant`` (``sa_only`` or ``dcal``): fine-tuning ``output_dir/pretrain`` on the
    ``mark`` task, writing to ``output_dir/variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"demo variant must be one of {VARIANTS}, got {variant!r}")
    blocks = list(SA_ONLY) if variant == "sa_only" else []
    return load_config(FINETUNE_RECIPE, [*overrides, *blocks, "model.pretrain=null",
                                         f"model.pretrained_file={Path(output_dir) / 'pretrain'}",
                                         f"output_dir={Path(output_dir) / variant}"])


MADE_BY = "dcal demo"
STAGES = ("pretrain", *VARIANTS)  # the demo's run folders in --output-dir, each marked as the demo's (its role)
NOT_OURS_HINT = "move it away or choose another --output-dir"


def _demo_file_is_ours(path: Path) -> bool:
    """The demo's picture (a PNG dcal saved) or summary (JSON naming the demo as its writer)."""
    from dcal.visualize import is_dcal_picture

    if path.is_symlink() or not path.is_file():
        return False
    if path.name == PICTURE:
        return is_dcal_picture(path)
    try:
        return path.stat().st_size < 1 << 20 and json.loads(path.read_text(encoding="utf-8")).get(
            "written_by") == MADE_BY
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def check_demo_folder(output_dir: str | Path) -> None:
    """Everything the demo would write or replace in ``output_dir`` is absent or the demo's own: its run folders
    carry the demo's marker (:func:`dcal.run_folder.claim_folder`), its picture and summary are the demo's.
    Raises :class:`dcal.run_folder.NotOursError` naming the first that is not, before anything is written."""
    from dcal.run_folder import NotOursError, check_ours

    output_dir = Path(output_dir)
    for stage in STAGES:
        check_ours(output_dir / stage, MADE_BY, stage, NOT_OURS_HINT)
    for name in DEMO_FILES:
        path = output_dir / name
        if (path.exists() or path.is_symlink()) and not _demo_file_is_ours(path):
            raise NotOursError(f"{path} was not written by {MADE_BY}, so it will not be replaced; {NOT_OURS_HINT}")


def remove_demo_runs(output_dir: str | Path) -> list[Path]:
    """Delete the demo's own runs and files under ``output_dir`` (checked to be the demo's: nothing else there);
    returns what it removed. Files a user put into a run folder are kept, with that folder."""
    from dcal.run_folder import remove_run_folder

    output_dir = Path(output_dir)
    check_demo_folder(output_dir)
    removed = []
    for stage in STAGES:
        if (output_dir / stage).is_dir():
            remove_run_folder(output_dir / stage, MADE_BY, stage)
            removed.append(output_dir / stage)
    for name in DEMO_FILES:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()
            removed.append(output_dir / name)
    return removed


def mechanism_line(sa: dict[str, Any], dc: dict[str, Any]) -> str:
    """One line: the mark hits of the rollout and last-layer selections (SA-only / DCAL) against chance, and
    DCAL's PWCA share on the distractor (from the runs' final records)."""
    parts = []
    if "mark_hit_rollout" in sa and "mark_hit_rollout" in dc:
        parts.append(f"mark hit of the top-R patches, SA only / DCAL: rollout {sa['mark_hit_rollout']:.1f} / "
                     f"{dc['mark_hit_rollout']:.1f} %, last layer {sa['mark_hit_last_layer']:.1f} / "
                     f"{dc['mark_hit_last_layer']:.1f} %, chance {dc['mark_hit_chance']:.1f} %")
    if "pwca_share_mean" in dc:
        parts.append(f"DCAL's PWCA share on the distractor {100 * dc['pwca_share_mean']:.1f} % "
                     f"(mean of {len(dc['pwca_share'])} blocks)")
    where = f"first {dc['mechanism_images']} test images" if "mechanism_images" in dc else "test images"
    return f"mechanism ({where}): " + "; ".join(parts) if parts else ""


def fine_tune(cfg: Any) -> dict[str, Any]:
    """Train the run ``cfg`` into its ``output_dir``, or, when a run is there, continue it (``fit`` with resume:
    a finished run is reused as it is, an interrupted one resumed, one of another config refused); returns its
    final record."""
    from dcal.engine import fit
    from dcal.run_folder import ResumeConfigError

    folder = Path(cfg.output_dir)
    if not has_checkpoint(folder):
        return fit(cfg)
    logger.info(f"{folder} holds a run: reusing it if finished, resuming it if not")
    try:
        return fit(cfg, resume=True)
    except ResumeConfigError as e:
        raise ResumeConfigError(f"{e}; {FRESH_HINT}") from None


def run_demo(output_dir: str | Path = "runs/demo", overrides: list[str] | tuple[str, ...] = (),
             num_images: int = 6, fresh: bool = False) -> dict[str, Any]:
    """Pretrain (or reuse) the backbone, fine-tune (or reuse) SA-only and DCAL from it, print their test
    accuracies and mechanism numbers side by side, save the attention pictures (the rollout of both, and DCAL's
    GLCA local-query and PWCA attention). ``overrides`` apply to both stages; ``fresh`` first removes the demo's
    own runs (only folders and files the demo wrote: see :func:`check_demo_folder`)."""
    output_dir = check_output_dir(output_dir)
    check_demo_folder(output_dir)  # before anything is written, locked or trained
    pre = demo_pretrain_config(output_dir, overrides)
    cfgs = {variant: demo_config(output_dir, variant, overrides) for variant in VARIANTS}
    for stage in STAGES:  # a busy folder stops the demo before it creates or locks anything
        RunLock(output_dir / stage).check()
    with contextlib.ExitStack() as held:
        for stage in STAGES:  # every folder the demo may touch is locked before it is read, repaired or removed
            lock = held.enter_context(RunLock(output_dir / stage))
            held.enter_context(lock.lend())
        for stage in STAGES:
            claim_folder(output_dir / stage, MADE_BY, stage)
        check_demo_folder(output_dir)  # again, under the locks
        if fresh:
            removed = remove_demo_runs(output_dir)
            logger.info(f"--fresh: removed {', '.join(str(p) for p in removed)}" if removed else
                        f"--fresh: no demo runs in {output_dir} yet")
        return _run_stages(output_dir, pre, cfgs, num_images)


def _run_stages(output_dir: Path, pre: Any, cfgs: dict[str, Any], num_images: int) -> dict[str, Any]:
    from dcal.checkpoint import atomic_write_text, json_text
    from dcal.data.transforms import config_mean_std
    from dcal.engine import build_datasets
    from dcal.loading import load_model
    from dcal.pretrain import ensure_pretrained, pretrain_state
    from dcal.run_folder import remove_run_folder
    from dcal.visualize import save_attention_picture

    t0 = time.perf_counter()
    logger.info("\n=== stage 1: pretraining the ViT SA-only on the generic coarse task (shape x texture, no marks) ===")
    try:
        if pretrain_state(pre) != "finished":
            # fine-tuning runs of an earlier backbone (the demo's own, checked above) would be reused: they go
            stale = [output_dir / v for v in VARIANTS if has_checkpoint(output_dir / v)]
            for folder in stale:
                remove_run_folder(folder, MADE_BY, folder.name)
            if stale:
                logger.info("a new backbone: removed the fine-tuning runs of the old one (%s)",
                            ", ".join(map(str, stale)))
        ensure_pretrained(pre)
    except FileExistsError as e:  # a pretraining run of another config, in the demo's own folder
        if isinstance(e, RunLockedError):
            raise
        raise FileExistsError(f"{e}; {FRESH_HINT}") from None
    results = {}
    for variant in VARIANTS:
        cfg = cfgs[variant]
        logger.info(f"\n=== stage 2, {variant}: fine-tuning {cfg.model.pretrained_file} on the mark task, "
                    f"{cfg.model.glca_blocks} GLCA block(s), {cfg.model.pwca_blocks} PWCA block(s) ===")
        results[variant] = fine_tune(cfg)
    sa, dc = results["sa_only"], results["dcal"]
    lines = [
        "",
        f"{'test top-1 (%)':<28}{'SA only':>10}{'DCAL':>10}",
        f"{'prediction (SA [+ GLCA])':<28}{sa['top1']:>10.2f}{dc['top1']:>10.2f}",
        f"{'SA branch':<28}{sa['top1_sa']:>10.2f}{dc['top1_sa']:>10.2f}",
        f"{'GLCA branch':<28}{'-':>10}{dc['top1_glca']:>10.2f}",
        f"{'fine-tuning time (s)':<28}{sa['train_time_s']:>10.0f}{dc['train_time_s']:>10.0f}",
        mechanism_line(sa, dc),
    ]
    logger.info("\n".join(lines))

    cfg = cfgs["dcal"]
    test = build_datasets(cfg, train=False)["test"]
    batch = torch.stack([test[i][0] for i in range(num_images)])
    truths = [test.classes[test.targets[i]] for i in range(num_images)]
    # SA-only's rollout, then DCAL's: rollout + selected queries, GLCA's local-query attention (Fig. 3a), PWCA's
    # attention of the target's pooled-feature query on the target and on the distractor, with its share (Fig. 3b)
    models = {"SA only": load_model(run=output_dir / "sa_only", device="cpu").model,
              "DCAL": load_model(run=output_dir / "dcal", device="cpu").model}
    picture = save_attention_picture(output_dir / PICTURE, models, batch, *config_mean_std(cfg), truths,
                                     test.classes, truths)
    summary = {"written_by": MADE_BY, "sa_only": sa, "dcal": dc, "pretrained": str(output_dir / "pretrain"),
               "picture": str(picture)}
    atomic_write_text(output_dir / SUMMARY, json_text(summary))
    logger.info(f"\nattention rollout picture: {picture}\nsummary: {output_dir / SUMMARY}\n"
                f"demo time: {time.perf_counter() - t0:.0f} s")
    return summary
