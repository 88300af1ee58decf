"""A run folder (``output_dir``): the names of its files and the one place that reads and writes them by name
(``config.yaml``, ``metrics.jsonl``, which files hold the model: :data:`RUN_CHECKPOINTS`), what counts
as a run in it, its owner lock, and which config keys a ``--resume`` may change.

One process owns a run folder while it trains: rank 0 holds an exclusive ``flock`` on ``.dcal.lock``, a file that
also says who holds it (PID, host, start time, command) for the message a second trainer gets. The kernel drops
a ``flock`` when its holder dies, however it dies, so a lock left behind by a killed run is seen as stale and taken
over (with a one-line warning). On filesystems without ``flock`` the file's PID is checked instead (a live PID on
this host, or any PID on another host, holds it).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time these load on first use: reading metrics or a config needs no torch
    from omegaconf import DictConfig

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LAST = "last.pth"
BEST = "best.pth"
LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
TENSORBOARD = "tensorboard"
LOCK = ".dcal.lock"
MADE_BY = ".dcal-folder.json"  # the marker: which dcal command made this folder, for what (see claim_folder)
TRAIN_LOG = "train.log"  # the log of a run that dcal ablation / dcal demo trained (stdout of fit)
EPOCH_CHECKPOINT = re.compile(r"epoch\d{4,}\.pth")
# what a training run writes; anything else (train.log of dcal ablation, a user's notes) is not a run
RUN_FILES = (CONFIG, METRICS, LAST, BEST, LAST_WEIGHTS, BEST_WEIGHTS, TENSORBOARD)
RUN_CHECKPOINTS = (BEST_WEIGHTS, BEST, LAST_WEIGHTS, LAST)  # what a run folder loads as its model, in preference
# keys a --resume may change: where things are, how long, how often it logs/evaluates/saves, on what it runs,
# how it is evaluated, and the knobs to get past a diverged step (clip_grad, amp, max_bad_steps) or memory and
# speed limits of another machine; every other key changes what is trained and must equal the saved one
RESUMABLE_KEYS = ("output_dir", "data.root", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
                  "train.save_every_steps", "train.workers", "train.device", "train.compile",
                  "train.grad_checkpointing", "train.deterministic", "train.clip_grad", "train.amp",
                  "train.max_bad_steps", "eval.*")
_ABSENT = object()
logger = logging.getLogger(__name__)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class NotOursError(FileExistsError):
    """A folder or file that dcal would replace or remove, but did not write itself (for this purpose)."""


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
    """Records of a run folder's :data:`METRICS` (``path``: the folder or the file; none if it does not exist).

    Records are appended one fsynced line at a time, so a kill can cut only the last line: an undecodable last
    line is dropped (resume rewrites the file without it). Any other line that is not a JSON record is damage
    and raises ``ValueError`` naming the file and line, rather than silently losing an epoch.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
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
    return out


