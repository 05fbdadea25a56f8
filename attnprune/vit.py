"""Make a timm ``VisionTransformer`` prunable by a :class:`~attnprune.routing.Routing`, without forking timm.

:func:`prune` keeps the model object, its class and its ``state_dict``; it replaces the model's ``forward`` and
``forward_features`` by versions that walk ``model.blocks`` and, in a block with a rule, score and reduce the tokens
after attention and before the MLP (a ``lookahead`` reducer, MCTF's: before attention). Blocks before the first rule
run timm's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MethodType

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from attnprune import fused
from attnprune.blocks import attend, feed_forward, lookahead_block_forward
from attnprune.errors import UserError, UserTypeError
from attnprune.reduction import REDUCERS
from attnprune.routing import LayerPlan, Routing
from attnprune.scoring import SCORERS, ScoreContext

__all__ = [
    "prune",
    "unprune",
    "find_vit",
    "num_patch_tokens",
    "forward_tokens",
    "embed",
    "run_blocks",
    "block_step",
    "runs_as_timm",
    "plans_for",
    "routing_of",
    "head",
    "attend",
    "feed_forward",
]

_PATCHED = ("forward", "forward_features")

BlockStep = Callable[..., tuple[Tensor, "Tensor | None", "Tensor | None"]]
"""``step(block, x, size, plan, routing, num_prefix, layer, source) -> (x, size, source)``: one block of
:func:`run_blocks`."""


def num_patch_tokens(model: VisionTransformer, img_size: int | tuple[int, int] | None = None) -> int:
    """Patch tokens the model makes from an image of ``img_size`` (default: the model's own input size)."""
    if img_size is None:
        return model.patch_embed.num_patches
    size = (img_size, img_size) if isinstance(img_size, int) and not isinstance(img_size, bool) else img_size
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise UserTypeError(f"img_size must be an int or an (h, w) pair of ints, got {img_size!r}")
    height, width = size
    patch = tuple(model.patch_embed.patch_size)
    pad = getattr(model.patch_embed, "dynamic_img_pad", False)
    if height <= 0 or width <= 0 or (not pad and (height % patch[0] or width % patch[1])):
        raise UserError(
            f"img_size {img_size!r} does not fit the model: expected positive multiples of its patch size {patch}"
        )
    grid = model.patch_embed.dynamic_feat_size((height, width))
    return grid[0] * grid[1]


def _check_vit(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise UserTypeError(
            f"attnprune.prune expects a timm VisionTransformer, got {type(model).__name__}; convert a transformers "
            "or open_clip model first: model = attnprune.convert(model) (open_clip: model.visual = "
            "attnprune.convert(model.visual))"
        )


def find_vit(model: nn.Module) -> VisionTransformer:
    """The timm ViT that ``model`` is, or the one in its ``visual`` attribute (an open_clip model whose image tower
    :func:`attnprune.convert` converted).

    Raises:
        UserTypeError: neither (the message says how to convert a transformers or open_clip model).
    """
    visual = getattr(model, "visual", None)
    if not isinstance(model, VisionTransformer) and isinstance(visual, VisionTransformer):
        return visual
    _check_vit(model)
    return model


def routing_of(model: VisionTransformer, routing: Routing | dict | str | Path | None) -> Routing:
    """``routing`` read for ``model`` (:meth:`Routing.parse` with the model's depth); None is the routing the model
    was pruned with, if any, else no pruning.

    Raises:
        UserTypeError: the model is not a timm ``VisionTransformer``.
    """
    _check_vit(model)
    if routing is None:
        return getattr(model, "routing", None) or Routing()
    return Routing.parse(routing, len(model.blocks))


def check_prunable(model: nn.Module, routing: Routing) -> list[LayerPlan]:
    """Check that ``routing`` fits ``model`` and return its plan at the model's default input size.

    Raises:
        UserTypeError: the model is not a timm ``VisionTransformer`` with standard pre-norm blocks where rules apply.
        UserError: a rule does not fit the model (the message names the rule and the field).
    """
    _check_vit(model)
    plans = routing.resolve(len(model.blocks), num_patch_tokens(model))
    first = routing.rules[0].layer if routing.rules else len(model.blocks)
    for i, block in enumerate(model.blocks):
        if i >= first and not (isinstance(block, Block) and isinstance(block.attn, Attention)):
            raise UserTypeError(
                f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}; attnprune "
                "prunes timm's pre-norm Block with Attention"
            )
    for position, rule in enumerate(routing.rules):
        scorer = SCORERS.get(rule.score)
        if scorer is not None and scorer.needs_class_token and not model.has_class_token:
            raise UserError(
                f"routing rule {position}: field 'score' is {rule.score!r}, which reads the class token, "
                "but the model has none (class_token=False)"
            )
    return plans


def prune(model: nn.Module, routing: Routing | dict | str | Path | None = None) -> nn.Module:
    """Apply a static routing to a timm ViT, in place.

    Args:
        model: a timm ``VisionTransformer`` (DeiT-distilled, register tokens, average pooling, ``num_classes=0``,
            layer scale and qk-norm included; models :func:`attnprune.convert` or :func:`attnprune.load_model`
            converted from transformers or open_clip), or a model whose ``visual`` is one (an open_clip CLIP
            model with its tower converted: its tower is pruned, so ``encode_image`` prunes).
        routing: the per-layer rules, anything :meth:`Routing.parse` reads (a Routing, a dict, a preset spec such
            as ``"tome:r=13"`` or a routing YAML path); None or an empty routing restores timm's forward.

    Returns:
        The same model: ``model(x)`` now prunes, ``model.routing`` (of a CLIP model: ``model.visual.routing``)
        holds the routing.

    Example:
        >>> import torch
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
        >>> model = prune(model.eval(), "tome:r=8")  # in place: every block merges 8 tokens
        >>> model.routing.token_counts(depth=4, num_tokens=64)
        [64, 56, 48, 40, 32]
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    vit = find_vit(model)
    if routing is None:
        return unprune(model)
    routing = routing_of(vit, routing)
    if len(routing) == 0:
        return unprune(model)
    plans = check_prunable(vit, routing)
    vit.routing = routing
    vit._attnprune_plans = {num_patch_tokens(vit): {plan.rule.layer: plan for plan in plans}}
    vit.forward_features = MethodType(_forward_features, vit)
    vit.forward = MethodType(_forward, vit)
    return model


def unprune(model: nn.Module) -> nn.Module:
    """Restore timm's forward on a model :func:`prune` patched (its ``state_dict`` never changed); a model whose
    ``visual`` is a timm ViT has its tower restored.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> model = prune(VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3), "tome:r=8")
        >>> hasattr(unprune(model), "routing")
        False
    """
    vit = find_vit(model)
    for name in (*_PATCHED, "routing", "_attnprune_plans"):
        vit.__dict__.pop(name, None)
    return model


def plans_for(model: VisionTransformer, num_tokens: int) -> dict[int, LayerPlan]:
    """The pruned model's routing resolved for ``num_tokens`` patch tokens, by block: resolved by :func:`prune` for
    the model's own input size, on the fly for others (never cached here: mutating state in forward would make
    torch.compile recompile). Empty for a model that is not pruned."""
    routing: Routing | None = getattr(model, "routing", None)
    if not routing:
        return {}
    if num_tokens in model._attnprune_plans:
        return model._attnprune_plans[num_tokens]
    return {plan.rule.layer: plan for plan in routing.resolve(len(model.blocks), num_tokens)}


def forward_tokens(
    model: VisionTransformer,
    x: Tensor,
    block_outputs: dict[int, Tensor] | None = None,
    sources: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Embed images and run the (pruned) blocks; works on pruned and unpruned models alike.

    Args:
        model: a timm ViT, pruned or not.
        x: images ``[B, C, H, W]``.
        block_outputs: if given, filled with every block's output tokens (before the final norm) by block index.
        sources: if given, filled with one ``[B, T, T0]`` tensor per block: entry (t, j) > 0 when token t stands
            for (or was averaged from) input token j (prefix tokens included), for drawing what each routing keeps.

    Returns:
        The normed tokens (prefix first) and their sizes (None while every token stands for one patch).
    """
    x = embed(model, x)
    plans = plans_for(model, x.shape[1] - model.num_prefix_tokens)
    source = (
        torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(len(x), -1, -1) if sources is not None else None
    )
    routing = routing_of(model, None)
    x, size = run_blocks(model, x, None, routing, plans, block_outputs=block_outputs, sources=sources, source=source)
    return model.norm(x), size


