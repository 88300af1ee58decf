"""Run management: ``fit(cfg)``, the whole training run, single process or under torchrun.

Build data and the training state (:class:`dcal.engine.state.TrainState`: model, loss, optimizer, schedule,
where the run stands); then per epoch ``train_one_epoch`` → ``evaluate`` → checkpoint (``last.pth``, ``best.pth``,
``best.safetensors``) → log (``metrics.jsonl``, TensorBoard if installed). Everything that touches the disk or the
other processes happens here, at the loop's edges (:class:`_RunOutput`; the folder's files by
:mod:`dcal.run_folder`):

* under torchrun (``RANK``/``WORLD_SIZE`` set) the process group is joined (NCCL on GPUs, gloo on the CPU), the
  model + loss module is wrapped in DDP, and only rank 0 writes logs, metrics and checkpoints;
* ``train.save_every_steps`` writes ``last.pth`` mid-epoch with the sampler position and the epoch's running
  counts (and one ``partial`` line in ``metrics.jsonl``); ``--resume`` continues from it, skipping the batches
  already trained on. With ``train.workers=0`` a resumed run equals an uninterrupted one; with workers the images
  and their order are the same but the augmentations drawn in the workers differ.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from dcal import distributed as dist
from dcal import run_folder
from dcal.checkpoint import export_weights, remove_stale_temporaries
from dcal.config import ConfigError, to_yaml
from dcal.engine.build import ForwardLoss, build_datasets, train_loader
from dcal.engine.evaluation import evaluate
from dcal.engine.loop import EpochProgress, NonFiniteLossError, epoch_stats, train_one_epoch
from dcal.engine.state import TrainState
from dcal.model.dcal import compile_model
from dcal.model.finetune import trainable_summary
from dcal.model.pairs import pair_shortfall
from dcal.run_folder import ResumeConfigError, RunLock, check_run_folder, read_metrics
from dcal.vocabulary import BEST_METRIC, SCORE_KEYS

logger = logging.getLogger(__name__)
TIME_KEYS = ("images_per_s", "train_time_s")  # record values that depend on the machine, not on the run
# Test hook (tests/test_resume.py): seconds to sleep after each step, so that a test can SIGKILL a run mid-epoch.
STEP_DELAY_ENV = "DCAL_TEST_STEP_DELAY_S"


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGTERM/SIGINT; ``message`` says where and what was saved, ``exit_code`` is the shell's
    128 + signal number (143, 130)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopSignals:
    """SIGTERM (what schedulers send before killing) and SIGINT (Ctrl-C) ask the run to stop after the current
    optimizer step: the handler only records the signal; the run saves and stops at the next :meth:`agreed`.
    A second signal stops at once (KeyboardInterrupt). Handlers exist only in the main thread of the process
    that installed them (forked data-loading workers inherit them and ignore the signal: the run ends them)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal that stops every process now (0: go on). Collective: every process calls it at the same
        points, so that all stop after the same step (a signal may reach one process only)."""
        if not dist.env_world_size() > 1:
            return self.signum
        count, total = dist.all_reduce_sum([1.0 if self.signum else 0.0, float(self.signum)], device)
        return self.signum or (round(total / count) if count else 0)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    """Train (and evaluate every ``train.eval_every`` epochs) as ``cfg`` says; returns the final record.
    ``resume``: continue the run in ``output_dir`` (``dcal train --resume``), or start it where nothing was saved
    yet (a run killed before its first checkpoint is started again): the one place a run is resumed or restarted,
    which the pretraining stage and the ablation call too; without it a folder holding a run is refused.

    Under torchrun every process calls ``fit``; all return the same final record. Rank 0 owns ``output_dir``
    (:class:`dcal.run_folder.RunLock`) from before its first write to the end. SIGTERM/SIGINT stop the run after
    the current step with a checkpoint: :class:`TrainingInterrupted`. A config naming a pretraining recipe
    (``model.pretrain``) is refused: :func:`dcal.pretrain.train_stages` runs such a job.
    """
    if cfg.model.pretrain:
        raise ConfigError(f"model.pretrain={cfg.model.pretrain!r}: fit trains exactly the config it is given; a "
                          "pretraining stage is run by dcal.pretrain.train_stages (what `dcal train` calls)")
    info, device = dist.init(cfg.train.device)
    try:
        return _fit(cfg, resume, info, device)
    finally:
        dist.shutdown(info)


def _fit(cfg: DictConfig, resume: bool, info: dist.DistInfo, device: torch.device) -> dict[str, Any]:
    out_dir = Path(cfg.output_dir)

    def finished(owned: bool) -> dict[str, Any] | None:
        final = dist.on_main(lambda: check_run_folder(out_dir, cfg, resume, owned))
        if final is not None and info.is_main:
            logger.info(f"{out_dir}: already finished ({final['epoch']} epochs); nothing to do")
        return final

    final = finished(owned=False)  # fail (or finish) fast, before the data is read
    if final is not None:
        return final
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.train.seed + info.rank)  # DeiT: per-process seed (drop-path, pairs); DDP syncs weights
    sets = build_datasets(cfg)  # dataset layout errors surface before anything is written
    lock = RunLock(out_dir)
    dist.on_main(lock.acquire)  # rank 0 only; a refusal reaches every process
    try:
        final = finished(owned=True)  # again, now that no other process can write there
        if final is not None:
            return final
        if resume and not run_folder.has_checkpoint(out_dir):  # the one place a start with nothing saved is redone
            gone = dist.on_main(lambda: run_folder.discard_unsaved_start(out_dir))
            if info.is_main and gone:
                logger.info(f"{out_dir}: stopped before its first checkpoint; starting it again (removed "
                            f"{', '.join(gone)})")
            resume = False
        with _StopSignals() as stops:
            try:
                return _train(cfg, resume, info, device, sets, stops)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:  # a second signal, or a KeyboardInterrupt from elsewhere
                last = run_folder.last_checkpoint(out_dir)
                kept = (f"{last} holds the last checkpoint written: resume with --resume" if last.exists()
                        else "no checkpoint was written")
                name = signal.Signals(stops.signum or signal.SIGINT).name
                raise TrainingInterrupted(stops.signum or signal.SIGINT,
                                          f"interrupted by {name} at once, without saving; {kept}") from None
    finally:
        if info.is_main:
            lock.release()


def _train(cfg: DictConfig, resume: bool, info: dist.DistInfo, device: torch.device, sets: dict[str, Dataset],
           stops: _StopSignals) -> dict[str, Any]:
    """The training loop: per epoch train, evaluate when due, then :meth:`_RunOutput.end_epoch` (checkpoints,
    records, logs); every side effect and rank check sits in :class:`_RunOutput`."""
    steps_per_epoch = len(train_loader(cfg, sets["train"], 0))
    num_classes = cfg.data.num_classes or sets["train"].num_classes
    state = TrainState.from_config(cfg, num_classes, steps_per_epoch, device)
    if resume:
        state.load(run_folder.last_checkpoint(cfg.output_dir), info.rank, info.world_size)
        if state.start_epoch + (state.progress is not None) > cfg.train.epochs:
            raise ResumeConfigError(f"--resume: train.epochs={cfg.train.epochs} but {cfg.output_dir} stopped in "
                                    f"epoch {state.start_epoch + 1} (train.epochs may grow on resume, not shrink)")
    step = dist.wrap_ddp(ForwardLoss(compile_model(state.model) if cfg.train.compile else state.model, state.criterion,
                                   cfg, device), info, device, sync_bn=cfg.train.sync_bn)
    metric, t0, first_epoch = BEST_METRIC[cfg.task], time.perf_counter(), state.start_epoch
    with _RunOutput(cfg, info, device, state, stops, steps_per_epoch, sets["train"], resume) as out:
        for epoch in range(state.start_epoch, cfg.train.epochs):
            loader = train_loader(cfg, sets["train"], epoch, start_batch=state.start_batch)
            try:
                stats = train_one_epoch(state, loader, device, cfg, epoch, step=step, on_step=out.on_step,
                                        show_bar=info.is_main)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} ({out.kept()})") from None
            record = {"epoch": epoch + 1, **stats}  # 1-based in every file, as on the console
            if epoch == first_epoch and info.is_main and "pwca_same_class" in record:
                _warn_pair_shortfall(cfg, record["pwca_same_class"])
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                out.before_evaluation(state.progress)  # an evaluation that fails (memory) loses no training
                record.update(evaluate(state.model, sets, device, cfg))
            out.end_epoch(improved=state.end_epoch(record, metric))
        final = state.final_record(cfg.train.epochs, metric, time.perf_counter() - t0)
        out.finish(final)
    dist.barrier()
    return final


def _warn_pair_shortfall(cfg: DictConfig, same_class_share: float) -> None:
    message = pair_shortfall(cfg.model.pair_strategy, same_class_share, cfg.train.batch_size)
    if message:
        logger.warning("WARNING: %s", message)


class _RunOutput:
    """What a run does besides training, at the loop's edges: the run folder's files (rank 0 writes them;
    checkpoints are collective), log lines, TensorBoard, the ETA, mid-epoch checkpoints and the stop signals."""

    def __init__(self, cfg: DictConfig, info: dist.DistInfo, device: torch.device, state: TrainState,
                 stops: _StopSignals, steps_per_epoch: int, train_set: Dataset, resume: bool) -> None:
        self.cfg, self.device, self.state, self.stops = cfg, device, state, stops
        self.main, self.world_size, self.steps_per_epoch = info.is_main, info.world_size, steps_per_epoch
        self.folder = Path(cfg.output_dir)
        self.last = run_folder.last_checkpoint(self.folder)
        self.meta = {"config": to_yaml(cfg), "extra": {"classes": _classes(train_set)}}
        self.step_delay = float(os.environ.get(STEP_DELAY_ENV, "0"))
        self.eta = _Eta((cfg.train.epochs - state.start_epoch) * steps_per_epoch - state.start_batch)
        self.writer: Any = None
        if not self.main:
            return
        # what a resumed run keeps of the records: those up to its checkpoint
        records = _records_until(read_metrics(self.folder), state) if resume else []
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        run_folder.write_config(self.folder, self.meta["config"])
        run_folder.write_metrics(self.folder, records)
        self.writer = _tensorboard(self.folder)
        if resume:
            where = f" batch {state.progress.batches + 1} of" if state.progress else ""
            logger.info(f"resuming {self.folder} at{where} epoch {state.start_epoch + 1}/{cfg.train.epochs}")
        classes = cfg.data.num_classes or train_set.num_classes
        logger.info(f"{cfg.task}: {len(train_set)} training images, {classes} classes; model {cfg.model.backbone} "
                    f"branches {state.model.branches}; {steps_per_epoch} steps/epoch x {info.world_size} process(es) "
                    f"of batch {cfg.train.batch_size} on {device}; writing to {self.folder}")
        if cfg.model.freeze_blocks or cfg.model.lora.rank:
            logger.info(trainable_summary(state.model))
        if "test" in cfg.data.train_splits:
            logger.warning("WARNING: data.train_splits=%s trains on the test split: the test scores of this run are "
                           "NOT held out (fine for pretraining a backbone, not for reporting)",
                           list(cfg.data.train_splits))

    def __enter__(self) -> _RunOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()

    def kept(self) -> str:
        return f"the last good checkpoint is {self.last}" if self.last.exists() else "no checkpoint was written"

    def save(self, *paths: Path) -> None:
        """Checkpoint the state into ``paths`` (collective: every process calls it; rank 0 writes)."""
        self.state.save(paths if self.main else (), **self.meta)

    def on_step(self, p: EpochProgress) -> None:
        """After every batch, on every process: progress line, mid-epoch checkpoint, the stop signals."""
        cfg, epoch = self.cfg, self.state.epoch
        self.eta.tick()
        if self.main and not sys.stderr.isatty() and p.batches % cfg.train.log_every == 0:
            rate = p.seen * self.world_size / max(p.elapsed, 1e-9)
            logger.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {p.batches}/{self.steps_per_epoch} loss "
                        f"{p.sums.get('loss', math.nan) / max(p.steps, 1):.4f} {rate:.1f} img/s eta {self.eta}")
        if self.step_delay:
            time.sleep(self.step_delay)
        if p.batches >= self.steps_per_epoch:
            return  # the epoch's own checkpoint follows (a signal now stops after it)
        every = cfg.train.save_every_steps
        saved = bool(every) and p.batches % every == 0
        if saved:
            self._save_partial(p)
        signum = self.stops.agreed(self.device)  # collective: once per step, on every process
        if signum:
            if not saved:
                # the same checkpoint as save_every_steps', but no metrics line: a resumed run's
                # metrics.jsonl is the uninterrupted one's (the record only tells resume where it stands)
                self._save_partial(p, interrupted=True)
            raise self._interrupted(signum, f"at epoch {epoch + 1} step {p.batches}")

    def before_evaluation(self, p: EpochProgress) -> None:
        """Checkpoint the trained epoch before it is evaluated: a resume after a failed evaluation starts at the
        epoch's end and evaluates it (as save_every_steps' checkpoints, no metrics line is written for it)."""
        self._save_partial(p, interrupted=True)

    def _save_partial(self, p: EpochProgress, interrupted: bool = False) -> None:
        mark = {"interrupted": True} if interrupted else {}
        self.state.record = {"epoch": self.state.epoch + 1, "step": p.batches, "partial": True, **mark,
                             **epoch_stats(p, self.device)}
        self.save(self.last)
        if self.main and not interrupted:
            run_folder.append_metrics(self.folder, self.state.record)

    def end_epoch(self, improved: bool) -> None:
        """The epoch's files (best weights first: a later ``last.pth`` never passes over them), record and log
        line; then stop if a signal came."""
        cfg, state = self.cfg, self.state
        epoch, record, metric = state.epoch, state.record, BEST_METRIC[cfg.task]
        if self.main and improved:
            export_weights(self.folder / run_folder.BEST_WEIGHTS, state.model, self.meta["config"],
                           {**self.meta["extra"], "epoch": epoch + 1, metric: state.best})
        every = cfg.train.save_every
        self.save(*[self.folder / run_folder.BEST] * improved, self.last,
                  *[self.folder / run_folder.epoch_checkpoint(epoch + 1)] * bool(every and (epoch + 1) % every == 0))
        if self.main:
            run_folder.append_metrics(self.folder, record)
            if self.writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.writer.add_scalar(k, v, epoch + 1)
            logger.info(_summary(record, cfg))
        signum = self.stops.agreed(self.device) if epoch + 1 < cfg.train.epochs else 0  # the last: just finish
        if signum:
            raise self._interrupted(signum, f"after epoch {epoch + 1}")

    def finish(self, final: dict[str, Any]) -> None:
        if not self.main:
            return
        export_weights(self.folder / run_folder.LAST_WEIGHTS, self.state.model, self.meta["config"],
                       self.meta["extra"])
        run_folder.append_metrics(self.folder, final)
        metric = BEST_METRIC[self.cfg.task]
        logger.info(f"done: best {metric} {self.state.best:.2f} at epoch {self.state.best_epoch + 1}; checkpoints "
                    f"in {self.folder}")

    def _interrupted(self, signum: int, where: str) -> TrainingInterrupted:
        return TrainingInterrupted(signum, f"interrupted by {signal.Signals(signum).name} {where}; saved "
                                           f"{self.last}: resume with --resume")


def _position(record: dict[str, Any]) -> tuple[int, float]:
    """Order of a record in a run: (epoch, step within it; inf for the end-of-epoch record)."""
    return record["epoch"], record["step"] if record.get("partial") else math.inf


def _records_until(records: list[dict[str, Any]], state: TrainState) -> list[dict[str, Any]]:
    """The metrics records written up to the checkpoint ``state`` was restored from (later ones belong to lost
    work); the checkpoint's own record is added if the run died between writing the checkpoint and its line."""
    mine = state.record
    end = _position(mine) if mine else (state.epoch + 1, math.inf)  # state.epoch: the 0-based loop index
    kept = [r for r in records if _position(r) <= end]  # a finished run's final record stays: it is history
    if mine and not mine.get("interrupted") and all(_position(r) != end or r.get("final") for r in kept):
        kept.append(mine)
    return kept


class _Eta:
    """Remaining time of the run from the mean time per step so far (evaluation time excluded)."""

    def __init__(self, total_steps: int) -> None:
        self.total, self.done, self.start = total_steps, 0, time.perf_counter()

    def tick(self) -> None:
        self.done += 1

    def __str__(self) -> str:
        if not self.done:
            return "?"
        left = (time.perf_counter() - self.start) / self.done * max(self.total - self.done, 0)
        return str(datetime.timedelta(seconds=round(left)))


def _classes(dataset: Dataset) -> list[str] | int:
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else int(getattr(dataset, "num_classes", 0))


def _summary(record: dict[str, Any], cfg: DictConfig) -> str:
    scores = " ".join(f"{k} {record[k]:.2f}" for k in SCORE_KEYS[cfg.task] if k in record)
    bad = " ".join(f"{k} {record[k]}" for k in ("bad_images", "bad_steps") if record.get(k))
    return (f"epoch {record['epoch']}/{cfg.train.epochs} loss {record['loss']:.4f} lr {record['lr']:.3e} "
            f"{record['images_per_s']:.1f} img/s {scores} {bad}").rstrip()


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (pip install dcal[tensorboard])
        return None
    return SummaryWriter(str(out_dir / run_folder.TENSORBOARD))