def write_metrics(folder: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace the folder's :data:`METRICS` with ``records`` (atomically: a resume that drops lost work)."""
    from dcal.checkpoint import atomic_write_text, json_text

    atomic_write_text(Path(folder) / METRICS, "".join(json_text(r, indent=None) for r in records))


def append_metrics(folder: str | Path, record: dict[str, Any]) -> None:
    """One line of :data:`METRICS`, flushed to disk before returning (it survives a later kill)."""
    from dcal.checkpoint import json_text

    with open(Path(folder) / METRICS, "a", encoding="utf-8") as f:
        f.write(json_text(record, indent=None))
        f.flush()
        os.fsync(f.fileno())


def final_record(folder: str | Path) -> dict[str, Any] | None:
    """The run's ``final`` record (the last line of its :data:`METRICS`), or None while it is unfinished or absent."""
    records = read_metrics(folder)
    return records[-1] if records and records[-1].get("final") else None


def is_finished(folder: str | Path) -> bool:
    """A finished run: its final record and its :data:`LAST_WEIGHTS` are there (what a later run may build on)."""
    return final_record(folder) is not None and (Path(folder) / LAST_WEIGHTS).is_file()


def has_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a :data:`LAST` to resume from."""
    return (Path(folder) / LAST).is_file()


def last_checkpoint(folder: str | Path) -> Path:
    """The folder's :data:`LAST` (the file resume reads and every checkpoint of a run rewrites)."""
    return Path(folder) / LAST


def read_config_text(folder: str | Path) -> str | None:
    """The YAML text of the folder's :data:`CONFIG`, None when it has none."""
    path = Path(folder) / CONFIG
    return path.read_text(encoding="utf-8") if path.is_file() else None


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's :data:`CONFIG` as plain values (the strict YAML reader; errors name the file), None when
    it has none."""
    from dcal.config import read_yaml, upgrade_saved_config

    text = read_config_text(folder)
    source = str(Path(folder) / CONFIG)
    return None if text is None else upgrade_saved_config(read_yaml(text, source))


def write_config(folder: str | Path, config_yaml: str) -> None:
    """Write the run's resolved config as its :data:`CONFIG` (atomically)."""
    from dcal.checkpoint import atomic_write_text

    atomic_write_text(Path(folder) / CONFIG, config_yaml)


def nothing_saved(folder: str | Path) -> bool:
    """Whether ``folder`` holds no training to keep: no checkpoint, no weights, no metrics record (at most the
    ``config.yaml``, empty ``metrics.jsonl`` and ``tensorboard/`` of a run stopped before its first checkpoint)."""
    folder = Path(folder)
    metrics = folder / METRICS
    return not (any(n not in (CONFIG, METRICS, TENSORBOARD) for n in run_content(folder))
                or (metrics.is_file() and metrics.read_text(encoding="utf-8").strip()))


def discard_unsaved_start(folder: str | Path) -> list[str]:
    """Delete the files of a run that was killed before it saved anything (``config.yaml``, an empty
    ``metrics.jsonl``, ``tensorboard/``: nothing to resume or lose); returns their names, [] (and deletes
    nothing) when the folder holds a checkpoint, weights or a metrics record."""
    folder = Path(folder)
    if not nothing_saved(folder):
        return []
    found = run_content(folder)
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


def check_run_folder(folder: str | Path, cfg: DictConfig, resume: bool,
                     owned: bool = False) -> dict[str, Any] | None:
    """Whether ``cfg`` may train into ``folder`` (read-only). Returns the final record of a finished run that
    ``--resume`` has nothing to add to; raises :class:`RunLockedError` (another process trains there),
    :class:`RunExistsError` (a run without ``--resume``), ``FileNotFoundError`` (``--resume`` with no
    :data:`LAST`) or :class:`ResumeConfigError` (``--resume`` with keys that change what was trained).
    ``owned``: this process holds the folder's lock (else another one must not)."""
    from omegaconf import OmegaConf

    from dcal.checkpoint import load_training_state
    from dcal.config import default_config, read_yaml, upgrade_saved_config

    folder = Path(folder)
    if not owned:
        RunLock(folder).check()
    last = folder / LAST
    if not resume:
        found = run_content(folder)
        if found and last.exists():
            raise RunExistsError(f"{folder} already holds a run ({', '.join(found)}); pass --resume to continue "
                                 "it or train into another output_dir=")
        if found and nothing_saved(folder):
            raise RunExistsError(f"{folder} holds the start of a run stopped before its first checkpoint "
                                 f"({', '.join(found)}); pass --resume to start it again, or train into another "
                                 "output_dir=")
        if found:
            raise RunExistsError(f"{folder} already holds (the start of) a run ({', '.join(found)}) with no "
                                 f"{LAST} to resume from; train into another output_dir= or remove them")
        return None
    if not last.exists():
        if nothing_saved(folder):
            return None  # stopped before its first checkpoint (or never started): fit starts it
        raise FileNotFoundError(f"--resume: no checkpoint {last} to continue from, but {folder} holds "
                                f"{', '.join(run_content(folder))}: train into another output_dir=")
    source = str(folder / CONFIG)
    saved = read_config_text(folder)
    if saved is None:  # killed before config.yaml was written: the checkpoint carries the config too
        saved = load_training_state(last)["config"]
    changes = config_changes(upgrade_saved_config(read_yaml(saved, source)), OmegaConf.to_container(cfg),
                             OmegaConf.to_container(default_config()))
    if changes:
        raise ResumeConfigError(
            f"--resume: {folder} was trained with other values of keys that may not change on resume: "
            f"{'; '.join(changes)} (keep the saved values, or train into another output_dir=)"
        )
    final = final_record(folder)
    if final is None:
        return None
    done = final["epoch"]  # records number epochs from 1, as the console does: the final one is the count
    if done > cfg.train.epochs:
        raise ResumeConfigError(f"--resume: train.epochs={cfg.train.epochs} but {folder} has trained {done} "
                                f"epochs already (train.epochs may grow on resume, not shrink)")
    return final if done == cfg.train.epochs else None


def other_config_changes(folder: str | Path, new: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """:func:`config_changes` between the run in ``folder`` (its :data:`CONFIG`; [] when there is none) and
    ``new``, where only ``output_dir`` may differ: is it the same run (a moved or copied folder still is)? For reusing
    a finished run's numbers or weights as they are (an ablation's runs, a cached pretraining)."""
    saved = read_config(folder)
    return [] if saved is None else config_changes(saved, new, defaults, may_change=("output_dir",))


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


# ----------------------------------------------------------------------------------------------- ownership
# dcal removes or replaces a folder only when it made it: the command that creates a folder it may later remove
# writes MADE_BY in it at once, naming itself and the folder's role; removal checks that marker and then deletes
# only the names dcal writes in a run folder, so a user's file put there later survives.
_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root", "/run",
                "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var")


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """``path`` as a folder dcal may create runs in: refused (one line, ``ValueError``) when it is a file, or a
    system folder or the home folder itself (where a run's sub-folders would sit among the user's own)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder")
    resolved = path.expanduser().resolve()
    home = Path.home().resolve()
    if str(resolved) in _SYSTEM_DIRS or resolved == home:
        raise ValueError(f"{flag} {str(path)!r} is {'your home folder' if resolved == home else 'a system folder'} "
                         f"({resolved}): give a folder of its own, e.g. {flag} runs/demo")
    return path


def read_made_by(folder: str | Path) -> dict[str, Any] | None:
    """The folder's :data:`MADE_BY` marker as a dict, None when it has none (or an unreadable one)."""
    path = Path(folder) / MADE_BY
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 65536:
        return None
    try:
        mark = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return mark if isinstance(mark, dict) else None


def claim_folder(folder: str | Path, made_by: str, role: str) -> bool:
    """Create ``folder`` (parents too) and mark it as made by ``made_by`` (e.g. ``dcal demo``) for ``role``;
    returns whether it is now ours. A folder that already exists is marked only when it is empty (nothing of
    anyone's to lose); one that holds other files, or is a link, stays unmarked and is never removed by dcal."""
    from dcal.checkpoint import atomic_write_text

    folder = Path(folder)
    if folder.is_symlink():
        return False
    if folder.is_dir():
        mark = read_made_by(folder)
        if mark is not None:
            return mark.get("made_by") == made_by and mark.get("role") == role
        if any(p.name != LOCK for p in folder.iterdir()):
            return False
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MADE_BY, json.dumps({
        "made_by": made_by, "role": role,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv)}) + "\n")
    return True


