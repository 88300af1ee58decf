"""The one-pass SA attention of CPU inference (csrc/rollout_cpu.cpp ``attention_mean``): each block's output and
head-mean probabilities from one QKᵀ. The kernel against explicit softmax; on every backbone family, at batch 1,
8 and 32: block outputs against timm's, the rollout against the full-matrix reference and against the two-pass
path (fused attention + rollout from queries and keys), the GLCA selection and outputs unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from dcal.model import fused_rollout
from dcal.model.attention import sa_block_mean_probs
from dcal.model.backbone import block_rope
from dcal.model.dcal import DCAL
from dcal.model.rollout import select_top
from tests.helpers import tiny_model
from tests.model.test_backbones import CASES, IDS, build, reference_rollout, timm_attention_maps, timm_tokens
from tests.model.test_fused_rollout import _kernel


def _problem(b: int, h: int, t: int, d: int, scale: float = 0.35, spread: float = 1.5):
    """q, k, v as strided views of one interleaved qkv projection (timm's layout) and the explicit references, in
    float64 (float32's own explicit softmax is further from them than the kernel at sharp attention)."""
    q, k, v = (torch.randn(b, t, 3, h, d) * spread).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (scale * q.double() @ k.double().transpose(-2, -1)).softmax(-1)
    return q, k, v, (probs @ v.double()).float(), probs.mean(1).float()


@pytest.mark.parametrize(("b", "h", "t", "d"), [(1, 1, 1, 8), (1, 3, 7, 8), (2, 3, 50, 8), (3, 2, 129, 64),
                                                (2, 3, 197, 64)])
@pytest.mark.parametrize("rows", [1, 5, 64, None, 1000])
def test_output_and_mean_map_equal_explicit_softmax(b, h, t, d, rows):
    """Any T (padding lanes of the score tile never reach output or map), any chunking; the output is laid out
    as timm reshapes it ((B, T, H·d) without a copy); a stale map is overwritten, not added to."""
    _kernel()
    q, k, v, want_out, want_mean = _problem(b, h, t, d)
    mean = torch.full((b, t, t), float("nan"))
    out = fused_rollout.attention_mean(q, k, v, 0.35, mean, rows)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.35), atol=3e-5, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


def test_large_scores_do_not_overflow():
    """Scores in the hundreds (exp2 of them overflows float32): the row maximum is subtracted first, as softmax does;
    the tolerance is float32's own rounding of scores that large."""
    _kernel()
    q, k, v, want_out, want_mean = _problem(2, 2, 40, 16, scale=3.0, spread=6.0)
    mean = torch.empty(2, 40, 40)
    out = fused_rollout.attention_mean(q, k, v, 3.0, mean)
    assert torch.isfinite(out).all() and torch.isfinite(mean).all()
    torch.testing.assert_close(out, want_out, atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_and_repeatable(threads):
    _kernel()
    q, k, v, want_out, want_mean = _problem(3, 2, 97, 16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mean, again = torch.empty(3, 97, 97), torch.empty(3, 97, 97)
        out = fused_rollout.attention_mean(q, k, v, 0.35, mean)
        assert torch.equal(out, fused_rollout.attention_mean(q, k, v, 0.35, again)) and torch.equal(mean, again)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=1e-5)


def test_bad_inputs_say_what_was_expected():
    _kernel()
    q, k, v, _, _ = _problem(2, 3, 20, 8)
    op = torch.ops.dcal_rollout.attention_mean
    mean = torch.empty(2, 20, 20)
    with pytest.raises(RuntimeError, match=r"q, k and v must all be \(B, H, T, d\)"):
        op(q, k, v[:, :2], 0.1, 8, mean)
    with pytest.raises(RuntimeError, match=r"mean must be a contiguous \(B, T, T\) = \(2, 20, 20\) tensor"):
        op(q, k, v, 0.1, 8, mean[:1])
    with pytest.raises(RuntimeError, match=r"mean must be a contiguous"):
        op(q, k, v, 0.1, 8, mean.transpose(1, 2))
    with pytest.raises(RuntimeError, match="v must be a float32 CPU tensor, got Double"):
        op(q, k, v.double(), 0.1, 8, mean)
    with pytest.raises(RuntimeError, match="unit stride along d"):
        op(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, 0.1, 8, mean)
    with pytest.raises(RuntimeError, match="chunk_rows must be >= 1, got 0"):
        op(q, k, v, 0.1, 0, mean)


def test_chunk_rows_keep_every_thread_busy():
    """About 128 rows, split evenly; few (image, chunk) items: a multiple of the threads (785 rows: 8 of 99 on 2)."""
    assert fused_rollout.attention_chunk_rows(785, 8, 2) == 113  # 7 chunks, 56 items
    assert fused_rollout.attention_chunk_rows(785, 1, 2) == 99
    assert fused_rollout.attention_chunk_rows(785, 1, 3) == 88  # 9 chunks, not 7, on 3 threads
    assert fused_rollout.attention_chunk_rows(17, 1, 2) == 9 and fused_rollout.attention_chunk_rows(1, 1, 4) == 1


def test_nan_propagates_as_in_timms_attention():
    """A NaN in a query makes that row's output NaN (as F.scaled_dot_product_attention), not a silent number."""
    _kernel()
    q, k, v, _, _ = _problem(1, 2, 20, 8)
    q = q.clone()
    q[0, 1, 3, 0] = float("nan")
    out = fused_rollout.attention_mean(q, k, v, 0.35, torch.empty(1, 20, 20))
    want = F.scaled_dot_product_attention(q, k, v, scale=0.35)
    assert torch.equal(out.isnan(), want.isnan()) and out[0, 1, 3].isnan().all()


# ------------------------------------------------------------------------------------------ in the model
FAMILY_CASES = [("deit", None)] + CASES
FAMILY_IDS = ["deit"] + IDS


def _model(family: str, pool: str | None) -> DCAL:
    if family == "deit":  # one class token, no registers (the paper's backbone)
        model = tiny_model(top_r=0.25)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        return model.eval()
    return build(family, pool).eval()


@contextlib.contextmanager
def _two_pass(model: DCAL):
    """Today's other CPU path: fused attention, then the rollout from each block's queries, keys and normalisers
    (the compiled rollout step), as without the maps workspace."""
    workspace = model._workspace
    model._workspace = lambda x, need_attn: contextlib.nullcontext(None)
    try:
        yield
    finally:
        model._workspace = workspace


def _images(b: int) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))


