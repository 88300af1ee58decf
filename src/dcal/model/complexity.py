"""Parameters and FLOPs at inference, counted by code (the paper's Table 3).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` while every attention, timm's included,
runs as explicit matmul + softmax: the counter does not see fused attention kernels on the CPU, which would
drop the attention FLOPs. Reported as multiply-accumulates (GMACs), the convention of fvcore and of the
paper's "FLOPs" (DeiT-T at 224 = 1.3 G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from dcal.model.attention import explicit_attention
from dcal.model.dcal import DCAL, create_model


def count_macs(model: DCAL, img_size: int | tuple[int, int], branches: tuple[str, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward of one image through ``branches``."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(1, 3, h, w)
    model.eval()
    with torch.no_grad(), explicit_attention(model), FlopCounterMode(display=False) as counter:
        model(x, branches=branches)
    return counter.get_total_flops() // 2


def inference_params(model: DCAL, branches: tuple[str, ...]) -> int:
    """Parameters used at inference by ``branches`` (PWCA shares SA's, so it never adds any)."""
    total = sum(p.numel() for p in model.backbone.parameters())
    if model.cfg.task == "reid":
        total += sum(p.numel() for p in model.sa_neck.parameters())
    if "glca" in branches and model.cfg.glca_blocks:
        glca = [model.glca_blocks, model.glca_norm, model.glca_fc_norm]
        glca.append(model.glca_head if model.cfg.task == "fgvc" else model.glca_neck)
        total += sum(p.numel() for m in glca for p in m.parameters())
    return total


@dataclass
class Row:
    setting: str
    backbone: str
    task: str
    num_classes: int
    img_size: int | tuple[int, int]
    paper: dict[str, tuple[float, float]]  # variant -> (params M, FLOPs G) from the paper's Table 3
    patch_stride: int | None = None  # 12: TransReID's overlapping patches (docs/design.md)


TABLE3 = [
    Row("CUB, DeiT-T 448x448", "deit_tiny_patch16_224", "fgvc", 200, 448,
        {"baseline": (5.5, 8.6), "+GLCA": (6.0, 8.8), "+PWCA": (5.5, 8.6), "DCAL": (6.0, 8.8)}),
    Row("VeRi-776, ViT-B 256x256", "vit_base_patch16_224", "reid", 576, (256, 256),
        {"baseline": (81.6, 41.1), "+GLCA": (88.4, 42.4), "+PWCA": (81.6, 41.1), "DCAL": (88.4, 42.4)}),
    Row("MSMT17, ViT-B 256x128", "vit_base_patch16_224", "reid", 1041, (256, 128),
        {"baseline": (81.6, 20.5), "+GLCA": (88.4, 21.3), "+PWCA": (81.6, 20.5), "DCAL": (88.4, 21.3)}),
    # the same Re-ID rows with overlapping patches: the paper's Re-ID FLOPs match these
    # (docs/design.md, Overlapping patches)
    Row("VeRi-776, ViT-B 256x256, stride 12", "vit_base_patch16_224", "reid", 576, (256, 256),
        {"baseline": (81.6, 41.1), "+GLCA": (88.4, 42.4), "+PWCA": (81.6, 41.1), "DCAL": (88.4, 42.4)}, 12),
    Row("MSMT17, ViT-B 256x128, stride 12", "vit_base_patch16_224", "reid", 1041, (256, 128),
        {"baseline": (81.6, 20.5), "+GLCA": (88.4, 21.3), "+PWCA": (81.6, 20.5), "DCAL": (88.4, 21.3)}, 12),
]
VARIANTS = {"baseline": (0, 0), "+GLCA": (1, 0), "+PWCA": (0, 12), "DCAL": (1, 12)}


def complexity_rows(rows: list[Row] = TABLE3) -> list[dict[str, object]]:
    """Measure params/GMACs at inference for every (setting, variant); PWCA is training-only by construction."""
    results = []
    for row in rows:
        for variant, (m, t) in VARIANTS.items():
            model = create_model(row.backbone, task=row.task, num_classes=row.num_classes, img_size=row.img_size,
                                 glca_blocks=m, pwca_blocks=t, patch_stride=row.patch_stride)
            branches = model.branches  # eval mode drops PWCA itself
            results.append({
                "setting": row.setting, "variant": variant,
                "params_m": inference_params(model, branches) / 1e6,
                "gmacs": count_macs(model, row.img_size, branches) / 1e9,
                "paper_params_m": row.paper[variant][0], "paper_gflops": row.paper[variant][1],
            })
    return results


def format_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| setting | variant | params (M) | FLOPs (GMACs) | paper params (M) | paper FLOPs (G) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['variant']} | {r['params_m']:.1f} | {r['gmacs']:.2f} | "
            f"{r['paper_params_m']:.1f} | {r['paper_gflops']:.1f} |"
        )
    return "\n".join(lines)
