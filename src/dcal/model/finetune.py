"""Parameter-efficient fine-tuning of the backbone: frozen first blocks (``model.freeze_blocks``) and LoRA adapters
(``model.lora``), with everything DCAL adds (GLCA blocks, their norms, heads, Re-ID necks) fully trainable.

What is frozen (``requires_grad=False``; the optimizer gets only the rest, :func:`dcal.losses.param_groups`):

* ``freeze_blocks = K >= 1``: the backbone's stem (:data:`STEM`: patch embedding, class/register tokens, position
  embedding, pre-norm: everything that feeds block 1, so that no gradient has to cross a frozen block) and its
  blocks 1..K. K = 0 freezes nothing (full fine-tuning, the default); K = depth leaves the backbone's final norm
  and head (and the GLCA stream) to train. PWCA runs the *shared* backbone blocks a second time, so its blocks
  1..K are the same frozen weights: PWCA trains exactly what SA trains. The GLCA blocks are copies of block L
  made when the model was built and are never frozen, even with K = depth.
* ``lora.rank = r >= 1``: the stem and every weight of the backbone blocks (their linear layers' base weights
  and biases, layer scales) are frozen; trainable are the LoRA factors (A: r x in, B: out x r, W' = W + (alpha/r)
  B A, peft's initialisation: B = 0, so training starts from the pretrained function) on the ``nn.Linear`` layers
  of blocks K+1..L named by ``lora.targets`` (:data:`TARGET_LINEARS`: the same names in timm's ViT and Eva
  blocks), and the normalisation layers inside those blocks (every module named ``*norm*``: norm1, norm2, q/k
  norms; 2·D values each, the usual companion of LoRA on ViTs). The backbone's final norm / fc_norm and head,
  GLCA, necks and loss weights train fully. Blocks 1..K (``freeze_blocks``) get no adapters.

The adapters come from ``peft`` (``pip install 'dcal[lora]'``, imported only when a model gets adapters), injected
with ``peft.inject_adapter_in_model``: the model stays a :class:`DCAL`, only the targeted ``nn.Linear`` modules
become ``peft.tuners.lora.Linear`` wrappers (their base layer under ``.base_layer``).

Checkpoints and inference: a training checkpoint (``last.pth``/``best.pth``) holds the whole state, adapter
factors included (``...qkv.base_layer.weight``, ``...qkv.lora_A.default.weight``, ...), so ``--resume`` restores it
as it was; the optimizer state covers the trainable tensors only (AdamW keeps no moments for frozen weights). The
weights exports (``best.safetensors``/``last.safetensors``) hold the merged weights (:func:`merged_state_dict`:
W + (alpha/r) B A), the keys of a model without adapters, so every reader of them (``dcal.load_model``, ``dcal
export``, ``model.pretrained_file``) gets a plain model, with or without peft installed; a ``.pth`` with adapter
factors is merged the same way when it is loaded for inference (:func:`plain_state`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dcal.vocabulary import LORA_TARGETS

# backbone parameters before block 1 (timm VisionTransformer / Eva attribute names)
STEM = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")
# lora.targets name -> the nn.Linear modules it covers, by their path inside a block: fused or separate q/k/v
# projections, SwiGLU's two input projections (timm Eva, ViT with mlp_layer=SwiGLU)
TARGET_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "proj": ("attn.proj",),
    "fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"),
    "fc2": ("mlp.fc2",),
}
ADAPTER = "default"  # peft's adapter name (part of the state-dict keys)
_LORA_PARTS = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")
_BASE = ".base_layer."


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the backbone blocks' linear layers (``model.lora``); ``rank`` 0 = none.

    ``dropout`` acts on the adapters' input in training. With ``train.grad_checkpointing`` the rollout's queries and
    keys are recomputed from each block's input (:func:`dcal.model.attention.sa_query_key`), which then draws its
    own dropout mask, not the forward's: the selection is made from another draw of the same training-time
    projection (with ``dropout`` 0, the default, the two paths select the same patches; tested)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scaling(self) -> float:
        """alpha / r: the factor of B A in the merged weight (peft's default scaling, no rsLoRA)."""
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora: Any) -> LoraSettings:
        """From the ``model.lora`` section of a (validated) config."""
        return cls(int(lora.rank), float(lora.alpha), float(lora.dropout), tuple(lora.targets))


