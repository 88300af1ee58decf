"""The DCAL model: one timm Vision Transformer, three streams (SA, GLCA, PWCA), as docs/design.md reads them.

Read top to bottom:

* ``DCALConfig`` – the method's hyper-parameters (task, R, M, T, query selection, pairing).
* ``DCAL`` – wraps a timm ``VisionTransformer`` (``model.backbone``, unchanged: for FGVC the SA stream *is* it,
  norm and head included) and adds
    - GLCA (Eq. 3): M blocks, each a copy of SA block L, run in parallel with block L on its input x_(L-1);
      queries = the top ⌈R·N⌉ patches by attention rollout (Eq. 2), keys/values = all tokens of x_(L-1); own
      final norm and head; the GLCA feature is the mean of the local queries' normed outputs (docs/design.md, GLCA).
    - PWCA (Eq. 4): a second pass through the *shared* SA blocks in training only, where each image's queries
      attend over its own and a distractor's keys/values (same stream, same layer); SA's norm and head.
* ``create_model`` – builds the timm backbone (hub tag or local checkpoint) and the DCAL wrapper.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dcal.checkpoint import check_finite, check_torch_archive, first_line
from dcal.model import fused_rollout
from dcal.model.attention import (
    attention_probs,
    glca_block,
    pwca_block,
    q_and_kv,
    qkv,
    sa_block,
    sa_block_keep_qk,
    sa_block_mean_probs,
    sa_block_with_probs,
    sa_query_key,
)
from dcal.model.backbone import (
    Backbone,
    block_rope,
    check_backbone,
    embed,
    gather_rope,
    pooled_feature,
    pooling_weights,
    uniform_weights,
)
from dcal.model.heads import BNNeck
from dcal.model.pairs import sample_pairs
from dcal.model.rollout import QueryKey, attention_row, num_local_queries, rollout_row, select_top
from dcal.vocabulary import DEFAULT_TOP_R, FUSIONS, GLCA_POOLS, PAIR_STRATEGIES, PRECISIONS, QUERY_SELECTIONS, TASKS

# timm.create_model arguments that read a file or the network (timm <= 1.0.25 reads checkpoint_path with
# torch.load(weights_only=False), which runs the file's code); dcal loads weights itself (pretrained_file)
TIMM_LOADING_KWARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


@dataclass
class DCALConfig:
    """Hyper-parameters of the method (the backbone's own live in timm).

    Attributes:
        task: ``fgvc`` (linear heads, cross-entropy) or ``reid`` (BNNeck heads, CE + triplet).
        num_classes: classes (FGVC) or training identities (Re-ID).
        top_r: R, the fraction of patch tokens used as GLCA local queries (⌈R·N⌉ of them).
        glca_blocks: M; 0 switches GLCA off.
        pwca_blocks: T; blocks 1..T are pair-wise in the PWCA stream, T+1..L plain; 0 switches PWCA off.
        query_selection: ``rollout`` (Eq. 2), ``random``, or ``last_layer`` (the CLS attention of SA block L
            alone, without accumulation: the paper's "penultimate layer only" ablation).
        pair_strategy: ``random`` | ``intra`` | ``inter`` | ``mix`` | ``noise`` (see ``dcal.model.pairs``).
        glca_pool: how the GLCA feature is read (docs/design.md, GLCA). ``mean`` (default): the queries are the ⌈R·N⌉
            selected patch tokens and the feature is the mean of their normed GLCA outputs, so the selection
            shapes the feature. ``cls``: the earlier reading, the CLS token joins the queries and its output is
            the feature; each query's output depends only on itself and the global keys/values, so there the
            selection provably changes nothing (kept for comparison and for checkpoints trained that way).
    """

    task: str = "fgvc"
    num_classes: int = 1000
    top_r: float | None = None
    glca_blocks: int = 1
    pwca_blocks: int = 12
    query_selection: str = "rollout"
    pair_strategy: str = "random"
    glca_pool: str = "mean"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.top_r is None:
            self.top_r = DEFAULT_TOP_R[self.task]
        if not 0.0 < self.top_r <= 1.0:
            raise ValueError(f"top_r (R) must be in (0, 1], got {self.top_r}")
        if self.glca_blocks < 0 or self.pwca_blocks < 0:
            raise ValueError(f"glca_blocks and pwca_blocks must be >= 0, got {self.glca_blocks}, {self.pwca_blocks}")
        if self.query_selection not in QUERY_SELECTIONS:
            raise ValueError(f"query_selection must be one of {QUERY_SELECTIONS}, got {self.query_selection!r}")
        if self.pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"pair_strategy must be one of {PAIR_STRATEGIES}, got {self.pair_strategy!r}")
        if self.glca_pool not in GLCA_POOLS:
            raise ValueError(f"glca_pool must be one of {GLCA_POOLS}, got {self.glca_pool!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


class DCAL(nn.Module):
    """Dual cross-attention learning around a timm ViT with a class token.

    Train mode: ``model(images, pairs=None, targets=None)`` returns a dict with ``logits`` and ``features``
    (per branch ``sa``, ``glca``, ``pwca``: the normed CLS feature for SA and PWCA; for GLCA the mean of the
    local queries' normed outputs, or its CLS output with ``glca_pool='cls'``), ``selected`` (indices into the N patch
    tokens of the GLCA local queries, (B, ⌈R·N⌉)), ``pairs`` and, for Re-ID, ``bn_features`` (BNNeck outputs;
    ``logits`` are then the BNNeck classifier's). Eval mode: the same without PWCA; see :meth:`predict`,
    :meth:`embed` and :meth:`cls_rollout`.
    """

    def __init__(self, backbone: Backbone, cfg: DCALConfig, build: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_backbone(backbone)
        depth = len(backbone.blocks)
        if cfg.pwca_blocks > depth:
            raise ValueError(f"pwca_blocks (T) = {cfg.pwca_blocks} exceeds the backbone's {depth} blocks")
        if cfg.glca_pool == "cls" and backbone.cls_token is None:
            raise ValueError("glca_pool='cls' reads the GLCA output of the class token; this backbone has none "
                             "(use glca_pool='mean')")
        self.cfg = cfg
        # how the model was built: create_model's timm name, patch stride and timm arguments (what model_config
        # returns), apply_finetune's frozen blocks and LoRA settings; read through the properties below
        self.build = dict(build or {})
        self.backbone = backbone
        self.grad_checkpointing = False
        dim = backbone.embed_dim

        if cfg.task == "reid" and backbone.num_classes != 0:
            backbone.reset_classifier(0)  # Re-ID classifies after the BNNeck, not with timm's head
        if cfg.task == "fgvc" and backbone.num_classes != cfg.num_classes:
            backbone.reset_classifier(cfg.num_classes)

        # GLCA: M copies of SA block L (a clean start: at initialisation each local query's output equals SA
        # block L's output at that token), own norm and head.
        self.glca_blocks = nn.ModuleList(copy.deepcopy(backbone.blocks[-1]) for _ in range(cfg.glca_blocks))
        if cfg.glca_blocks:
            self.glca_norm = copy.deepcopy(backbone.norm)
            self.glca_fc_norm = copy.deepcopy(backbone.fc_norm)
            if cfg.task == "fgvc":
                self.glca_head = copy.deepcopy(backbone.head)
        if cfg.task == "reid":
            self.sa_neck = BNNeck(dim, cfg.num_classes)
            if cfg.glca_blocks:
                self.glca_neck = BNNeck(dim, cfg.num_classes)

    # ----------------------------------------------------------------------------------------------- info
    @property
    def branches(self) -> tuple[str, ...]:
        """Branches that produce a training loss, in order."""
        return ("sa",) + (("glca",) if self.cfg.glca_blocks else ()) + (("pwca",) if self.cfg.pwca_blocks else ())

    @property
    def num_patches(self) -> int:
        return self.backbone.patch_embed.num_patches

    @property
    def backbone_name(self) -> str | None:
        """The timm name the backbone was created from (None for a backbone built outside :func:`create_model`)."""
        return self.build.get("backbone")

    @property
    def patch_stride(self) -> int | None:
        """The overlapping patch embedding's stride (:func:`set_patch_stride`), None for the standard split."""
        return self.build.get("patch_stride")

    @property
    def freeze_blocks(self) -> int:
        """How many backbone blocks (after the frozen stem) :func:`dcal.model.finetune.apply_finetune` froze."""
        return self.build.get("freeze_blocks", 0)

    @property
    def lora_settings(self) -> Any:
        """The LoRA adapters' settings (:class:`dcal.model.finetune.LoraSettings`), None without adapters."""
        return self.build.get("lora")

    @property
    def num_prefix_tokens(self) -> int:
        """P: the class token (if any) and the registers, ahead of the N patch tokens."""
        return self.backbone.num_prefix_tokens

    @property
    def num_local_queries(self) -> int:
        return num_local_queries(self.cfg.top_r, self.num_patches)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def train(self, mode: bool = True) -> DCAL:
        """``nn.Module.train``; entering train mode also drops the inference workspace (:meth:`release_workspace`)."""
        if mode:
            self.release_workspace()
        return super().train(mode)

    def release_workspace(self) -> None:
        """Free the CPU inference workspace (:meth:`_workspace`: the SA blocks' head-mean attention maps, L·B·T²
        floats of the largest batch seen, or their qkv projections); the next CPU inference allocates it again."""
        self.__dict__.pop("_kept_workspace", None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (SA, GLCA and PWCA streams) to save memory."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------------------------------- streams
    def _run(self, fn: Any, *args: Any) -> Any:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """timm's steps before the blocks: the (B, T, D) tokens and, for rotary backbones, the patches' phases."""
        return embed(self.backbone, images)

    @contextlib.contextmanager
    def _workspace(self, x: Tensor, need_attn: bool) -> Iterator[tuple[str, Tensor] | None]:
        """CPU inference with the rollout: memory the SA blocks write into, kept on the model between calls; None
        elsewhere (under autograd, autocast, FLOP counting, tracing, ``torch.compile``, on CUDA).

        With the compiled kernels and float32 tokens, ``("maps", (L, ≥B·T·T))``: each block's head-mean
        probabilities, written by the one-pass attention (:func:`sa_block_mean_probs`). Otherwise, with a plain
        fused qkv Linear, ``("qkv", (L, ≥B·T, 3D))``: the qkv projections, from which the rollout recomputes the
        scores in tiles. The rollout reads every block's share after the SA stream, so L of them are alive at once;
        allocated afresh on every call they would be fresh pages each time, whose page faults show in inference
        time (benchmarks/README.md). The workspace is taken off the model while in use, so two threads never
        share one (the second allocates its own); it is put back afterwards, grown to the largest batch seen, and
        dropped by ``train()`` and :meth:`release_workspace`.
        """
        blocks = self.backbone.blocks
        qkv_proj = getattr(blocks[0].attn, "qkv", None)
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        use = (need_attn and x.device.type == "cpu" and not torch.is_grad_enabled()
               and all(b.attn.fused_attn for b in blocks) and not torch.is_autocast_enabled("cpu") and not tracing)
        dropout = any(b.attn.training and b.attn.attn_drop.p > 0 for b in blocks)
        B, T = x.shape[:2]
        if use and x.dtype == torch.float32 and not dropout and fused_rollout.available():
            kind, rows, width = "maps", B * T * T, 1
        elif use and isinstance(qkv_proj, nn.Linear):
            kind, rows, width = "qkv", B * T, qkv_proj.out_features
        else:
            yield None
            return
        depth = len(blocks)
        kept = self.__dict__.pop("_kept_workspace", None)
        ws = kept[1] if kept is not None and kept[0] == kind else None
        if ws is None or ws.dtype != x.dtype or ws.shape[1] < rows or ws.shape[::2] != (depth, width):
            ws = torch.empty(depth, rows, width, dtype=x.dtype, device=x.device)
        try:
            yield kind, ws
        finally:
            self.__dict__["_kept_workspace"] = (kind, ws)

    def _sa_stream(
        self, x: Tensor, rope: Tensor | None, need_attn: bool, workspace: tuple[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Sequence[Tensor | QueryKey]]:
        """SA blocks 1..L. Returns x_(L-1) (GLCA's input), x_L, and, if asked, what the rollout needs of each
        block's head-averaged attention S_1 … S_L.

        CPU inference with the compiled kernels (``workspace`` of kind ``maps``, :meth:`_workspace`): each block's
        attention computes its output and S_i (B, T, T) from one QKᵀ (:func:`sa_block_mean_probs`), and the
        rollout multiplies its row by the stored maps. Elsewhere every block runs timm's fused attention (the same
        ops as ``Block.forward``, so SA is the backbone) and hands out its queries and keys (:class:`QueryKey`);
        the rollout then applies each S_i to its row vector in tiles of query rows, so the L (B, H, T, T)
        probability tensors are never written (benchmarks/README.md); a ``qkv`` workspace is where block i writes
        its qkv projection, row i. With gradient checkpointing only the block inputs (kept by the checkpoints
        anyway) are stored and the queries/keys are recomputed, one block at a time, when the rollout reads them.
        A block whose ``fused_attn`` is off (:func:`explicit_attention`, FLOP counting) computes S explicitly, one
        softmax for output and S, block L its class-token row only where the rollout starts from it.
        """
        blocks = self.backbone.blocks
        explicit = [need_attn and not blk.attn.fused_attn for blk in blocks]
        recompute = (need_attn and not any(explicit) and self.grad_checkpointing and self.training
                     and torch.is_grad_enabled())
        kind, ws = workspace if workspace is not None else (None, None)
        B, T = x.shape[:2]
        token_row = self.backbone.global_pool == "token"
        attentions: list[Tensor | QueryKey] = []
        x_prev = x
        for i, blk in enumerate(blocks):
            x_prev = x
            r = block_rope(self.backbone, rope, i)
            if explicit[i]:
                x, attn = self._run(sa_block_with_probs, blk, x, token_row and i == len(blocks) - 1, r)
            elif need_attn and kind == "maps":
                x, attn = sa_block_mean_probs(blk, x, ws[i, : B * T * T].view(B, T, T), r)
            elif need_attn and not recompute:
                x, attn = sa_block_keep_qk(blk, x, ws[i] if kind == "qkv" else None, r)
            else:
                attn = x  # the block input (recompute) or nothing needed
                x = self._run(sa_block, blk, x, r)
            if need_attn:
                attentions.append(attn)
        if recompute:
            return x_prev, x, _RecomputedQueryKey(self.backbone, attentions, rope)
        return x_prev, x, attentions

    def _scores(self, attentions: Sequence[Tensor | QueryKey], x: Tensor, selection: str) -> Tensor:
        """Per-patch scores (B, N) of a selection (``rollout`` or ``last_layer``) from the SA blocks' attention and
        the last block's tokens x (B, T, D) (attention pooling reads its row from them)."""
        start = pooling_weights(self.backbone, x)
        row = rollout_row(attentions, start) if selection == "rollout" else attention_row(attentions[-1], start)
        return row[:, self.num_prefix_tokens:]

    def _select(self, attentions: Sequence[Tensor | QueryKey], x: Tensor) -> Tensor:
        """GLCA's local queries: the top ⌈R·N⌉ patches (B, k) by the configured selection; prefix tokens never."""
        k, n = self.num_local_queries, self.num_patches
        if self.cfg.query_selection == "random":
            scores = torch.rand(x.shape[0], n, device=x.device)
        else:
            scores = self._scores(attentions, x, self.cfg.query_selection)
        return select_top(scores, k)

    def glca_queries(self, x_prev: Tensor, selected: Tensor) -> Tensor:
        """GLCA's query tokens taken from x_(L-1): the selected patches (B, k, D), preceded by the class token with
        ``glca_pool='cls'`` (B, 1+k, D). ``selected`` indexes the N patch tokens (prefix tokens excluded)."""
        dim = x_prev.shape[-1]
        local = torch.gather(x_prev, 1, (selected + self.num_prefix_tokens).unsqueeze(-1).expand(-1, -1, dim))
        return torch.cat([x_prev[:, :1], local], dim=1) if self.cfg.glca_pool == "cls" else local

    def _glca_stream(self, x_prev: Tensor, selected: Tensor, rope: Tensor | None = None) -> Tensor:
        """M GLCA blocks (Eq. 3): the query tokens attend over all T tokens of x_(L-1) (registers included); block
        m > 1 takes block m-1's output tokens as queries and the same x_(L-1) as keys/values. Rotary phases: those
        of SA block L (each GLCA block is its copy), each local query its own patch's. Returns the query outputs."""
        q = self.glca_queries(x_prev, selected)
        phases = self._glca_rope(rope, selected)
        for blk in self.glca_blocks:
            q = self._run(glca_block, blk, q, x_prev, *phases)
        return q

    def _glca_rope(self, rope: Tensor | None, selected: Tensor) -> tuple[Tensor | None, Tensor | None, int]:
        """GLCA's rotary arguments: SA block L's phases for the keys (each GLCA block is its copy), the selected
        patches' own phases for the local queries, and the number of query tokens without a phase (the class
        token with ``glca_pool='cls'``)."""
        r = block_rope(self.backbone, rope, len(self.backbone.blocks) - 1)
        return r, gather_rope(r, selected), int(self.cfg.glca_pool == "cls")

    def _pwca_stream(self, x: Tensor, rope: Tensor | None, pairs: Tensor | None) -> Tensor:
        """Second pass through the shared SA blocks; blocks 1..T pair-wise (Eq. 4), T+1..L self-attention."""
        noise = self.cfg.pair_strategy == "noise"
        for i, blk in enumerate(self.backbone.blocks):
            r = block_rope(self.backbone, rope, i)
            if i < self.cfg.pwca_blocks:
                x = self._run(pwca_block, blk, x, pairs, noise, r)
            else:
                x = self._run(sa_block, blk, x, r)
        return x

    # ------------------------------------------------------------------------------------------ heads
    def _head(self, branch: str, tokens: Tensor, out: dict[str, Any]) -> None:
        """The branch's feature and classifier (PWCA uses SA's). SA/PWCA: the backbone's own pooled feature (class
        token, patch mean or attention pooling, with its norms). GLCA: its own final norm on every output token
        (as the backbone's norm is applied), then the mean over the local queries (``glca_pool='mean'``) or the
        class token's output (``'cls'``), then its own ``fc_norm``."""
        bb = self.backbone
        if branch == "glca":
            if self.cfg.glca_pool == "mean":
                feature = self.glca_fc_norm(self.glca_norm(tokens).mean(dim=1))
            else:
                feature = self.glca_fc_norm(self.glca_norm(tokens[:, 0]))
        else:
            feature = pooled_feature(bb, tokens)
        out["features"][branch] = feature
        if self.cfg.task == "fgvc":
            head = self.glca_head if branch == "glca" else bb.head
            out["logits"][branch] = head(bb.head_drop(feature))
        else:
            neck = self.glca_neck if branch == "glca" else self.sa_neck
            bn_feature, logits = neck(feature, update_stats=branch != "pwca")
            out["bn_features"][branch] = bn_feature
            out["logits"][branch] = logits

    def forward(
        self,
        images: Tensor,
        pairs: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        branches: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Run the streams. PWCA runs only in train mode.

        Args:
            images: (B, 3, H, W).
            pairs: (B,) long tensor, image i paired with ``pairs[i]``; None draws one per
                ``cfg.pair_strategy`` (a fresh derangement by default).
            targets: (B,) class ids; needed only by the ``intra``/``inter``/``mix`` pair strategies.
            branches: restrict to a subset of {"sa", "glca", "pwca"} (e.g. ``("sa",)`` for fast SA inference).
        """
        wanted = set(self.branches if branches is None else branches)
        use_glca = "glca" in wanted and self.cfg.glca_blocks > 0
        use_pwca = "pwca" in wanted and self.cfg.pwca_blocks > 0 and self.training
        out: dict[str, Any] = {"logits": {}, "features": {}}
        if self.cfg.task == "reid":
            out["bn_features"] = {}

        x0, rope = self._embed(images)
        need_attn = use_glca and self.cfg.query_selection != "random"
        with self._workspace(x0, need_attn) as workspace:
            x_prev, x, attentions = self._sa_stream(x0, rope, need_attn, workspace)
            selected = self._select(attentions, x) if use_glca else None
            del attentions  # queries/keys (inference) or block-input references: not needed any more
        self._head("sa", x, out)
        if selected is not None:
            self._head("glca", self._glca_stream(x_prev, selected, rope), out)
            out["selected"] = selected
        if use_pwca:
            if self.cfg.pair_strategy == "noise":
                pairs = None
            elif pairs is None:
                pairs = sample_pairs(self.cfg.pair_strategy, images.shape[0], targets, images.device)
            else:
                pairs = _check_pairs(pairs, images.shape[0], images.device)
            self._head("pwca", self._pwca_stream(x0, rope, pairs), out)
            out["pairs"] = pairs
        return out

    # ------------------------------------------------------------------------------------- inference
    def predict(self, images: Tensor, fusion: str = "sa+glca") -> Tensor:
        """FGVC class scores: softmax(SA) + softmax(GLCA) (the paper sums probabilities), or one branch's."""
        if self.cfg.task != "fgvc":
            raise ValueError("predict() is for FGVC models; use embed() for Re-ID")
        parts = fusion_branches(fusion, self.cfg.glca_blocks)
        logits = self.forward(images, branches=parts)["logits"]
        return sum(logits[b].softmax(dim=-1) for b in parts)

    def embed(self, images: Tensor, fusion: str = "sa+glca", after_bn: bool = False, flip: bool = False) -> Tensor:
        """Re-ID embedding: the concatenated features of the ``fusion`` branches (SA, GLCA; before the BNNeck by
        default). ``flip`` (``eval.flip``): averaged, in float32, with the embedding of the mirrored images; the
        one flip-averaged embedding that evaluation, ``dcal embed`` and ``dcal search`` use."""
        if flip:
            f = self.embed(images, fusion, after_bn).float()
            return 0.5 * (f + self.embed(images.flip(3), fusion, after_bn).float())
        parts = fusion_branches(fusion, self.cfg.glca_blocks)
        out = self.forward(images, branches=parts)
        key = "bn_features" if after_bn else "features"
        if key not in out:
            raise ValueError("after_bn embeddings exist for Re-ID models only")
        return torch.cat([out[key][b] for b in parts], dim=-1)

    def selection_scores(self, images: Tensor, selection: str = "rollout") -> Tensor:
        """Per-patch scores (B, N) that rank GLCA's local queries: the pooled feature's row of the attention
        rollout (``'rollout'``, Eq. 2) or of the last SA block alone (``'last_layer'``), over the N patches."""
        return self.scores_by_selection(images, (selection,))[selection]

    @torch.no_grad()
    def scores_by_selection(self, images: Tensor,
                            selections: Sequence[str] = ("rollout", "last_layer")) -> dict[str, Tensor]:
        """:meth:`selection_scores` of several selections from one SA pass: selection -> (B, N)."""
        bad = [s for s in selections if s not in ("rollout", "last_layer")]
        if bad:
            raise ValueError(f"selection must be 'rollout' or 'last_layer', got {bad[0]!r}")
        x0, rope = self._embed(images)
        with self._workspace(x0, need_attn=True) as workspace:
            _, x, attentions = self._sa_stream(x0, rope, True, workspace)
            return {s: self._scores(attentions, x, s) for s in selections}

    def cls_rollout(self, images: Tensor) -> Tensor:
        """The rollout's patch scores (B, N): :meth:`selection_scores` (kept under its first name)."""
        return self.selection_scores(images)

    @torch.no_grad()
    def glca_attention(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The first GLCA block's attention: the selected patches (B, k) and the head-averaged probabilities of
        its queries over the T tokens of x_(L-1), (B, q, T) (q = k, or 1 + k with ``glca_pool='cls'``)."""
        if not self.cfg.glca_blocks:
            raise ValueError("the model has no GLCA block (glca_blocks=0)")
        x0, rope = self._embed(images)
        need_attn = self.cfg.query_selection != "random"
        with self._workspace(x0, need_attn) as workspace:
            x_prev, x, attentions = self._sa_stream(x0, rope, need_attn, workspace)
            selected = self._select(attentions, x)
        blk = self.glca_blocks[0]
        q, k, _ = q_and_kv(blk.attn, blk.norm1(self.glca_queries(x_prev, selected)), blk.norm1(x_prev),
                           *self._glca_rope(rope, selected))
        return selected, attention_probs(blk.attn, q, k).mean(dim=1)

    @torch.no_grad()
    def pwca_attention(self, images: Tensor, pairs: Tensor, query_weights: Tensor | None = None) -> list[Tensor]:
        """The PWCA stream's attention for the pairing ``pairs`` (B,), per pair-wise block: the head-averaged
        probabilities (B, 2T) of the pooled feature's query over [own tokens; distractor's tokens]. The query is
        the class token's, or the mean over the rows ``query_weights`` (B, T) weighs (default: the patch mean, for
        backbones pooled without a class token). Runs in the model's current mode."""
        if not self.cfg.pwca_blocks:
            raise ValueError("the model has no PWCA block (pwca_blocks=0)")
        pairs = _check_pairs(pairs, images.shape[0], images.device)
        x, rope = self._embed(images)
        rows: list[Tensor] = []
        for i, blk in enumerate(self.backbone.blocks[: self.cfg.pwca_blocks]):
            r = block_rope(self.backbone, rope, i)
            q, k, _ = qkv(blk.attn, blk.norm1(x), r)
            keys = torch.cat([k, k[pairs]], dim=2)
            if query_weights is None and self.backbone.cls_token is not None:
                rows.append(attention_probs(blk.attn, q[:, :, :1], keys).mean(dim=1)[:, 0])  # the CLS row alone
            else:
                w = query_weights if query_weights is not None else uniform_weights(x.shape[0], x.shape[1],
                                                                                    self.num_prefix_tokens, x.device)
                # the weighted mean of the rows, PWCA_QUERY_TILE query rows at a time: memory bounded by a tile
                # of probabilities (B, H, tile, 2T), never the whole (B, H, T, 2T) that fused training avoids
                row = 0
                for s in range(0, q.shape[2], PWCA_QUERY_TILE):
                    probs = attention_probs(blk.attn, q[:, :, s:s + PWCA_QUERY_TILE], keys).mean(dim=1)
                    row = row + torch.bmm(w[:, None, s:s + PWCA_QUERY_TILE].to(probs.dtype), probs).squeeze(1)
                rows.append(row)
            x = pwca_block(blk, x, pairs, False, r)
        return rows


# ------------------------------------------------------------------------------------------- helpers
PWCA_QUERY_TILE = 256  # query rows of PWCA's probabilities held at once by pwca_attention (a memory bound)


class _RecomputedQueryKey(Sequence[QueryKey]):
    """Queries and keys of the SA blocks, each recomputed (no grad) from its block input when indexed."""

    def __init__(self, backbone: Backbone, inputs: list[Tensor], rope: Tensor | None) -> None:
        self.backbone, self.inputs, self.rope = backbone, inputs, rope

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> QueryKey:  # type: ignore[override]
        i = range(len(self))[i]
        return sa_query_key(self.backbone.blocks[i], self.inputs[i], block_rope(self.backbone, self.rope, i))


def _check_pairs(pairs: Tensor, batch: int, device: torch.device) -> Tensor:
    pairs = torch.as_tensor(pairs, device=device)
    if pairs.shape != (batch,) or pairs.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pairs must be an integer tensor of shape ({batch},), got {tuple(pairs.shape)} {pairs.dtype}")
    # a value check reads the tensor: under torch.compile that is a graph break in every forward (the training loop
    # makes its pairs itself, so the compiled path skips it)
    if not torch.compiler.is_compiling() and bool(((pairs < 0) | (pairs >= batch)).any()):
        raise ValueError(f"pairs must index the batch (0..{batch - 1}), got values {pairs.tolist()}")
    return pairs.long()


def fusion_branches(fusion: str, glca_blocks: int) -> tuple[str, ...]:
    """Branches whose outputs ``fusion`` combines; ``sa+glca`` on a model without GLCA is its SA branch."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if "glca" in fusion and not glca_blocks:
        if fusion == "glca":
            raise ValueError("fusion 'glca' needs a model with glca_blocks >= 1")
        return ("sa",)  # an SA-only model: its SA prediction is the whole prediction
    return tuple(fusion.split("+"))


# -------------------------------------------------------------------------------------- construction
def create_model(
    backbone: str,
    *,
    task: str = "fgvc",
    num_classes: int,
    img_size: int | tuple[int, int] = 224,
    top_r: float | None = None,
    glca_blocks: int = 1,
    pwca_blocks: int = 12,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    query_selection: str = "rollout",
    pair_strategy: str = "random",
    glca_pool: str = "mean",
    patch_stride: int | None = None,
    **timm_kwargs: Any,
) -> DCAL:
    """Build a DCAL model on the timm ViT ``backbone`` (any with a class token).

    ``pretrained=True`` loads timm's weights for the name (e.g. ``vit_base_patch16_224.augreg_in21k``);
    ``pretrained_file`` loads a local timm-format checkpoint (.pth/.bin/.safetensors, or .npz for the
    big_vision/JAX ViTs) with the position embedding resampled to ``img_size`` and the classifier dropped.
    ``patch_stride`` below the patch size gives TransReID's overlapping patch embedding (docs/design.md,
    Overlapping patches; see :func:`set_patch_stride`); pretrained weights are then loaded after the change, so
    the position embedding is resampled once, straight from the checkpoint's grid to the overlapping one.
    ``glca_pool``: see :class:`DCALConfig`. Extra keyword arguments go to ``timm.create_model`` (e.g.
    ``drop_path_rate``; ``depth``/``embed_dim`` for tiny test models), except those that make timm read a file
    (``checkpoint_path``, ``pretrained_cfg``, ...: timm may unpickle it; use ``pretrained_file``). Configs restrict
    them further (``dcal.config.TIMM_KWARGS``).
    """
    if pretrained and pretrained_file:
        raise ValueError("give either pretrained=True (timm hub weights) or pretrained_file=PATH, not both")
    loading = sorted(set(timm_kwargs) & TIMM_LOADING_KWARGS)
    if loading:
        raise ValueError(f"timm arguments {loading} make timm read files (possibly unpickling them); "
                         "use pretrained_file=PATH (read as weights only) instead")
    cfg = DCALConfig(
        task=task,
        num_classes=num_classes,
        top_r=top_r,
        glca_blocks=glca_blocks,
        pwca_blocks=pwca_blocks,
        query_selection=query_selection,
        pair_strategy=pair_strategy,
        glca_pool=glca_pool,
    )
    img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
    strided = patch_stride is not None
    if timm_kwargs.get("dynamic_img_size"):
        raise ValueError("dynamic_img_size=True is not supported: DCAL needs a fixed img_size (N and ⌈R·N⌉ are fixed "
                         "for training, export and batching)")
    fixed = _fix_image_size(backbone, timm_kwargs)
    try:
        vit = timm.create_model(
            backbone,
            pretrained=pretrained and not strided,
            num_classes=num_classes if task == "fgvc" else 0,
            img_size=img_size,
            **fixed,
        )
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:  # unknown name, bad argument, width/heads
        args = f" with {timm_kwargs}" if timm_kwargs else ""
        raise ValueError(f"timm could not build {backbone!r}{args}: {first_line(e)}") from e
    if strided:
        set_patch_stride(vit, patch_stride)
        if pretrained:  # timm's own hub loading, now that the grid is the overlapping one
            filter_fn = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
            timm.models.load_pretrained(vit, pretrained_cfg=vit.pretrained_cfg, num_classes=vit.num_classes,
                                        filter_fn=filter_fn)
    if pretrained_file is not None:
        load_pretrained_file(vit, pretrained_file)
    build = {"backbone": backbone, "patch_stride": patch_stride, "timm_kwargs": {"img_size": img_size, **timm_kwargs}}
    return DCAL(vit, cfg, build)


def _fix_image_size(backbone: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``timm_kwargs`` with ``dynamic_img_size=False``, saying so where the architecture defaults to dynamic sizes
    (DINOv3): DCAL needs N fixed at creation. Other families than VisionTransformer and Eva are refused here.

    The architecture is read from a parameter-free build on the meta device (no memory, no weights)."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(backbone, pretrained=False, **timm_kwargs)
    except Exception:  # noqa: BLE001 - the real build below reports what is wrong
        return timm_kwargs
    if not isinstance(probe, (VisionTransformer, Eva)):  # before img_size= makes timm fail less clearly
        raise TypeError(f"backbone {backbone!r}: DCAL needs a timm VisionTransformer or Eva, "
                        f"got {type(probe).__name__}")
    if probe.dynamic_img_size:
        warnings.warn(f"{backbone}: built with dynamic_img_size=False (its default is True): DCAL needs a fixed "
                      "img_size", UserWarning, stacklevel=3)
    if "dynamic_img_size" in timm_kwargs:
        return timm_kwargs
    return {**timm_kwargs, "dynamic_img_size": False}


def set_patch_stride(vit: VisionTransformer, stride: int) -> None:
    """TransReID's overlapping patch embedding (docs/design.md, Overlapping patches): the same patch kernel (and
    its weights) slid with ``stride`` < patch size, no padding, so the grid is ((H - p) // s + 1,
    (W - p) // s + 1): 21x10 at 256x128 and 21x21 at 256x256 with p = 16, s = 12. The position embedding is
    resampled (bicubic, CLS kept) to that grid, as timm does for a new image size; weights loaded afterwards are
    resampled to it by timm's filter."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"patch_stride is supported for timm VisionTransformer backbones only, not "
                         f"{type(vit).__name__} (its rotary phases are built for the standard patch grid)")
    pe = vit.patch_embed
    ph, pw = pe.patch_size
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= min(ph, pw):
        raise ValueError(f"patch_stride must be an int in [1, {min(ph, pw)}] (the patch size), got {stride!r}")
    if pe.img_size is None:
        raise ValueError("patch_stride needs a backbone with a fixed img_size")
    h, w = pe.img_size
    grid = ((h - ph) // stride + 1, (w - pw) // stride + 1)
    old_grid = tuple(pe.grid_size)
    pe.proj.stride = (stride, stride)
    pe.grid_size, pe.num_patches = grid, grid[0] * grid[1]
    if vit.pos_embed is not None and grid != old_grid:
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        with torch.no_grad():
            pos = resample_abs_pos_embed(vit.pos_embed.data, new_size=grid, old_size=old_grid,
                                         num_prefix_tokens=prefix)
        vit.pos_embed = nn.Parameter(pos)


def load_pretrained_file(vit: VisionTransformer, path: str | Path) -> None:
    """Load a local timm-format ViT checkpoint into ``vit``: resample position embeddings to the model's grid,
    drop the classifier (it belongs to the pre-training task), and fail loudly on any other mismatch. A dcal
    checkpoint (keys ``backbone.*``) gives its backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist")
    if path.suffix == ".npz":
        # big_vision / original JAX checkpoints: timm's own reader (resamples pos_embed itself); it reads them with
        # np.load's default allow_pickle=False, so an .npz cannot run code either
        try:
            vit.load_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"pretrained_file {str(path)!r}: not a big_vision/JAX ViT .npz of this backbone "
                             f"({first_line(e)})") from e
        check_finite(vit.state_dict(), f"pretrained_file {str(path)!r}")
        _reset_head(vit)
        return
    if path.suffix != ".safetensors":
        check_torch_archive(path, "pretrained_file", require_zip=False)  # older .pth formats are left to torch
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise TypeError("it holds no mapping of names to tensors")
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"pretrained_file {str(path)!r}: could not read a state dict ({first_line(e)})") from e
    check_finite(state, f"pretrained_file {str(path)!r}")
    if any(k.startswith("backbone.") for k in state):  # a dcal checkpoint: keep only the backbone
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    filter_fn = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, vit)
        except Exception as e:  # noqa: BLE001 - timm's filter on a checkpoint of another shape
            raise ValueError(f"pretrained_file {str(path)!r} does not match the backbone ({first_line(e)})") from e
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    own = vit.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("head")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"pretrained_file {str(path)!r} does not match the backbone (another width, depth or patch size?): "
            f"missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}, "
            f"shapes (file vs model) {shapes[:4]}{'…' if len(shapes) > 4 else ''}"
        )
    vit.load_state_dict(state, strict=False)
    _reset_head(vit)


def _reset_head(vit: VisionTransformer) -> None:
    head = vit.head
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)


def model_config(model: DCAL) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` with :func:`create_model`, as one dict (run files do not store it:
    they store the run's config, from which the model is rebuilt)."""
    kwargs = dict(model.build.get("timm_kwargs", {}))
    if isinstance(kwargs.get("img_size"), tuple):
        kwargs["img_size"] = list(kwargs["img_size"])
    return {"backbone": model.backbone_name, **asdict(model.cfg), "patch_stride": model.patch_stride, **kwargs}


# -------------------------------------------------------------------------------------------- speed options
def autocast(device: str | torch.device = "cpu", precision: str = "bf16") -> contextlib.AbstractContextManager:
    """Mixed precision for a DCAL forward (and its loss): wrap those, not ``backward`` or the optimizer step.

    ``bf16`` works on the CPU and on GPUs (no loss scaling needed); ``fp16`` is for CUDA only and needs a
    ``torch.amp.GradScaler``; ``fp32`` is a no-op context. Weights, gradients and optimizer state stay float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("fp16 autocast is for CUDA; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def compile_model(model: DCAL, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` the model; the parameters stay shared with ``model`` (save/load ``model``'s state_dict).

    Pair sampling and input checks run eagerly (graph breaks); the streams compile. The first call of each
    input shape and mode (train/eval) pays the compilation.
    """
    return torch.compile(model, **compile_kwargs)