def embed(model: VisionTransformer, images: Tensor) -> Tensor:
    """Patch embedding, position embedding and prefix tokens: the input of the first block."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def run_blocks(
    model: VisionTransformer,
    x: Tensor,
    size: Tensor | None,
    routing: Routing,
    plans: dict[int, LayerPlan],
    start: int = 0,
    stop: int | None = None,
    *,
    block_outputs: dict[int, Tensor] | None = None,
    sources: list[Tensor] | None = None,
    source: Tensor | None = None,
    step: BlockStep | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run blocks ``start`` to ``stop - 1`` (default: to the last) on tokens ``x`` (with sizes ``size``) under
    ``routing``'s ``plans``: the one block loop of the pruned forward, the search's prefix cache and
    :mod:`attnprune.inference`.

    Args:
        model: the timm ViT.
        x: tokens ``[B, T, C]`` entering block ``start``.
        size: their sizes ``[B, T, 1]`` (None while every token stands for one patch).
        routing: the routing (its ``prop_attn`` and ``seed``).
        plans: the routing resolved by block (:func:`plans_for`).
        start: first block.
        stop: block after the last.
        block_outputs: if given, filled with every block's output tokens by block index.
        sources: if given, filled with every block's token membership (see :func:`forward_tokens`).
        source: the membership entering block ``start`` (with ``sources``).
        step: runs one block (default :func:`block_step`); :mod:`attnprune.inference` passes compiled ones.

    Returns:
        The tokens after block ``stop - 1`` and their sizes.
    """
    step = step or block_step
    for i in range(start, len(model.blocks) if stop is None else stop):
        x, size, source = step(model.blocks[i], x, size, plans.get(i), routing, model.num_prefix_tokens, i, source)
        if block_outputs is not None:
            block_outputs[i] = x
        if sources is not None:
            sources.append(source)
    return x, size