def _require_peft() -> Any:
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise ImportError("model.lora needs the peft package: pip install 'dcal[lora]'") from e


def lora_target_names(blocks: nn.ModuleList, targets: tuple[str, ...], first: int = 0, prefix: str = "") -> list[str]:
    """Names (``prefix`` + ``i.attn.qkv`` ...) of the ``nn.Linear`` modules of ``blocks[first:]`` that ``targets``
    (keys of :data:`TARGET_LINEARS`) cover; a target that covers no layer of these blocks is an error."""
    unknown = sorted(set(targets) - set(TARGET_LINEARS))
    if unknown:
        raise ValueError(f"model.lora.targets: unknown {unknown}; choose from {list(TARGET_LINEARS)}")
    names = []
    for t in targets:
        found = [f"{prefix}{i}.{path}" for i in range(first, len(blocks)) for path in TARGET_LINEARS[t]
                 if isinstance(_submodule(blocks[i], path), nn.Linear)]
        if not found and first < len(blocks):
            raise ValueError(f"model.lora.targets: {t!r} ({', '.join(TARGET_LINEARS[t])}) names no nn.Linear in the "
                             f"backbone blocks ({type(blocks[first]).__name__})")
        names += found
    return sorted(names, key=lambda n: (int(n[len(prefix):].split(".")[0]), n))


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def apply_finetune(model: nn.Module, freeze_blocks: int = 0, lora: LoraSettings | None = None) -> nn.Module:
    """Freeze the stem and first ``freeze_blocks`` backbone blocks and/or add LoRA adapters (module docstring), in
    place; returns ``model``. Call it once, on a freshly built model, before its optimizer is made and before a
    checkpoint of the same settings is loaded (the adapters' keys must exist to receive their factors)."""
    blocks = model.backbone.blocks
    depth = len(blocks)
    if isinstance(freeze_blocks, bool) or not isinstance(freeze_blocks, int) or not 0 <= freeze_blocks <= depth:
        raise ValueError(f"model.freeze_blocks must be an int in [0, {depth}] (the backbone's depth), "
                         f"got {freeze_blocks!r}")
    use_lora = lora is not None and lora.rank > 0
    if getattr(model, "lora_settings", None) is not None:
        raise ValueError("apply_finetune: this model already has LoRA adapters")
    if use_lora and freeze_blocks == depth:
        raise ValueError(f"model.lora adapts the blocks after model.freeze_blocks, but freeze_blocks={depth} freezes "
                         "all of them: lower model.freeze_blocks or set model.lora.rank=0")
    if use_lora:
        peft = _require_peft()
        names = lora_target_names(blocks, lora.targets, freeze_blocks, prefix="backbone.blocks.")
        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=names, bias="none")
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.build.update(lora=lora if use_lora else None, freeze_blocks=freeze_blocks)  # read by its properties
    # peft froze every parameter of the model but the adapters: set each one by the rules above
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, freeze_blocks, use_lora))
    return model


def is_trainable(name: str, freeze_blocks: int, lora: bool) -> bool:
    """Whether parameter ``name`` (of a DCAL model) trains under ``freeze_blocks`` / LoRA (module docstring)."""
    if not name.startswith("backbone."):
        return True  # GLCA blocks and norms, GLCA head, necks
    part = name.split(".")[1]
    if part in STEM:
        return not (lora or freeze_blocks > 0)
    if part != "blocks":
        return True  # final norm, fc_norm, head
    if int(name.split(".")[2]) < freeze_blocks:
        return False
    if not lora:
        return True
    if any(s in name for s in _LORA_PARTS):
        return True
    owner = name.rsplit(".", 2)[-2] if _BASE not in name else ""
    return "norm" in owner


