"""Worker run under ``torchrun`` by tests/test_distributed.py (not a test module itself).

One DDP training step through the engine's own ``ForwardLoss`` + ``wrap_ddp``, with batch B per process and fixed
PWCA pairs drawn inside each process's half, and one sharded evaluation. Rank 0 saves the averaged loss, the
(DDP-averaged) gradients of the model and of the loss weights, and the evaluation record to ``argv[1]``; any
further arguments are config overrides (``model.lora=...``).
"""

from __future__ import annotations

import sys

import torch

from dcal import distributed as dist
from dcal.config import load_config
from dcal.engine import ForwardLoss, build_criterion, build_datasets, build_model, evaluate
from dcal.model.finetune import finetune_from_config

TINY = ["data.dataset=synthetic", "data.resize=32", "data.synthetic_image_size=32", "data.synthetic_num_classes=3",
        "data.synthetic_train_per_class=2", "data.synthetic_test_per_class=5", "model.img_size=32",
        "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}", "model.pwca_blocks=2",
        "model.drop_path_rate=0.0", "train.workers=0", "train.device=cpu", "eval.batch_size=4"]
B = 3  # images per process


def batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (world_size x B images) and its pairs: process r's pairs index its own half."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(world_size * B, 3, 32, 32, generator=g)
    targets = torch.randint(0, 3, (world_size * B,), generator=g)
    local = [torch.roll(torch.arange(B), 1 + r % (B - 1)) for r in range(world_size)]  # derangements of 0..B-1
    return images, targets, torch.cat([p + r * B for r, p in enumerate(local)])


def build(cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model as a run builds it (frozen blocks and LoRA adapters from the config; the adapters' B factors drawn
    non-zero, so that A gets gradients too) and its loss."""
    torch.manual_seed(0)
    model = finetune_from_config(build_model(cfg, num_classes=3), cfg.model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, build_criterion(cfg, model)


def main(out_path: str, *overrides: str) -> None:
    cfg = load_config(None, [*TINY, *overrides])
    info, device = dist.init("cpu")
    model, criterion = build(cfg)
    record = evaluate(model, build_datasets(cfg), device, cfg)  # each process scores its share
    step = dist.wrap_ddp(ForwardLoss(model.train(), criterion, cfg, device), info, device)
    images, targets, pairs = batch(info.world_size)
    mine = slice(info.rank * B, (info.rank + 1) * B)
    res = step(images[mine], targets[mine], pairs=pairs[mine] - info.rank * B)
    res.total.backward()
    loss = dist.all_reduce_sum([res.total.item()], device)[0] / info.world_size
    if info.is_main:
        grads = {f"model.{k}": p.grad for k, p in model.named_parameters() if p.grad is not None}
        grads.update({f"criterion.{k}": p.grad for k, p in criterion.named_parameters()})
        torch.save({"loss": loss, "grads": grads, "eval": record}, out_path)
    dist.shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
