"""Run management: ``fit(cfg)``, the whole training run, single process or under torchrun.

Build data, model, loss, optimizer and schedule; then per epoch ``train_one_epoch`` → ``evaluate`` → log
(``metrics.jsonl``, TensorBoard if installed) → checkpoint (``last.pth``, ``best.pth``, ``best.safetensors``).
Everything that touches the disk or the other processes happens here, at the loop's edges:

* under torchrun (``RANK``/``WORLD_SIZE`` set) the process group is joined (NCCL on GPUs, gloo on the CPU), the
  model + loss module is wrapped in DDP, and only rank 0 writes logs, metrics and checkpoints;
* ``train.save_every_steps`` writes ``last.pth`` mid-epoch with the sampler position and the epoch's running
  counts (and one ``partial`` line in ``metrics.jsonl``); ``--resume`` continues from it, skipping the batches
  already trained on. With ``train.workers=0`` a resumed run equals an uninterrupted one; with workers the images
  and their order are the same but the augmentations drawn in the workers differ.
"""

from __future__ import annotations

import datetime
import json
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
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from dcal import distributed as dist
from dcal import run_folder
from dcal.checkpoint import (
    atomic_write_text,
    export_weights,
    load_model_state,
    load_training_state,
    remove_stale_temporaries,
    rng_state,
    save_training_state,
    set_rng_state,
)
from dcal.config import default_config, read_yaml, to_yaml, upgrade_saved_config
from dcal.engine.build import (
    TrainStep,
    build_criterion,
    build_datasets,
    build_model,
    build_optimizer,
    lr_factor,
    train_loader,
)
from dcal.engine.evaluation import evaluate
from dcal.engine.loop import EpochProgress, NonFiniteLossError, summarize, train_one_epoch
from dcal.model.dcal import compile_model
from dcal.run_folder import ResumeConfigError, RunExistsError, RunLock, read_metrics, run_content

BEST_METRIC = {"fgvc": "top1", "reid": "mAP"}
# the scores an epoch record carries, the one that picks the best checkpoint first
SCORE_KEYS = {"fgvc": ("top1", "top1_sa", "top1_glca"), "reid": ("mAP", "rank1", "mINP")}
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


def _log(msg: str) -> None:
    print(msg, flush=True)


def check_run_folder(out_dir: Path, cfg: DictConfig, resume: bool, owned: bool = False) -> dict[str, Any] | None:
    """Whether ``cfg`` may train into ``out_dir`` (read-only). Returns the final record of a finished run that
    ``--resume`` has nothing to add to; raises :class:`RunLockedError` (another process trains there),
    :class:`RunExistsError` (a run without ``--resume``), ``FileNotFoundError`` (``--resume`` with no
    ``last.pth``) or :class:`ResumeConfigError` (``--resume`` with keys that change what was trained).
    ``owned``: this process holds the folder's lock (else another one must not)."""
    if not owned:
        RunLock(out_dir).check()
    last_path = out_dir / run_folder.LAST
    if not resume:
        found = run_content(out_dir)
        if found and last_path.exists():
            raise RunExistsError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue "
                                 "it or train into another output_dir=")
        if found:
            raise RunExistsError(f"{out_dir} already holds (the start of) a run ({', '.join(found)}) with no "
                                 f"{run_folder.LAST} to resume from; train into another output_dir= or remove them")
        return None
    if not last_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {last_path} to continue from")
    saved_path = out_dir / run_folder.CONFIG
    saved = (saved_path.read_text(encoding="utf-8") if saved_path.is_file()
             else load_training_state(last_path)["config"])
    changes = run_folder.config_changes(upgrade_saved_config(read_yaml(saved, str(saved_path)), str(saved_path)),
                                        OmegaConf.to_container(cfg), OmegaConf.to_container(default_config()))
    if changes:
        raise ResumeConfigError(
            f"--resume: {out_dir} was trained with other values of keys that may not change on resume: "
            f"{'; '.join(changes)} (keep the saved values, or train into another output_dir=)"
        )
    final = run_folder.final_record(out_dir)
    if final is None:
        return None
    done = final["epoch"]  # records number epochs from 1, as the console does: the final one is the count
    if done > cfg.train.epochs:
        raise ResumeConfigError(f"--resume: train.epochs={cfg.train.epochs} but {out_dir} has trained {done} "
                                f"epochs already (train.epochs may grow on resume, not shrink)")
    return final if done == cfg.train.epochs else None