def runs_as_timm(plan: LayerPlan | None, size: Tensor | None, routing: Routing) -> bool:
    """Whether a block runs timm's own forward: it reduces nothing and proportional attention has no sizes to use."""
    return plan is None and (size is None or not routing.prop_attn)


def block_step(
    block: Block,
    x: Tensor,
    size: Tensor | None,
    plan: LayerPlan | None,
    routing: Routing,
    num_prefix: int,
    layer: int,
    source: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One block of :func:`run_blocks`: timm's forward where :func:`runs_as_timm`, else
    :func:`pruned_block_forward`; returns the tokens, sizes and membership after it."""
    if runs_as_timm(plan, size, routing):
        return block(x), size, source
    return pruned_block_forward(block, x, size, plan, routing, num_prefix, layer, source)


def head(model: VisionTransformer, x: Tensor, size: Tensor | None, pre_logits: bool = False) -> Tensor:
    """The model's head on normed tokens; average pooling is weighted by token size (a merged token counts for
    every patch it stands for). With ``pre_logits``, the pooled features the classifier reads instead of its
    logits (timm's ``forward_head(x, pre_logits=True)``; a headless model's output either way)."""
    if size is None or model.attn_pool is not None or model.global_pool not in ("avg", "avgmax"):
        return model.forward_head(x, pre_logits=pre_logits)
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    tokens, weights = x[:, start:], size[:, start:]
    pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
    if model.global_pool == "avgmax":
        pooled = 0.5 * (pooled + tokens.amax(dim=1))
    if getattr(model, "pool_class_token", False):  # the class token beside the mean: DINOv2's linear classifier
        pooled = torch.cat([x[:, 0], pooled], dim=-1)
    features = model.head_drop(model.fc_norm(pooled))
    return features if pre_logits else model.head(features)


def _forward_features(self: VisionTransformer, x: Tensor) -> Tensor:
    return forward_tokens(self, x)[0]


def _forward(self: VisionTransformer, x: Tensor) -> Tensor:
    return head(self, *forward_tokens(self, x))


def pruned_block_forward(
    block: Block,
    x: Tensor,
    size: Tensor | None,
    plan: LayerPlan | None,
    routing: Routing,
    num_prefix: int,
    layer: int,
    source: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """timm's ``Block.forward`` with proportional attention and token reduction between attention and MLP.

    ``source`` (``[B, T, T0]`` token membership, see :func:`forward_tokens`) is reduced along with the tokens.
    """
    tokens = x.shape[1]
    bias = size.log().to(x.dtype).view(len(x), 1, 1, tokens) if size is not None and routing.prop_attn else None
    n_out = _tokens_out(plan, tokens, num_prefix)
    if n_out is not None and REDUCERS[plan.rule.reduce].lookahead:
        return lookahead_block_forward(block, x, size, plan, n_out, num_prefix, bias, source)
    scorer = SCORERS[plan.rule.score] if plan is not None and plan.rule.score is not None else None
    x, q, k, v, probs = attend(block, x, bias, need_probs=scorer is not None and scorer.needs_attention)
    if n_out is not None:
        ctx = ScoreContext(q, k, block.attn.scale, num_prefix, bias, probs, layer, routing.seed, v=v)
        scores = scorer(x, ctx) if scorer is not None else None
        metric = {"keys": ctx.key_metric, "tokens": x, None: None}[REDUCERS[plan.rule.reduce].metric]
        width = x.shape[-1]
        if source is not None:  # every reducer gathers, sums or averages: membership survives the same operations
            x = torch.cat([x, source], dim=-1)
        reducer = fused.reducer_for(plan.rule.reduce)
        x, size = reducer(x, size, n_out, num_prefix, scores=scores, metric=metric, **plan.options())
        if source is not None:
            x, source = x[..., :width], x[..., width:]
    return feed_forward(block, x), size, source


def _tokens_out(plan: LayerPlan | None, tokens: int, num_prefix: int) -> int | None:
    """Non-prefix tokens leaving a block (None when it removes none). A merge given by ``r`` counts them from the
    tokens present, ``tokens - num_prefix - r``, rather than reading the plan: under ``torch.compile`` one graph then
    serves every block merging the same ``r`` (all of ToMe's), see :mod:`attnprune.inference`."""
    if plan is None:
        return None
    if REDUCERS[plan.rule.reduce].max_removed is not None and plan.rule.r is not None:
        return tokens - num_prefix - plan.rule.r if plan.rule.r > 0 else None
    return plan.n_out if plan.n_out != plan.n_in else None