def trainable_summary(model: nn.Module) -> str:
    """One line: what the model's fine-tuning settings train, in parameters."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = getattr(model, "lora_settings", None)
    parts = [f"freeze_blocks={getattr(model, 'freeze_blocks', 0)}"]
    if lora is not None:
        parts.append(f"LoRA rank {lora.rank} alpha {lora.alpha:g} on {', '.join(lora.targets)}")
    return f"fine-tuning ({'; '.join(parts)}): {trained:,} of {total:,} parameters trainable"


# ------------------------------------------------------------------------------------------- merging
def has_lora_keys(keys: Any) -> bool:
    """Whether a state dict (or its keys) holds LoRA factors."""
    return any(any(s in k for s in _LORA_PARTS) for k in keys)


def plain_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of :func:`merge_lora_state`'s result: factors dropped, base layers under their own name."""
    return {k.replace(_BASE, "."): s for k, s in shapes.items() if not any(p in k for p in _LORA_PARTS)}


def merge_lora_state(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A state dict with LoRA factors -> the plain model's: each adapted layer's weight W + ``scaling`` · B A (what
    its forward adds, peft's ``merge``) under the layer's own name, the factors dropped; other tensors as they are.
    Computed in float64 and cast back, so that merging adds no rounding beyond the weight's own dtype."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if any(p in key for p in _LORA_PARTS):
            continue
        if _BASE not in key:
            out[key] = value
            continue
        layer, leaf = key.split(_BASE)
        if leaf == "weight":
            a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
            value = (value.double() + scaling * (b.double() @ a.double())).to(value.dtype)
        out[f"{layer}.{leaf}"] = value
    return out


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with any LoRA adapters merged (:func:`merge_lora_state`): the plain model's keys."""
    state = model.state_dict()
    lora = getattr(model, "lora_settings", None)
    return state if lora is None else merge_lora_state(state, lora.scaling)


def plain_state(state: dict[str, Tensor], lora: Any, source: str) -> dict[str, Tensor]:
    """A stored state for a plain model: merged with the ``model.lora`` section ``lora`` of its config when it holds
    adapter factors (a training checkpoint of a LoRA run), else unchanged."""
    if not has_lora_keys(state):
        return state
    settings = LoraSettings.from_config(lora)
    if settings.rank < 1:
        raise ValueError(f"checkpoint {source!r} holds LoRA factors but its config has model.lora.rank=0")
    # the file is untrusted: every adapted weight (out, in) needs A (r, in) and B (out, r), every factor its layer
    layers = {k.split(_BASE)[0] for k in state if k.endswith(f"{_BASE}weight")}
    layers |= {k.split(p)[0] for k in state for p in _LORA_PARTS if p in k}
    for layer in sorted(layers):
        w, a, b = (state.get(f"{layer}{part}weight") for part in (_BASE, *_LORA_PARTS))
        shapes = [None if t is None else tuple(t.shape) for t in (w, a, b)]
        if None in shapes or len(shapes[0]) != 2 or shapes[1] != (settings.rank, shapes[0][1]) or \
                shapes[2] != (shapes[0][0], settings.rank):
            raise ValueError(f"checkpoint {source!r}: LoRA layer {layer!r} has weight, A, B of shapes {shapes}; "
                             f"expected (out, in), ({settings.rank}, in), (out, {settings.rank}) (model.lora.rank="
                             f"{settings.rank} in its config)")
    return merge_lora_state(state, settings.scaling)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters into the weights, in place: every LoRA wrapper is replaced by its base ``nn.Linear``
    holding W + (alpha/r) B A; returns ``model`` (for export or inference of a model fine-tuned in Python)."""
    if getattr(model, "lora_settings", None) is None:
        return model
    state = merged_state_dict(model)
    wrapped = [(n, m) for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    for name, module in wrapped:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, module.base_layer)
    model.load_state_dict(state)
    model.build["lora"] = None
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, getattr(model, "freeze_blocks", 0), False))
    return model


def finetune_from_config(model: nn.Module, model_cfg: Any) -> nn.Module:
    """:func:`apply_finetune` with a config's ``model.freeze_blocks`` and ``model.lora``."""
    return apply_finetune(model, int(model_cfg.freeze_blocks), LoraSettings.from_config(model_cfg.lora))