def is_ours(folder: str | Path, made_by: str, role: str) -> bool:
    """Whether ``folder`` is a real folder (not a link) whose marker says ``made_by`` made it for ``role``."""
    folder = Path(folder)
    mark = None if folder.is_symlink() or not folder.is_dir() else read_made_by(folder)
    return mark is not None and mark.get("made_by") == made_by and mark.get("role") == role


def check_ours(folder: str | Path, made_by: str, role: str, what_to_do: str) -> None:
    """Raise :class:`NotOursError` (one line naming the folder) unless ``folder`` is absent or ours
    (:func:`is_ours`)."""
    folder = Path(folder)
    if (not folder.exists() and not folder.is_symlink()) or is_ours(folder, made_by, role):
        return
    if folder.is_symlink():
        why = "is a symbolic link"
    elif not folder.is_dir():
        why = "is a file"
    else:
        mark = read_made_by(folder)
        why = ("has no dcal marker (" + MADE_BY + "): dcal did not make it" if mark is None else
               f"was made by {mark.get('made_by')!r} as {mark.get('role')!r}, not by {made_by!r} as {role!r}")
    raise NotOursError(f"{folder} {why}, so {made_by} will not replace or remove it; {what_to_do}")


def remove_run_folder(folder: str | Path, made_by: str, role: str) -> list[str]:
    """Remove what dcal wrote in the run folder ``folder`` made by ``made_by`` for ``role`` (its run files, epoch
    checkpoints, train log, lock, temporaries and marker), then the folder if nothing else is left; returns the
    names of files kept because dcal did not write them. Raises :class:`NotOursError` for a folder that is not
    ours (:func:`check_ours`); never follows a link. A folder this process holds the :class:`RunLock` of keeps
    its lock and marker: it is emptied for the holder to train into again."""
    from dcal.checkpoint import TMP_SUFFIX

    folder = Path(folder)
    check_ours(folder, made_by, role, "remove it yourself if you mean to")
    if not folder.exists():
        return []
    held = os.path.realpath(folder / LOCK) in RunLock._held
    kept = []
    for p in folder.iterdir():
        ours = (p.name in (*RUN_FILES, TRAIN_LOG, LOCK) or EPOCH_CHECKPOINT.fullmatch(p.name)
                or (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)))
        if p.name == MADE_BY or (held and p.name == LOCK):
            continue
        if not ours:
            kept.append(p.name)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if not kept and not held:  # the marker goes last, with the folder; one with someone's files in it stays ours
        (folder / MADE_BY).unlink()
        folder.rmdir()
    return sorted(kept)


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
    """Exclusive ownership of a run folder (``with RunLock(folder): ...``); see the module docstring.

    A command that locks a folder before it inspects, repairs or removes anything in it (``dcal ablation``,
    ``dcal demo``) lends it to the code it calls (``with lock, lock.lend(): fit(...)``): inside that block, and
    only there (a context variable: not in another thread), taking the same lock again nests instead of being
    refused; the lock is dropped when the outer holder releases it."""

    _held: dict[str, int] = {}  # lock files this process holds -> how many holders (a process-wide lock table)
    _lent: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("dcal_lent_locks", default=frozenset())

    def __init__(self, folder: str | Path, user: str = "dcal run",
                 advice: str = "wait for it to end or train into another output_dir=") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.user, self.advice = user, advice  # the locked message: "in use by another <user> ...; <advice>"
        self._fd: int | None = None
        self._nested = False

    @property
    def _key(self) -> str:
        return os.path.realpath(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (creating the folder), or raise :class:`RunLockedError` naming the owner."""
        if self._key in RunLock._held and self._key in RunLock._lent.get():
            RunLock._held[self._key] += 1
            self._nested = True
            return
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
            logger.warning("warning: %s: taking over the stale lock of %s: that process is gone", self.path,
                           describe_owner(previous))
        data = _owner_text().encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        RunLock._held[self._key] = 1

    def check(self) -> None:
        """Raise :class:`RunLockedError` if another process holds the lock (takes nothing, writes nothing)."""
        if self._key in RunLock._held and self._key in RunLock._lent.get():
            return
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

    @contextlib.contextmanager
    def lend(self) -> Iterator[None]:
        """Inside this block the held lock may be taken again (nested) by the code this holder calls."""
        if self._fd is None and not self._nested:
            raise RuntimeError(f"{self.path}: lend() needs the lock to be held")
        token = RunLock._lent.set(RunLock._lent.get() | {self._key})
        try:
            yield
        finally:
            RunLock._lent.reset(token)

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
        return f"{self.folder} is in use by another {self.user}: {describe_owner(owner)}{gone}; {self.advice}"

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held; a nested holder only counts down)."""
        if self._nested:
            self._nested = False
            RunLock._held[self._key] -= 1
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        RunLock._held.pop(self._key, None)
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
