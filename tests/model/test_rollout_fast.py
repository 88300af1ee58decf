"""The tiled rollout (queries and keys, never the B·H·T² probabilities) against explicit full-matrix references."""

from __future__ import annotations

import pytest
import torch

from dcal.model.attention import attend_with_lse, explicit_attention, qkv, sa_block_keep_qk
from dcal.model.rollout import QueryKey, cls_attention_row, rollout_cls_row
from tests.helpers import tiny_model


def random_qk(b: int, h: int, t: int, d: int = 8) -> tuple[QueryKey, torch.Tensor]:
    """Queries/keys with a spread of scores (peaked and flat rows) and their explicit head-averaged map."""
    q, k = torch.randn(b, h, t, d) * 1.5, torch.randn(b, h, t, d)
    s = (q @ k.transpose(-2, -1)).softmax(-1).mean(1)
    return QueryKey(q, k), s


@pytest.mark.parametrize(("b", "h", "t"), [(1, 1, 7), (3, 3, 50), (2, 2, 97)])
@pytest.mark.parametrize("tile", ["one row", "not dividing", "two problems", "all"])
def test_left_multiply_equals_row_times_explicit_map(b, h, t, tile):
    qk, s = random_qk(b, h, t)
    r = torch.rand(b, t)
    elements = {"one row": t, "not dividing": 7 * t + 5, "two problems": 2 * t * t + t, "all": b * h * t * t}[tile]
    got = qk.left_multiply(r, tile_elements=elements)
    torch.testing.assert_close(got, torch.bmm(r.unsqueeze(1), s).squeeze(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tile", ["one row", "not dividing", "whole problem", "two problems", "all"])
@pytest.mark.parametrize("buffer", [None, "too small", "larger"])
def test_left_multiply_with_forward_normalisers_equals_softmax_path(tile, buffer):
    """The CPU path (exp2 of base-2 scores with the normaliser folded into the GEMM), problem by problem (one
    problem per tile) and batched (several), any tiling, any scratch."""
    qk, s = random_qk(2, 3, 40)
    lse = torch.logsumexp(qk.q @ qk.k.transpose(-2, -1), dim=-1)
    r = torch.rand(2, 40)
    elements = {"one row": 40, "not dividing": 3 * 40 + 7, "whole problem": 40 * 40, "two problems": 2 * 1600 + 40,
                "all": 6 * 1600}[tile]
    scratch = {None: None, "too small": torch.empty(10), "larger": torch.full((5000,), float("nan"))}[buffer]
    got = QueryKey(qk.q, qk.k, lse).left_multiply(r, tile_elements=elements, buffer=scratch, fused=False)
    torch.testing.assert_close(got, torch.bmm(r.unsqueeze(1), s).squeeze(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_lse", [False, True])
def test_left_multiply_applies_the_scale_and_reads_strided_views(with_lse, rollout_kernel):
    """QueryKey(q, k, scale=c) is softmax(c q kᵀ); q and k may be views into one qkv tensor (never copied)."""
    b, h, t, d, c = 2, 3, 30, 8, 0.35
    qkv = torch.randn(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # timm's layout: q, k, v interleaved per token
    q, k = qkv[0], qkv[1]
    assert not q.is_contiguous()
    s = (c * q @ k.transpose(-2, -1)).softmax(-1).mean(1)
    lse = torch.logsumexp(c * q @ k.transpose(-2, -1), dim=-1) if with_lse else None
    r = torch.rand(b, t)
    got = QueryKey(q, k, lse, scale=c).left_multiply(r)
    torch.testing.assert_close(got, torch.bmm(r.unsqueeze(1), s).squeeze(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(QueryKey(q, k, lse, scale=c).cls_row(), s[:, 0], atol=1e-6, rtol=1e-5)


@pytest.fixture(params=["fused kernel", "eager tiles"])
def rollout_kernel(request, monkeypatch):
    """Run a test with the fused CPU kernel (where it builds) and with it turned off (the eager tiles)."""
    from dcal.model import fused_rollout

    if request.param == "eager tiles":
        monkeypatch.setattr(fused_rollout, "_load", lambda: "turned off by the test")
    elif not fused_rollout.available():
        pytest.skip(f"the fused rollout kernel is unavailable here: {fused_rollout.why_unavailable()}")
    return request.param


def test_rollout_from_queries_and_keys_equals_rollout_from_maps():
    layers = [random_qk(3, 2, 33) for _ in range(4)]
    by_maps = rollout_cls_row([s for _, s in layers])
    by_qk = rollout_cls_row([qk for qk, _ in layers])
    torch.testing.assert_close(by_qk, by_maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_attention_row(layers[-1][0]), layers[-1][1][:, 0], atol=1e-6, rtol=1e-5)


def test_attend_with_lse_is_fused_attention_and_its_normalisers():
    model = tiny_model().eval()
    attn = model.backbone.blocks[0].attn
    q, k, v = qkv(attn, torch.randn(2, 17, 48))
    out, lse = attend_with_lse(attn, q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * attn.scale, dim=-1))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("into", [False, True])
def test_sa_block_keep_qk_is_timm_block(grad, into):
    """Same output bits as timm's Block.forward, and the same input gradient, with and without autograd; also
    with the qkv projection written into a caller's (larger) workspace."""
    blk = tiny_model().backbone.blocks[1]
    x = torch.randn(2, 17, 48, requires_grad=grad)
    workspace = torch.full((40, 3 * 48), float("nan")) if into else None
    with torch.set_grad_enabled(grad):
        got, qk = sa_block_keep_qk(blk, x, workspace)
        want = blk(x)
    assert torch.equal(got, want) and not qk.q.requires_grad and qk.lse is not None
    if into and not grad:  # the queries and keys live in the workspace's first B·T rows
        assert qk.q.untyped_storage().data_ptr() == workspace.untyped_storage().data_ptr()
        assert not workspace[:34].isnan().any() and workspace[34:].isnan().all()
    elif into:  # under autograd the projection is autograd's own (out= has no derivative)
        assert workspace.isnan().all()
    if grad:
        (g_got,) = torch.autograd.grad(got.square().sum(), x)
        (g_want,) = torch.autograd.grad(want.square().sum(), x)
        assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("mode", ["eval", "train", "train+ckpt"])
def test_model_selection_equals_explicit_attention_path(mode, rollout_kernel):
    """Same selected local queries and rollout as the explicit-map path (FLOP counting), in every SA path."""
    model = tiny_model(img_size=64).train(mode != "eval")  # N = 16, T = 17
    model.set_grad_checkpointing(mode == "train+ckpt")
    x = torch.randn(3, 3, 64, 64)
    pairs = torch.tensor([1, 2, 0])
    with torch.no_grad(), explicit_attention(model):
        want = model(x, pairs=pairs)
        want_rollout = model.cls_rollout(x)
    got = model(x, pairs=pairs)
    assert torch.equal(got["selected"], want["selected"])
    torch.testing.assert_close(model.cls_rollout(x), want_rollout, atol=1e-6, rtol=1e-5)
    assert set(got["logits"]) == set(want["logits"])
    for branch in got["logits"]:
        torch.testing.assert_close(got["logits"][branch], want["logits"][branch], atol=1e-5, rtol=1e-4)


def test_explicit_attention_is_timms_per_module_switch():
    """One switch: timm's ``fused_attn`` on each attention module. ``explicit_attention`` turns it off for the whole
    model and restores each module's own value; a block with it off hands the rollout its probabilities, the
    others their queries and keys."""
    model = tiny_model(img_size=64).eval()
    switches = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(switches) > len(model.backbone.blocks)  # the GLCA block's copy too
    switches[1].fused_attn = False
    before = [m.fused_attn for m in switches]
    x0, rope = model._embed(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        with explicit_attention(model):
            assert not any(m.fused_attn for m in switches)
            _, _, att = model._sa_stream(x0, rope, need_attn=True)
            assert all(isinstance(a, torch.Tensor) for a in att)
        assert [m.fused_attn for m in switches] == before
        _, _, att = model._sa_stream(x0, rope, need_attn=True)
    kinds = [type(a).__name__ for a in att]
    assert kinds[1] == "Tensor" and all(k == "QueryKey" for i, k in enumerate(kinds) if i != 1)


def _fresh_outputs(model, x):
    model.release_workspace()
    with torch.no_grad():
        out = model(x)
    model.release_workspace()
    return out


@pytest.mark.parametrize("kernel", [True, False], ids=["maps", "qkv"])
def test_inference_workspace_is_kept_grown_reused_and_released(kernel, monkeypatch):
    """CPU inference keeps one workspace between calls (grown to the largest batch): the blocks' head-mean maps
    with the compiled kernels, their qkv projections without; reusing it, larger or stale, changes no output;
    train() and release_workspace() drop it; autograd and autocast never use it."""
    from dcal.model import fused_rollout

    if kernel and not fused_rollout.available():
        pytest.skip(f"the compiled CPU kernels are unavailable here: {fused_rollout.why_unavailable()}")
    if not kernel:
        monkeypatch.setattr(fused_rollout, "_load", lambda: "turned off by the test")
    model = tiny_model(img_size=64).eval()
    small, large = torch.randn(2, 3, 64, 64), torch.randn(5, 3, 64, 64)
    want_small, want_large = _fresh_outputs(model, small), _fresh_outputs(model, large)
    shape = (lambda b: (3, b * 17 * 17, 1)) if kernel else (lambda b: (3, b * 17, 3 * 48))
    with torch.no_grad():
        model(small)
        kind, first = model._kept_workspace
        assert kind == ("maps" if kernel else "qkv") and first.shape == shape(2)
        got_large = model(large)  # grows
        grown = model._kept_workspace[1]
        assert grown.shape == shape(5)
        got_small = model(small)  # reuses the larger one, stale rows and all
        assert model._kept_workspace[1] is grown
    for got, want in ((got_small, want_small), (got_large, want_large)):
        assert torch.equal(got["selected"], want["selected"])
        for branch in want["logits"]:
            assert torch.equal(got["logits"][branch], want["logits"][branch])
    model.train()
    assert "_kept_workspace" not in vars(model)
    model.eval()
    model(small)  # autograd on: no workspace (autograd keeps the projections itself)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(small)
    assert "_kept_workspace" not in vars(model)
    with torch.no_grad():
        model.cls_rollout(small)
    assert "_kept_workspace" in vars(model)
    model.release_workspace()
    assert "_kept_workspace" not in vars(model)


def test_inference_workspace_is_never_shared_between_threads():
    """Two threads predicting with one model at once: each call holds its own workspace while it runs."""
    import threading

    model = tiny_model(img_size=64).eval()
    inputs = [torch.randn(3, 3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        want = [model.predict(x) for x in inputs]
    errors: list[str] = []

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(15):
                if not torch.equal(model.predict(inputs[i]), want[i]):
                    errors.append(f"thread {i}: prediction changed")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_tile_size_by_device():
    """Cache-sized tiles on the CPU; on a GPU large ones (a tile is a few kernel launches there)."""
    from dcal.model.rollout import GPU_TILE_ELEMENTS, TILE_ELEMENTS, default_tile_elements, tile_rows

    assert default_tile_elements(torch.device("cpu")) == TILE_ELEMENTS < GPU_TILE_ELEMENTS
    assert default_tile_elements(torch.device("cuda")) == GPU_TILE_ELEMENTS
    assert tile_rows(785) == 785 and tile_rows(785, 785 * 10 + 3) == 10 and tile_rows(785, 5) == 1
