"""A run folder (``output_dir``): the names of its files, what counts as a run in it, its owner lock, and which
config keys a ``--resume`` may change.

One process owns a run folder while it trains: rank 0 holds an exclusive ``flock`` on ``.dcal.lock``, a file that
also says who holds it (PID, host, start time, command) for the message a second trainer gets. The kernel drops
a ``flock`` when its holder dies, however it dies, so a lock left behind by a killed run is seen as stale and taken
over (with a one-line warning). On filesystems without ``flock`` the file's PID is checked instead (a live PID on
this host, or any PID on another host, holds it).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LAST = "last.pth"
BEST = "best.pth"
LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
TENSORBOARD = "tensorboard"
LOCK = ".dcal.lock"
EPOCH_CHECKPOINT = re.compile(r"epoch\d{4,}\.pth")
# what a training run writes; anything else (train.log of dcal ablation, a user's notes) is not a run
RUN_FILES = (CONFIG, METRICS, LAST, BEST, LAST_WEIGHTS, BEST_WEIGHTS, TENSORBOARD)
# keys a --resume may change: where things are, how long, how often it logs/evaluates/saves, on what it runs,
# how it is evaluated, and the knobs to get past a diverged step (clip_grad, amp, max_bad_steps) or memory and
# speed limits of another machine; every other key changes what is trained and must equal the saved one
RESUMABLE_KEYS = ("output_dir", "data.root", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
                  "train.save_every_steps", "train.workers", "train.device", "train.resume", "train.compile",
                  "train.grad_checkpointing", "train.deterministic", "train.clip_grad", "train.amp",
                  "train.max_bad_steps", "eval.*")
_ABSENT = object()
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunExistsError(FileExistsError):
    """output_dir already holds a run and --resume was not given."""


class RunLockedError(FileExistsError):
    """Another process trains into this output_dir."""


class ResumeConfigError(ValueError):
    """--resume with a config that changes what was trained."""


def epoch_checkpoint(epoch: int) -> str:
    """Name of the ``train.save_every`` checkpoint after ``epoch`` epochs."""
    return f"epoch{epoch:04d}.pth"


def run_content(folder: str | Path) -> list[str]:
    """The names in ``folder`` that a training run wrote (sorted); [] for a missing, empty or unrelated folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in RUN_FILES or EPOCH_CHECKPOINT.fullmatch(p.name))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (none if it does not exist).

    Records are appended one fsynced line at a time, so a kill can cut only the last line: an undecodable last
    line is dropped (resume rewrites the file without it). Any other line that is not a JSON record is damage
    and raises ``ValueError`` naming the file and line, rather than silently losing an epoch.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == last:
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({e}); only the last line may be cut by a kill") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object (one record per line), got {type(record).__name__}")
        out.append(record)
    return _one_based(out)


