"""The fused CPU rollout kernel (csrc/rollout_cpu.cpp) against explicit full-matrix references, its errors, and
the fallback to the eager tiles where it cannot be built."""

from __future__ import annotations

import functools
import shutil
import warnings

import pytest
import torch

from dcal.model import fused_rollout
from dcal.model.rollout import QueryKey


def _toolchain_missing() -> str | None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (the kernel needs AVX2)"
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    return f"no {' or '.join(missing)} on PATH" if missing else None


def _kernel() -> None:
    """Skip where the kernel cannot exist; where compiler, ninja and AVX2 are present it must build."""
    reason = _toolchain_missing()
    if reason:
        pytest.skip(f"the fused rollout kernel cannot be built here: {reason}")
    assert fused_rollout.available(), fused_rollout.why_unavailable()


def _problem(b: int, h: int, t: int, d: int, scale: float = 0.35, layout: str = "timm"):
    """q, k in timm's qkv layout (strided views) or contiguous, their normalisers, a row and the reference r S."""
    if layout == "timm":
        q, k, _ = (torch.randn(b, t, 3, h, d) * 1.5).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k = torch.randn(b, h, t, d) * 1.5, torch.randn(b, h, t, d)
    scores = scale * q @ k.transpose(-2, -1)
    row = torch.rand(b, t)
    want = torch.bmm(row.unsqueeze(1), scores.softmax(-1).mean(1)).squeeze(1)
    return q, k, torch.logsumexp(scores, dim=-1), row, want


def test_builds_where_a_compiler_exists():
    """Built from a copy of the source in the cache folder, so that another checkout (a fresh clone) reuses it."""
    _kernel()
    assert fused_rollout.why_unavailable() is None
    assert hasattr(torch.ops.dcal_rollout, "left_multiply")
    folder = fused_rollout.build_folder()
    assert (folder / fused_rollout.SOURCE.name).read_text() == fused_rollout.SOURCE.read_text()
    assert any(folder.glob(f"{folder.name}*.so"))


@pytest.mark.parametrize(("b", "h", "t", "d"), [(1, 1, 1, 8), (1, 3, 7, 8), (2, 3, 50, 8), (3, 2, 129, 64),
                                                (2, 3, 197, 64)])
