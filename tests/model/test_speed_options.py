"""Speed options keep DCAL's outputs: bf16 autocast (CPU) and torch.compile. No timing here: see benchmarks/."""

from __future__ import annotations

import pytest
import torch

from dcal.losses import DCALLoss
from dcal.model.dcal import autocast, compile_model
from tests.helpers import tiny_model

PAIRS = torch.tensor([1, 0, 3, 2])


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("task", ["fgvc", "reid"])
def test_bf16_autocast_runs_all_streams_close_to_fp32(task):
    # every patch a local query (R = 1): GLCA's mean over them does not depend on the rollout order, which bf16
    # may flip between near-tied patches (with R < 1 such a flip changes the pooled feature, as it should)
    model = tiny_model(task=task, top_r=1.0).train()
    x, y = images(), torch.tensor([0, 0, 1, 1])
    ref = model(x, pairs=PAIRS)
    with autocast("cpu", "bf16"):
        out = model(x, pairs=PAIRS)
        loss = DCALLoss(task, model.branches)(out, y).total
    loss.backward()
    for branch in model.branches:
        got, want = out["features"][branch].float(), ref["features"][branch]
        # bf16 keeps 8 bits of mantissa: features agree to about 1e-2 of their scale
        assert torch.allclose(got, want, atol=0.05 * want.abs().max().item(), rtol=0), branch
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_inference_prediction_close_to_fp32():
    model = tiny_model(top_r=1.0).eval()  # R = 1: see above
    x = images()
    with torch.inference_mode():
        ref = model.predict(x)
        with autocast("cpu", "bf16"):
            got = model.predict(x)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=0)


def test_autocast_options_and_errors():
    assert isinstance(autocast("cpu", "fp32"), type(autocast("cpu", "fp32")))
    with pytest.raises(ValueError, match="CUDA"):
        autocast("cpu", "fp16")
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "int8")


def test_torch_compile_gives_eager_outputs_and_gradients():
    """The smallest model (3 blocks, 48 dims): compilation alone takes tens of seconds on a 2-core CPU."""
    torch._dynamo.reset()
    model = tiny_model().train()
    x = images()
    compiled = compile_model(model)
    ref = model(x, pairs=PAIRS)
    ref_loss = sum(v.sum() for v in ref["logits"].values())
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x, pairs=PAIRS)
    for branch in model.branches:
        torch.testing.assert_close(out["logits"][branch], ref["logits"][branch], atol=1e-4, rtol=1e-4)
    assert torch.equal(out["selected"], ref["selected"])
    sum(v.sum() for v in out["logits"].values()).backward()
    for a, p in zip(ref_grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-4, rtol=1e-3)
    compiled.eval()  # a second graph: eval mode drops PWCA
    with torch.no_grad():
        got, want = compiled(x)["logits"], model(x)["logits"]
    assert set(got) == {"sa", "glca"}
    for branch in got:
        torch.testing.assert_close(got[branch], want[branch], atol=1e-4, rtol=1e-4)
