"""Export a trained model's inference graph to ONNX (``dcal export --onnx``) and check it with onnxruntime.

The graph is what runs at inference: the SA stream (standard attention; its queries and keys feed the rollout,
Eq. 2), the rollout's pooled-feature row, top-⌈R·N⌉ selection (ONNX ``TopK``), the gather of the selected tokens
and the GLCA block(s) on x_(L-1); PWCA is training-only and absent. Outputs, with a dynamic batch axis:

* FGVC: ``probs`` (B, C), the mean of the fused branches' softmaxes (as :func:`dcal.predict` reports them);
* Re-ID: ``embedding`` (B, D), the concatenated features of :meth:`DCAL.embed` (before or after the BNNeck);
* with GLCA: ``selected`` (B, ⌈R·N⌉) int64, the indices of the local queries, so that a serving stack (and the
  test) can check that the same patches were chosen.

The legacy TorchScript exporter (``dynamo=False``) is used: it traces the eval-mode forward, top-k and gather
included, in under a second, and needs no ``onnxscript``. The file carries the class names, the normalisation and
the input size in its metadata (``metadata_props``), what a serving stack needs to prepare images.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dcal.model import DCAL
from dcal.model.dcal import fusion_branches

DEFAULT_OPSET = 17


class InferenceGraph(nn.Module):
    """The eval-mode model as a function of the images only: ``(probs | embedding[, selected])``."""

    def __init__(self, model: DCAL, fusion: str = "sa+glca", after_bn: bool = False) -> None:
        super().__init__()
        self.model = model
        self.parts = fusion_branches(fusion, model.cfg.glca_blocks)
        self.after_bn = after_bn
        if after_bn and model.cfg.task != "reid":
            raise ValueError("after_bn embeddings exist for Re-ID models only")

    @property
    def output_names(self) -> list[str]:
        main = "probs" if self.model.cfg.task == "fgvc" else "embedding"
        return [main] + (["selected"] if "glca" in self.parts else [])

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, branches=self.parts)
        if self.model.cfg.task == "fgvc":
            main = sum(out["logits"][b].softmax(-1) for b in self.parts) / len(self.parts)
        else:
            feats = out["bn_features" if self.after_bn else "features"]
            main = torch.cat([feats[b] for b in self.parts], dim=-1)
        return (main, out["selected"]) if "glca" in self.parts else (main,)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for ONNX export/checks: pip install 'dcal[onnx]'") from e


def export_onnx(
    model: DCAL,
    path: str | Path,
    *,
    fusion: str = "sa+glca",
    after_bn: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the inference graph of ``model`` to ``path`` (atomically) with a dynamic batch axis."""
    onnx = _require("onnx")
    from dcal.checkpoint import atomic_write

    graph = InferenceGraph(model.eval(), fusion, after_bn)
    h, w = model.backbone.patch_embed.img_size
    device = next(model.parameters()).device
    example = torch.randn(2, 3, h, w, device=device)  # batch 2: a batch of 1 could be specialised by the tracer
    names = graph.output_names
    axes = {n: {0: "batch"} for n in ["images", *names]}

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # the deprecation notice of the TorchScript exporter, and timm's traced shape asserts (constant here:
            # the input size is fixed by the position embedding)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(graph, (example,), tmp, dynamo=False, input_names=["images"], output_names=names,
                              dynamic_axes=axes, opset_version=opset)
        proto = onnx.load(tmp)
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    path = Path(path)
    atomic_write(path, write)
    return path


def onnx_metadata(loaded: Any, fusion: str, after_bn: bool) -> dict[str, Any]:
    """What a serving stack needs beside the graph: task, classes, input size, normalisation, config."""
    from dcal.config import to_yaml
    from dcal.data.transforms import config_mean_std

    mean, std = config_mean_std(loaded.cfg)
    return {"dcal_task": loaded.task, "classes": loaded.classes or [], "img_size": list(
        loaded.model.backbone.patch_embed.img_size), "mean": list(mean), "std": list(std), "fusion": fusion,
        "after_bn": after_bn, "dcal_config": to_yaml(loaded.cfg)}


def compare_with_onnxruntime(model: DCAL, path: str | Path, images: Tensor, fusion: str = "sa+glca",
                             after_bn: bool = False) -> dict[str, Any]:
    """Run ``path`` with onnxruntime (CPU) and the PyTorch model on ``images``: the largest absolute difference
    of the main output and whether every image selected the same set of local queries."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.detach().cpu().numpy()})
    graph = InferenceGraph(model.eval(), fusion, after_bn)
    with torch.no_grad():
        want = [t.cpu() for t in graph(images.to(next(model.parameters()).device))]
    res: dict[str, Any] = {"max_abs_diff": float((torch.from_numpy(got[0]) - want[0]).abs().max()),
                           "batch": images.shape[0]}
    if len(want) > 1:
        # the set of local queries decides the GLCA output (the mean over them, or each query for itself); its
        # order (by rollout score) can swap near-ties ~1e-10 apart, as in an untrained model's flat rollout
        got_sel, want_sel = torch.from_numpy(got[1]).sort(-1).values, want[1].sort(-1).values
        differs = (got_sel != want_sel).any(-1)
        res["same_selection"] = not bool(differs.any())
        res["images_with_other_selection"] = int(differs.sum())
        if differs.any():
            res["other_selection_only_near_ties"] = _near_ties_only(model, images[differs], got_sel[differs],
                                                                    want_sel[differs])
    return res


def _near_ties_only(model: DCAL, images: Tensor, got: Tensor, want: Tensor, rel_tol: float = 1e-5) -> bool:
    """Whether every patch that one selection has and the other lacks scores, by PyTorch's rollout, within
    ``rel_tol`` of the k-th highest score: the two runtimes then differ only in which of near-tied patches made
    the cut (float rounding), not in what the model attends to."""
    if model.cfg.query_selection == "random":
        return False
    with torch.no_grad():
        scores = model.cls_rollout(images.to(next(model.parameters()).device)).cpu()
    kth = scores.sort(-1, descending=True).values[:, got.shape[1] - 1 : got.shape[1]]
    for i in range(images.shape[0]):
        swapped = torch.tensor(sorted(set(got[i].tolist()) ^ set(want[i].tolist())), dtype=torch.long)
        if ((scores[i, swapped] - kth[i]).abs() > rel_tol * kth[i].abs()).any():
            return False
    return True