def fit(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    """Train (and evaluate every ``train.eval_every`` epochs) as ``cfg`` says; returns the final record.

    Under torchrun every process calls ``fit``; all return the same final record. Rank 0 owns ``output_dir``
    (:class:`dcal.run_folder.RunLock`) from before its first write to the end. SIGTERM/SIGINT stop the run after
    the current step with a checkpoint: :class:`TrainingInterrupted`. A config naming a pretraining recipe
    (``model.pretrain``) is first pointed at its pretrained run, trained once if needed (``dcal.pretrain``).
    """
    from dcal.pretrain import resolve_pretrain

    cfg = resolve_pretrain(cfg)
    info, device = dist.init(cfg.train.device)
    try:
        return _fit(cfg, resume or cfg.train.resume, info, device)
    finally:
        dist.shutdown()


def _fit(cfg: DictConfig, resume: bool, info: dist.DistInfo, device: torch.device) -> dict[str, Any]:
    out_dir = Path(cfg.output_dir)

    def finished(owned: bool) -> dict[str, Any] | None:
        final = dist.on_main(lambda: check_run_folder(out_dir, cfg, resume, owned))
        if final is not None and info.is_main:
            _log(f"{out_dir}: already finished ({final['epoch']} epochs); nothing to do")
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
        with _StopSignals() as stops:
            try:
                return _train(cfg, resume, info, device, sets, stops)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:  # a second signal, or a KeyboardInterrupt from elsewhere
                last = out_dir / run_folder.LAST
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
    main = info.is_main
    out_dir = Path(cfg.output_dir)
    last_path = out_dir / run_folder.LAST
    num_classes = cfg.data.num_classes or sets["train"].num_classes
    model = build_model(cfg, num_classes).to(device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    criterion = build_criterion(cfg, model).to(device)
    optimizer = build_optimizer(cfg, model, criterion)
    steps_per_epoch = len(train_loader(cfg, sets["train"], 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
    scaler = None
    if cfg.train.amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device (use train.amp=bf16 on the CPU)")
        scaler = torch.amp.GradScaler("cuda")

    start_epoch, best, best_epoch = 0, -math.inf, -1
    progress: EpochProgress | None = None
    metric_name = BEST_METRIC[cfg.task]
    records: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    metrics_path = out_dir / run_folder.METRICS
    if resume:
        state = load_training_state(last_path)
        load_model_state(model, state["model"], last_path)
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        best, best_epoch = state["best"], state["best_epoch"]
        start_epoch, progress = _resume_position(state, info)
        if start_epoch + (progress is not None) > cfg.train.epochs:
            raise ResumeConfigError(f"--resume: train.epochs={cfg.train.epochs} but {last_path} is in epoch "
                                    f"{start_epoch + 1} (train.epochs may grow on resume, not shrink)")
        record = state.get("record") or {}  # a run killed before its final record ends with this epoch's
        rngs = state.get("rng_per_rank") or [state["rng"]]
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        if main:
            records = _records_until(read_metrics(metrics_path), state)
            where = f" batch {progress.batches + 1} of" if progress else ""
            _log(f"resuming {out_dir} at{where} epoch {start_epoch + 1}/{cfg.train.epochs}")
    step = dist.wrap_ddp(TrainStep(compile_model(model) if cfg.train.compile else model, criterion, cfg, device),
                         info, device, sync_bn=cfg.train.sync_bn)
    writer = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        atomic_write_text(out_dir / run_folder.CONFIG, to_yaml(cfg))
        _write_jsonl(metrics_path, records)
        writer = _tensorboard(out_dir)
        _log(f"{cfg.task}: {len(sets['train'])} training images, {num_classes} classes; model {cfg.model.backbone} "
             f"branches {model.branches}; {steps_per_epoch} steps/epoch x {info.world_size} process(es) of batch "
             f"{cfg.train.batch_size} on {device}; writing to {out_dir}")

    def state_for(epoch: int, record: dict[str, Any], position: EpochProgress | None) -> dict[str, Any]:
        """The training state as of now (collective: every process must call it; only rank 0 writes it)."""
        from dcal.model import model_config

        return {
            "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "best": best, "best_epoch": best_epoch, "record": record,
            "config": to_yaml(cfg), "model_config": model_config(model),
            "rng_per_rank": dist.gather_objects(rng_state()), "world_size": info.world_size,
            "progress_per_rank": dist.gather_objects(position.as_dict()) if position is not None else None,
        }

    def interrupted(signum: int, where: str) -> TrainingInterrupted:
        return TrainingInterrupted(signum, f"interrupted by {signal.Signals(signum).name} {where}; saved "
                                           f"{last_path}: resume with --resume")

    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0"))
    t0 = time.perf_counter()
    total_steps = (cfg.train.epochs - start_epoch) * steps_per_epoch - (progress.batches if progress else 0)
    eta = _Eta(total_steps)
    try:
        for epoch in range(start_epoch, cfg.train.epochs):

            def on_step(p: EpochProgress, epoch: int = epoch) -> None:
                eta.tick()
                if main and not sys.stderr.isatty() and p.batches % cfg.train.log_every == 0:
                    rate = p.seen * info.world_size / max(p.elapsed, 1e-9)
                    _log(f"epoch {epoch + 1}/{cfg.train.epochs} step {p.batches}/{steps_per_epoch} loss "
                         f"{p.sums.get('loss', math.nan) / max(p.steps, 1):.4f} {rate:.1f} img/s eta {eta}")
                if step_delay:
                    time.sleep(step_delay)
                if p.batches >= steps_per_epoch:
                    return  # the epoch's own checkpoint follows (a signal now stops after it)
                every = cfg.train.save_every_steps
                saved = bool(every) and p.batches % every == 0
                if saved:
                    partial = {"epoch": epoch + 1, "step": p.batches, "partial": True, **summarize(p, device)}
                    state = state_for(epoch, partial, p)
                    if main:
                        save_training_state(last_path, **state)
                        _append_jsonl(metrics_path, partial)
                signum = stops.agreed(device)  # collective: once per step, on every process
                if not signum:
                    return
                if not saved:
                    # the same checkpoint as save_every_steps', but no metrics line: a resumed run's
                    # metrics.jsonl is the uninterrupted one's (the record only tells resume where it stands)
                    partial = {"epoch": epoch + 1, "step": p.batches, "partial": True, "interrupted": True,
                               **summarize(p, device)}
                    state = state_for(epoch, partial, p)
                    if main:
                        save_training_state(last_path, **state)
                raise interrupted(signum, f"at epoch {epoch + 1} step {p.batches}")

            loader = train_loader(cfg, sets["train"], epoch, start_batch=progress.batches if progress else 0)
            try:
                stats = train_one_epoch(model, criterion, loader, optimizer, scheduler, device, cfg, epoch, scaler,
                                        step=step, progress=progress, on_step=on_step, show_bar=main)
            except NonFiniteLossError as e:
                kept = f"the last good checkpoint is {last_path}" if last_path.exists() else "no checkpoint was written"
                raise NonFiniteLossError(f"{e} ({kept})") from None
            progress = None
            record = {"epoch": epoch + 1, **stats}  # 1-based in every file, as on the console
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                record.update(evaluate(model, sets, device, cfg))
            improved = metric_name in record and record[metric_name] > best
            if improved:
                best, best_epoch = record[metric_name], epoch
            # one training state per epoch, written to every file that wants it
            state = state_for(epoch, record, None)
            if main:
                if improved:
                    save_training_state(out_dir / run_folder.BEST, **state)
                    export_weights(out_dir / run_folder.BEST_WEIGHTS, model, to_yaml(cfg),
                                   {"classes": _classes(sets["train"]), "epoch": epoch + 1, metric_name: best})
                save_training_state(last_path, **state)
                if cfg.train.save_every and (epoch + 1) % cfg.train.save_every == 0:
                    save_training_state(out_dir / run_folder.epoch_checkpoint(epoch + 1), **state)
                _append_jsonl(metrics_path, record)
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                _log(_summary(record, cfg))
            signum = stops.agreed(device) if epoch + 1 < cfg.train.epochs else 0  # the last: just finish
            if signum:
                raise interrupted(signum, f"after epoch {epoch + 1}")
        final = {"final": True, "epoch": cfg.train.epochs, f"best_{metric_name}": best, "best_epoch": best_epoch + 1,
                 "train_time_s": time.perf_counter() - t0,
                 **{k: v for k, v in record.items() if k not in ("epoch", "step", "partial", "interrupted")}}
        if main:
            export_weights(out_dir / run_folder.LAST_WEIGHTS, model, to_yaml(cfg),
                           {"classes": _classes(sets["train"])})
            _append_jsonl(metrics_path, final)
            _log(f"done: best {metric_name} {best:.2f} at epoch {best_epoch + 1}; checkpoints in {out_dir}")
    finally:
        if writer is not None:
            writer.close()
    dist.barrier()
    return final


def _resume_position(state: dict[str, Any], info: dist.DistInfo) -> tuple[int, EpochProgress | None]:
    """(epoch to start, progress of that epoch when the checkpoint was written mid-epoch)."""
    per_rank = state.get("progress_per_rank")
    if not per_rank:
        return state["epoch"] + 1, None
    if len(per_rank) != info.world_size:
        raise ValueError(
            f"{run_folder.LAST} was written mid-epoch by {len(per_rank)} process(es) and this run has "
            f"{info.world_size}: "
            "resume with the same number of processes (the batches already seen are per-process shares)"
        )
    return state["epoch"], EpochProgress(**per_rank[info.rank])


def _position(record: dict[str, Any]) -> tuple[int, float]:
    """Order of a record in a run: (epoch, step within it; inf for the end-of-epoch record)."""
    return record["epoch"], record["step"] if record.get("partial") else math.inf


def _records_until(records: list[dict[str, Any]], state: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics records written up to the checkpoint ``state`` (later ones belong to lost work); the
    checkpoint's own record is added if the run died between writing the checkpoint and its line."""
    mine = state.get("record") or {}
    if mine and mine["epoch"] == state["epoch"]:  # a checkpoint of a dcal that numbered records from 0
        mine = {**mine, "epoch": mine["epoch"] + 1}
    end = _position(mine) if mine else (state["epoch"] + 1, math.inf)  # state["epoch"]: 0-based loop index
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


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line, flushed to disk before returning (it survives a later kill)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