@pytest.mark.parametrize(("family", "pool"), FAMILY_CASES, ids=FAMILY_IDS)
def test_block_outputs_and_maps_equal_timms(family, pool):
    """Each SA block through the one-pass kernel: timm's block output and timm's head-mean probabilities."""
    _kernel()
    model = _model(family, pool)
    bb = model.backbone
    x = _images(8)
    maps, _ = timm_attention_maps(bb, x)
    with torch.no_grad():
        t, rope = timm_tokens(bb, x)
        for i, blk in enumerate(bb.blocks):
            r = block_rope(bb, rope, i)
            want = blk(t) if r is None else blk(t, rope=r)
            got, mean = sa_block_mean_probs(blk, t, torch.empty(8, t.shape[1], t.shape[1]), r)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mean, maps[i], atol=1e-6, rtol=1e-5)
            t = want


@pytest.mark.parametrize(("family", "pool"), FAMILY_CASES, ids=FAMILY_IDS)
def test_rollout_selection_and_outputs_unchanged_at_batch_1_8_32(family, pool):
    """One-pass inference (the maps workspace in use) against the full-matrix rollout of timm's maps and against
    the two-pass path: the same rollout, the same GLCA queries, SA equal to timm, GLCA outputs unchanged."""
    _kernel()
    model = _model(family, pool)
    for b in (1, 8, 32):
        x = _images(b)
        with torch.no_grad():
            scores = model.selection_scores(x)
            assert model._kept_workspace[0] == "maps"
            out = model(x)
            with _two_pass(model):
                two_scores = model.selection_scores(x)
                two = model(x)
            timm_out = model.backbone(x)
        torch.testing.assert_close(scores, reference_rollout(model.backbone, x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores, two_scores, atol=1e-6, rtol=1e-5)
        assert torch.equal(out["selected"], select_top(two_scores, model.num_local_queries))
        assert torch.equal(out["selected"], two["selected"])
        torch.testing.assert_close(out["logits"]["sa"], timm_out, atol=1e-5, rtol=1e-5)
        for branch in ("sa", "glca"):
            torch.testing.assert_close(out["logits"][branch], two["logits"][branch], atol=1e-5, rtol=1e-5)
