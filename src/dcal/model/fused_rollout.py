"""The rollout's compiled CPU kernels (``csrc/rollout_cpu.cpp``).

:func:`attention_mean` (inference): one SA block's attention output and its head-mean probabilities S_i (B, T, T)
from one QKᵀ per query chunk; the rollout then multiplies its row by the stored maps, so the scores are never
computed twice (the block output equals ``F.scaled_dot_product_attention``'s to float rounding).

:func:`left_multiply`, the fused rollout step r S_i (training, and inference where the maps are not used):
:meth:`dcal.model.rollout.QueryKey.left_multiply` runs it on the CPU when the forward's softmax normalisers are
known. It computes what the eager tiles compute, r S_i = mean_h Σ_t r_t exp(scale q_t·k_j − lse_t), with the
same GEMM (BLAS) and the same exp2 (SLEEF, as torch's ``exp2_``), but per chunk of query rows small enough to stay
in L2, with exp2 and the weighted row sum in one pass over the chunk and the (image, head, chunk) items spread
over the threads: no score tile goes to memory (``benchmarks/README.md`` has the measurements).

The library is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about 20 s on 2
cores, once: it is cached in torch's extension folder, ``TORCH_EXTENSIONS_DIR``), for x86-64 CPUs with AVX2 only.
Where it cannot be built or loaded, dcal says why once (a warning) and uses timm's fused attention with the eager
rollout tiles, which give the same result. ``DCAL_FUSED_ROLLOUT=0`` turns both kernels off;
``DCAL_FUSED_ROLLOUT=1`` makes a failed build an error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

ENV = "DCAL_FUSED_ROLLOUT"
SOURCE = Path(__file__).with_name("csrc") / "rollout_cpu.cpp"
# Query rows per GEMM, about: a chunk's scores stay inside one core's L2 (T = 785: 7 chunks of 113 rows, 358 KB);
# chosen against 64 and 256 with benchmarks/bench_rollout.py.
CHUNK_ROWS = 128

_lock = threading.Lock()  # one build at a time: threads starting together wait for the first


def _mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"{ENV} must be 0 (off), 1 (required) or auto, got {value!r}")
    return value


def _build() -> None:
    """Compile (or find in the cache) and load the library; raises with the reason when that is impossible."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise RuntimeError(f"the kernel needs an x86-64 CPU with AVX2, torch reports "
                           f"{torch.backends.cpu.get_cpu_capability()}")
    # cpp_extension logs a warning about CUDA_HOME on import in CUDA builds without a CUDA runtime: not ours to show
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        ext_log.setLevel(level)
    cpp_extension.verify_ninja_availability()
    folder = build_folder()
    name = folder.name
    if not any(folder.glob(f"{name}*.so")):
        print(f"dcal: building the fused CPU rollout kernel once (about 20 s; cached in {folder})", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    # build from a copy inside the cache folder: ninja rebuilds when a source's path changes, and every checkout
    # (a fresh clone in CI, another venv) would otherwise compile again; the copy changes only with the source
    source = folder / SOURCE.name
    text = SOURCE.read_text()
    if not source.is_file() or source.read_text() != text:
        partial = source.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(source)  # atomic: processes starting together never read half a file
    cpp_extension.load(name, [str(source)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False,
                       verbose=False)
    # shapes for torch.compile's tracing (fake tensors), so that the op stays inside a compiled graph
    torch.library.register_fake("dcal_rollout::left_multiply")(
        lambda q, k, lse, row, scale, chunk_rows: q.new_empty(q.shape[0], q.shape[2]))
    torch.library.register_fake("dcal_rollout::attention_mean")(
        lambda q, k, v, scale, chunk_rows, mean: q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        .permute(0, 2, 1, 3))


def build_folder() -> Path:
    """Where the library is built and cached: one folder per torch and Python version (a library built against
    other torch headers must not be reused) and per source (two checkouts of different versions never rebuild,
    or replace, each other's library), under ``TORCH_EXTENSIONS_DIR`` or torch's default extension root."""
    from torch.utils.cpp_extension import get_default_build_root

    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"torch{torch.__version__}_py{sys.version_info.major}{sys.version_info.minor}_{source}"
    name = "dcal_rollout_cpu_" + "".join(c if c.isalnum() else "_" for c in tag)
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


@functools.cache
def _load() -> str | None:
    """Build and load the library, once per process (a loaded library is process state): None when it is
    loaded, else the reason it is off."""
    mode = _mode()
    if mode == "0":
        return f"{ENV}=0"
    try:
        _build()
        return None
    except Exception as exc:  # no compiler, no ninja, no AVX2, a BLAS without sgemm_: the eager tiles serve
        why = f"{type(exc).__name__}: {exc}".strip()
        if mode == "1":
            raise RuntimeError(f"{ENV}=1 but the fused CPU rollout kernel could not be built: {why}") from exc
        warnings.warn(f"dcal: the fused CPU rollout kernel is unavailable ({why[:500]}); using the eager tiles "
                      f"(same result, slower at high resolution). {ENV}=0 silences this.", RuntimeWarning,
                      stacklevel=4)
        return why


def available() -> bool:
    """Whether the fused kernel is loaded (building it on the first call); see the module docstring."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """The reason the kernel is off, else None (building it on the first call)."""
    with _lock:
        return _load()


def chunk_rows(num_tokens: int, target: int = CHUNK_ROWS) -> int:
    """Query rows per GEMM: about ``target``, the T rows split into equal chunks (129 rows: 2 x 65, not 128 + 1)."""
    return math.ceil(num_tokens / math.ceil(num_tokens / target))


def left_multiply(q: Tensor, k: Tensor, lse: Tensor, row: Tensor, scale: float, rows: int | None = None) -> Tensor:
    """(B, T) mean_h Σ_t row_t exp(scale q_t·k − lse_t) for (B, H, T, d) ``q``, ``k`` (any strides with a unit
    stride along d), (B, H, T) ``lse`` and (B, T) ``row``, in float32; :func:`available` must be True."""
    q, k = (t.float() if t.stride(-1) == 1 else t.float().contiguous() for t in (q, k))
    rows = chunk_rows(q.shape[2]) if rows is None else rows
    return torch.ops.dcal_rollout.left_multiply(q, k, lse.float(), row.float(), float(scale), rows)


# Query rows per chunk of attention_mean, about: a chunk's score tile and its rows of the mean map (113 x 785 floats
# each at T = 785) stay in a core's L2; 128 measured a little faster than 32 or 64 (CPU time against the flash
# kernel, benchmarks/README.md).
ATTENTION_CHUNK_ROWS = 128


def attention_chunk_rows(num_tokens: int, batch: int, threads: int, target: int = ATTENTION_CHUNK_ROWS) -> int:
    """Query rows per chunk of :func:`attention_mean`: about ``target``, the T rows split evenly, and at small
    batches enough chunks that every thread gets the same number of (image, chunk) items."""
    chunks = math.ceil(num_tokens / target)
    if batch * chunks < 16 * threads:  # few items: a multiple of the threads (B = 1, T = 785: 13 -> 14 on 2)
        chunks = next((c for c in range(chunks, chunks + threads) if batch * c % threads == 0), chunks)
    return math.ceil(num_tokens / min(chunks, num_tokens))


def attention_mean(q: Tensor, k: Tensor, v: Tensor, scale: float, mean: Tensor,
                   rows: int | None = None) -> Tensor:
    """softmax(scale q kᵀ) v, (B, H, T, d), for float32 (B, H, T, d) ``q``, ``k``, ``v`` (any strides with a unit
    stride along d), writing the head-mean probabilities into ``mean`` (a contiguous float32 (B, T, T) tensor);
    :func:`available` must be True."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rows = attention_chunk_rows(q.shape[2], q.shape[0], torch.get_num_threads()) if rows is None else rows
    return torch.ops.dcal_rollout.attention_mean(q, k, v, float(scale), rows, mean)
