"""Distributed data parallel under torchrun (2 CPU processes, gloo).

The equivalence test holds for the FGVC loss: cross-entropy is a per-sample mean and the uncertainty-weighted
total is linear in the branch losses, so DDP's average of two processes' gradients (batch B each) equals the
gradient of one process on the 2B images, given the same PWCA pairs (drawn inside each process's half, as on the
paper's GPUs). Re-ID's batch-hard triplet mines inside each process's batch, so it has no such identity.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcal.config import load_config
from dcal.data.samplers import ShardedShuffleSampler, ShardSampler
from dcal.engine import ForwardLoss, build_datasets, evaluate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)  # float32, different summation order (two halves then an average)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_samplers_shard_by_global_batch_and_resume():
    one = ShardedShuffleSampler(20, batch_size=6, seed=3, num_replicas=1, rank=0)
    halves = [ShardedShuffleSampler(20, batch_size=3, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for s in (one, *halves):
        s.set_epoch(2)
    b1, (h0, h1) = one.batches(), (h.batches() for h in halves)
    assert torch.equal(torch.cat([h0, h1], dim=1), b1)  # step k of 2 x 3 = step k of 1 x 6
    assert len(set(h0.flatten().tolist()) | set(h1.flatten().tolist())) == 18
    one.set_epoch(2, start_batch=2)
    assert list(one) == b1[2:].flatten().tolist() and len(one) == 6
    shares = [list(ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert sum(shares, []) == list(range(7))


LORA = ["model.lora={rank: 4}", "model.freeze_blocks=1"]


@pytest.mark.parametrize("overrides", [
    [],
    pytest.param(LORA, marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")),
], ids=["full", "lora+freeze"])
def test_ddp_step_equals_one_process_with_twice_the_batch(tmp_path, overrides):
    out = tmp_path / "ddp.pt"
    torchrun([str(REPO / "tests" / "ddp_worker.py"), str(out), *overrides], cwd=tmp_path)
    ddp = torch.load(out, weights_only=True)

    cfg = load_config(None, [*ddp_worker.TINY, *overrides])
    device = torch.device("cpu")
    model, criterion = ddp_worker.build(cfg)
    whole = evaluate(model, build_datasets(cfg), device, cfg)
    images, targets, pairs = ddp_worker.batch(2)
    res = ForwardLoss(model.train(), criterion, cfg, device)(images, targets, pairs=pairs)
    res.total.backward()

    assert ddp["loss"] == pytest.approx(res.total.item(), rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])
    grads = {f"model.{k}": p.grad for k, p in model.named_parameters() if p.grad is not None}
    grads.update({f"criterion.{k}": p.grad for k, p in criterion.named_parameters()})
    assert grads.keys() == ddp["grads"].keys() and any(k.startswith("criterion.") for k in grads)
    if overrides:  # the adapters are synchronised; block 1 (frozen) and the backbone's own weights get no gradient
        assert any(".lora_A." in k for k in grads) and not any(".blocks.0." in k for k in grads)
        assert "model.backbone.blocks.1.attn.qkv.base_layer.weight" not in grads
    for k, g in grads.items():
        torch.testing.assert_close(ddp["grads"][k], g, **GRAD_TOL, msg=k)
    # sharded evaluation counts every test image once; the mechanism (first test images) is each process's own
    assert ddp["eval"].pop("pwca_share") == pytest.approx(whole.pop("pwca_share"))
    assert ddp["eval"] == pytest.approx(whole)


def test_two_process_reid_run_writes_one_set_of_files(tmp_path, market_data):
    recipe = tmp_path / "reid.yaml"
    recipe.write_text("data:\n  dataset: market1501\n  resize: null\ntrain:\n  batch_size: 4\n  num_instances: 2\n"
                      "  epochs: 2\n  optimizer: sgd\n  lr: 0.008\n  workers: 0\n  device: cpu\n")
    out = tmp_path / "run"
    tiny = ["model.img_size=[32,16]", "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}",
            "model.pwca_blocks=2"]
    res = torchrun(["-m", "dcal", "train", "--config", str(recipe), f"data.root={market_data}", f"output_dir={out}",
                    *tiny, "train.save_every_steps=1"], cwd=tmp_path)
    assert res.stdout.count("done: best mAP") == 1  # rank 0 alone logs
    assert "x 2 process(es)" in res.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if not r.get("partial") and not r.get("final")]
    assert [r["epoch"] for r in ends] == [1, 2] and records[-1]["final"] is True
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pth", ".safetensors")) == [
        "best.pth", "best.safetensors", "last.pth", "last.safetensors"]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    # the features gathered from both processes score as one process scoring the whole query and gallery
    from dcal.engine import evaluate_checkpoint
    from dcal.loading import load_model

    run = load_model(checkpoint=out / "last.pth", overrides=[f"data.root={market_data}"])
    single = evaluate_checkpoint(run.cfg, run.model)
    for k in ("mAP", "rank1", "mINP"):
        assert ends[-1][k] == pytest.approx(single[k], abs=1e-4), k


def test_shutdown_destroys_only_the_group_init_created(tmp_path, monkeypatch):
    """No module state: ``init`` says in its answer whether it created the process group, and ``shutdown(info)``
    destroys only that one (a group the caller made stays)."""
    import torch.distributed as tdist

    from dcal import distributed as dist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(var, value)
        info, _ = dist.init("cpu")  # under torchrun, but the caller's group exists: joined, not owned
        assert info.world_size == 2 and not info.owns_group
        dist.shutdown(info)
        assert tdist.is_initialized()
        dist.shutdown(dist.DistInfo(owns_group=True))
        assert not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
