"""Checkpoints: full training state (``last.pth``/``best.pth``) and weights-only ``.safetensors`` exports.

Writes are atomic (temporary file + rename), so an interrupted save never destroys the previous checkpoint.
Every file carries the resolved config, so ``dcal eval --checkpoint FILE`` can rebuild the model alone.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_VERSION = 1


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, **state: Any) -> None:
    """Save a training state dict (model, optimizer, scheduler, criterion, epoch, config, ...) + RNG states."""
    payload = {"version": CHECKPOINT_VERSION, "rng": rng_state(), **state}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {e}") from e
    missing = [k for k in ("model", "config") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is not a dcal training checkpoint: it lacks {missing}")
    return state


def export_weights(
    path: str | Path, model: torch.nn.Module, config_yaml: str, extra: dict[str, Any] | None = None
) -> None:
    """Weights only, as safetensors, with the run's config (and ``extra``, e.g. class names) in the metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(path, tensors, {"format": "dcal", "config": config_yaml, "extra": json.dumps(extra or {})})


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(state dict, config YAML, extra) of a file written by :func:`export_weights`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{str(path)!r} has no dcal config in its metadata (not written by dcal train)")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    return state, meta["config"], json.loads(meta.get("extra", "{}"))