def _one_based(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records numbered as now: epochs from 1, as the console shows them. A ``metrics.jsonl`` of a dcal that
    numbered them from 0 (it holds an epoch 0; today's never does) is renumbered on reading, so that an older run
    folder is reported, reused and resumed (resume rewrites the file) with the numbers its console showed."""
    if not any(r.get("epoch") == 0 for r in records):
        return records
    shift = ("epoch", "best_epoch")
    return [{**r, **{k: r[k] + 1 for k in shift if isinstance(r.get(k), int)}} for r in records]


def final_record(folder: str | Path) -> dict[str, Any] | None:
    """The run's ``final`` record (the last line of its :data:`METRICS`), or None while it is unfinished or absent."""
    records = read_metrics(Path(folder) / METRICS)
    return records[-1] if records and records[-1].get("final") else None


def discard_unsaved_start(folder: str | Path) -> list[str]:
    """Delete the files of a run that was killed before it saved anything (``config.yaml``, an empty
    ``metrics.jsonl``, ``tensorboard/``: nothing to resume or lose); returns their names, [] (and deletes
    nothing) when the folder holds a checkpoint, weights or a metrics record."""
    folder = Path(folder)
    found = run_content(folder)
    metrics = folder / METRICS
    if any(n not in (CONFIG, METRICS, TENSORBOARD) for n in found) or (metrics.is_file() and metrics.read_text(
            encoding="utf-8").strip()):
        return []
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def backbone_weights(path: str | Path) -> Path:
    """The file ``model.pretrained_file`` names: the file itself, or for a ``dcal train`` run folder its
    :data:`LAST_WEIGHTS` (the last epoch's weights, never a checkpoint selected on an evaluation split)."""
    path = Path(path)
    if path.is_dir():
        if not (path / LAST_WEIGHTS).is_file():
            raise FileNotFoundError(f"model.pretrained_file {str(path)!r} is a folder without {LAST_WEIGHTS}: not a "
                                    "finished dcal train run")
        return path / LAST_WEIGHTS
    return path


def config_changes(saved: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any],
                   may_change: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """``key: old -> new`` for every key outside ``may_change`` (default :data:`RESUMABLE_KEYS`; ``section.*``
    covers a section) whose value differs (nested dicts as dotted keys). A key the saved config lacks (added by a
    later dcal) is compared with its default."""
    a, b = {**_flatten(defaults), **_flatten(saved)}, _flatten(new)
    return [f"{key}: {_show(a.get(key, _ABSENT))} -> {_show(b.get(key, _ABSENT))}" for key in sorted(set(a) | set(b))
            if not _matches(key, may_change) and a.get(key, _ABSENT) != b.get(key, _ABSENT)]


def other_config_changes(folder: str | Path, new: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """:func:`config_changes` between the run in ``folder`` (its :data:`CONFIG`; [] when there is none) and
    ``new``, where only ``output_dir`` may differ: is it the same run (a moved or copied folder still is)? For reusing
    a finished run's numbers or weights as they are (an ablation's runs, a cached pretraining)."""
    from dcal.config import read_yaml

    saved = Path(folder) / CONFIG
    if not saved.is_file():
        return []
    return config_changes(read_yaml(saved.read_text(encoding="utf-8"), str(saved)), new, defaults,
                          may_change=("output_dir",))


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in patterns)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        # model.timm_kwargs is a free-form mapping: compared whole, like a value
        if isinstance(v, dict) and f"{prefix}{k}" != "model.timm_kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value) if isinstance(value, str) else json.dumps(value)


# ----------------------------------------------------------------------------------------------------- lock
def _owner_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": shlex.join(sys.argv)})


def _parse_owner(text: str) -> dict[str, Any]:
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive_here(owner: dict[str, Any]) -> bool | None:
    """Whether the owner's PID runs on this host; None when it is another host's (cannot tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True  # someone else's live process (or an unreadable PID): do not steal
    return True


def describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown process (the lock file is empty or being written)"
    return (f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('since', '?')} "
            f"({owner.get('command', '?')})")


class RunLock:
    """Exclusive ownership of a run folder (``with RunLock(folder): ...``); see the module docstring."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (creating the folder), or raise :class:`RunLockedError` naming the owner."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                previous = _parse_owner(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                held = self._try_flock(fd, previous)
                if held:
                    raise RunLockedError(self._locked_message(previous))
                # the holder may have removed the file between our open and our lock: lock the file on disk
                if not _same_file(fd, self.path):
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            break
        if previous:
            print(f"warning: {self.path}: taking over the stale lock of {describe_owner(previous)}: that process "
                  "is gone", file=sys.stderr, flush=True)
        data = _owner_text().encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def check(self) -> None:
        """Raise :class:`RunLockedError` if another process holds the lock (takes nothing, writes nothing)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            previous = _parse_owner(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            if self._try_flock(fd, previous):
                raise RunLockedError(self._locked_message(previous))
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _try_flock(self, fd: int, previous: dict[str, Any]) -> bool:
        """True when another process holds the lock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            return bool(previous) and _alive_here(previous) is not False  # no flock here: trust the PID
        return False

    def _locked_message(self, owner: dict[str, Any]) -> str:
        gone = (" (that PID has exited: its data-loading workers may hold the lock a few seconds more)"
                if owner and _alive_here(owner) is False else "")
        return (f"{self.folder} is in use by another dcal run: {describe_owner(owner)}{gone}; wait for it to end "
                f"or train into another output_dir=")

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
