"""One block of timm's pre-norm ViT computed piece by piece, for the pruned forward of :mod:`attnprune.vit`: the
attention half with its pruning point (:func:`attend`), the MLP half (:func:`feed_forward`), and a block whose reducer
runs on its input, before attention, with the block's own attention merged (:func:`lookahead_block_forward`,
MCTF's one-step-ahead attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

from attnprune import fused
from attnprune.routing import LayerPlan

__all__ = ["attend", "feed_forward", "lookahead_block_forward"]


def attend(
    block: Block, x: Tensor, bias: Tensor | None = None, need_probs: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The attention half of timm's pre-norm ``Block``: ``x`` plus the attention output (the pruning point).

    Args:
        block: a timm ``Block`` with ``Attention``.
        x: tokens ``[B, T, C]``.
        bias: additive attention-logit bias ``[B, 1, 1, T]`` (proportional attention) or None.
        need_probs: materialise the attention probabilities instead of using the fused kernel.

    Returns:
        The tokens after the attention residual, the queries, keys and values ``[B, H, T, d]`` (queries and keys
        after qk-norm) and the attention probabilities ``[B, H, T, T]`` (None unless ``need_probs``).
    """
    attn: Attention = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    q, k, v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = None
    if need_probs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        out = attn.attn_drop(probs) @ v
    else:
        dropout = attn.attn_drop.p if attn.training else 0.0
        if bias is not None and fused.lean_attention(q):
            out = fused.attention_with_bias(q, k, v, bias, attn.scale, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return _attention_residual(block, x, h, out), q, k, v, probs


def _attention_residual(block: Block, x: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """``x`` plus the attention output: ``out`` ``[B, H, T, d]`` with its heads joined, normed, gated (by the normed
    tokens ``h``, where the attention has a gate) and projected."""
    attn: Attention = block.attn
    out = attn.norm(out.transpose(1, 2).reshape(*x.shape[:2], attn.attn_dim))
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    return x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))


def feed_forward(block: Block, x: Tensor) -> Tensor:
    """The MLP half of timm's pre-norm ``Block``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def lookahead_block_forward(
    block: Block,
    x: Tensor,
    size: Tensor | None,
    plan: LayerPlan,
    n_out: int,
    num_prefix: int,
    bias: Tensor | None,
    source: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A block whose reducer runs on its input (``lookahead``, MCTF's one-step-ahead attention): the attention
    probabilities from the queries and keys of the ``T`` tokens received (with the proportional-attention ``bias``),
    the tokens and the probabilities merged by the reducer, then the values of the merged tokens, the attention output
    and the MLP on the tokens left."""
    attn: Attention = block.attn
    width, weight, qkv_bias = attn.attn_dim, attn.qkv.weight, attn.qkv.bias
    qk = F.linear(block.norm1(x), weight[: 2 * width], None if qkv_bias is None else qkv_bias[: 2 * width])
    q, k = qk.reshape(*x.shape[:2], 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
    probs = (logits if bias is None else logits + bias).softmax(dim=-1)
    metric, channels = x, x.shape[-1]
    if source is not None:  # membership is averaged along with the tokens (see pruned_block_forward)
        x = torch.cat([x, source], dim=-1)
    reducer = fused.reducer_for(plan.rule.reduce)
    x, size, probs = reducer(x, size, n_out, num_prefix, metric=metric, attention=probs, **plan.options())
    if source is not None:
        x, source = x[..., :channels], x[..., channels:]
    h = block.norm1(x)
    v = F.linear(h, weight[2 * width :], None if qkv_bias is None else qkv_bias[2 * width :])
    v = v.reshape(*x.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)
    return feed_forward(block, _attention_residual(block, x, h, attn.attn_drop(probs) @ v)), size, source