@pytest.mark.parametrize("rows", [1, 5, 64, None, 1000])
def test_equals_row_times_explicit_map(b, h, t, d, rows):
    """Any shape (T not a multiple of 8: padded lanes are discarded), any chunking, strided views of one qkv."""
    _kernel()
    q, k, lse, row, want = _problem(b, h, t, d)
    assert q.stride(2) == 3 * h * d  # rows of the interleaved qkv projection, never copied
    got = fused_rollout.left_multiply(q, k, lse, row, 0.35, rows)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_equals_the_eager_tiles_at_fgvc_resolution():
    """T = 785 (DeiT at 448), batch 2: the fused kernel and the eager per-problem tiles give the same r S."""
    _kernel()
    q, k, lse, row, want = _problem(2, 3, 785, 64, scale=64**-0.5)
    qk = QueryKey(q, k, lse, 64**-0.5)
    fused, eager = qk.left_multiply(row), qk.left_multiply(row, fused=False)
    torch.testing.assert_close(fused, want, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fused, eager, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_and_repeatable(threads):
    """The items are split into parts by the thread count; each count gives the reference, twice the same bits."""
    _kernel()
    q, k, lse, row, want = _problem(2, 3, 97, 16, layout="contiguous")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = fused_rollout.left_multiply(q, k, lse, row, 0.35)
        assert torch.equal(first, fused_rollout.left_multiply(q, k, lse, row, 0.35))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(first, want, atol=1e-6, rtol=1e-5)


def test_strided_rows_normalisers_and_features():
    """A non-contiguous row and lse are read through their strides; q, k without unit stride along d are copied."""
    _kernel()
    q, k, lse, row, want = _problem(2, 2, 30, 8, layout="contiguous")
    wide_row = torch.zeros(2, 60)
    wide_row[:, ::2] = row
    wide_lse = torch.zeros(2, 2, 60)
    wide_lse[..., ::2] = lse
    q_t, k_t = q.transpose(-1, -2).contiguous().transpose(-1, -2), k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_t.stride(-1) != 1
    got = fused_rollout.left_multiply(q_t, k_t, wide_lse[..., ::2], wide_row[:, ::2], 0.35)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bad_inputs_say_what_was_expected():
    _kernel()
    q, k, lse, row, _ = _problem(2, 3, 20, 8, layout="contiguous")
    op = torch.ops.dcal_rollout.left_multiply
    with pytest.raises(RuntimeError, match=r"q and k must both be \(B, H, T, d\)"):
        op(q, k[:, :2], lse, row, 0.1, 8)
    with pytest.raises(RuntimeError, match=r"lse must be \(B, H, T\) = \(2, 3, 20\)"):
        op(q, k, lse[:, :, :5], row, 0.1, 8)
    with pytest.raises(RuntimeError, match=r"row must be \(B, T\) = \(2, 20\)"):
        op(q, k, lse, row[:1], 0.1, 8)
    with pytest.raises(RuntimeError, match="q must be a float32 CPU tensor, got Double"):
        op(q.double(), k, lse, row, 0.1, 8)
    with pytest.raises(RuntimeError, match="unit stride along d"):
        op(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, lse, row, 0.1, 8)
    with pytest.raises(RuntimeError, match="chunk_rows must be >= 1, got 0"):
        op(q, k, lse, row, 0.1, 0)
    with pytest.raises(ValueError, match="needs the forward's softmax normalisers"):
        QueryKey(q, k).left_multiply(row, fused=True)


def test_chunk_rows_split_evenly():
    assert fused_rollout.chunk_rows(785) == 113 and fused_rollout.chunk_rows(129) == 65
    assert fused_rollout.chunk_rows(128) == 128 and fused_rollout.chunk_rows(1) == 1


def test_unbuildable_kernel_falls_back_with_one_warning(monkeypatch):
    """No compiler (here: a failing build): one RuntimeWarning naming the reason, then the eager tiles serve."""
    calls = []

    def broken_build():
        calls.append(1)
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(fused_rollout, "_load", functools.cache(fused_rollout._load.__wrapped__))
    monkeypatch.setattr(fused_rollout, "_build", broken_build)
    monkeypatch.delenv(fused_rollout.ENV, raising=False)
    q, k, lse, row, want = _problem(2, 3, 20, 8)
    with pytest.warns(RuntimeWarning, match="unavailable .OSError: no C.. compiler found.; using the eager tiles"):
        got = QueryKey(q, k, lse, 0.35).left_multiply(row)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QueryKey(q, k, lse, 0.35).left_multiply(row)  # tried once per process, warned once
    assert calls == [1] and fused_rollout.why_unavailable() == "OSError: no C++ compiler found"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_environment_turns_it_off_or_requires_it(monkeypatch):
    monkeypatch.setattr(fused_rollout, "_load", functools.cache(fused_rollout._load.__wrapped__))
    monkeypatch.setenv(fused_rollout.ENV, "0")
    assert not fused_rollout.available() and fused_rollout.why_unavailable() == "DCAL_FUSED_ROLLOUT=0"

    monkeypatch.setattr(fused_rollout, "_load", functools.cache(fused_rollout._load.__wrapped__))
    monkeypatch.setenv(fused_rollout.ENV, "1")
    monkeypatch.setattr(fused_rollout, "_build", lambda: (_ for _ in ()).throw(OSError("ninja is required")))
    with pytest.raises(RuntimeError, match="DCAL_FUSED_ROLLOUT=1 but the fused CPU rollout kernel could not be "
                                           "built: OSError: ninja is required"):
        fused_rollout.available()

    monkeypatch.setattr(fused_rollout, "_load", functools.cache(fused_rollout._load.__wrapped__))
    monkeypatch.setenv(fused_rollout.ENV, "yes")
    with pytest.raises(ValueError, match="DCAL_FUSED_ROLLOUT must be 0 .off., 1 .required. or auto, got 'yes'"):
        fused_rollout.available()
