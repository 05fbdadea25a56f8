"""DiffRate's relaxation (Chen et al., ICCV 2023; code OpenGVLab/DiffRate): the block forward of the rate search, in
which each block's kept counts are differentiable functions of learnable logits over candidate counts.

Per block from the second on (the first is never compressed, as in the official code), two distributions over the
candidate kept counts ``P, P - g, P - 2g, ...`` (patch tokens, granularity ``g``; :func:`kept_candidates`), one for
pruning and one for merging. A forward pass over a batch:

- the kept count is the ceiling of the expected candidate, the ceiling straight-through (its gradient is the
  expectation's; :func:`expected_kept`);
- the sequence never shrinks: every block runs on all tokens, and a removed token is masked out of every other
  token's attention (:func:`masked_softmax`: the attention weights are multiplied by the mask and renormalised, a
  token still attending to itself). The mask of a removal is 0 for the tokens removed and 1 elsewhere in the forward,
  and its gradient is that of the probability that each position survives, the sum of the probabilities of the
  candidates that keep it (:func:`token_mask`): the straight-through trick by which the task loss reaches the logits;
- after attention the tokens are sorted by class-token attention (averaged over heads; prefix tokens first, masked
  tokens last); pruning masks all but the ``p`` first, then merging averages each of the next tokens up to ``p`` into
  its most similar token among the ``m`` first (cosine of the hidden states, never into a prefix token), keeps the
  merged tokens in the sequence, masked, and grows the destination's size by each merged token's size times its
  similarity, at least 1 (:func:`merge_in_place`); attention is proportional to the sizes;
- the FLOPs are those of the kept counts through the blocks, ``n' = min(n, p, m)`` straight-through (the gradient
  reaches ``p`` and ``m``, never the count entering the block), in :func:`~attnprune.flops.count_flops`' convention
  without the scorer's and reducer's own work (:func:`relaxed_flops`), as the official training-time count does.

Where this differs from the official training branch: the masks' forward values are exactly 0 and 1 (the official
``1 - p + p`` rounds), so the live tokens are counted exactly; masked tokens are sorted last explicitly (the official
sort relies on their attention being below every live token's); the model stays in eval mode (no drop path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from attnprune.flops import count_flops, linear_macs
from attnprune.routing import Routing
from attnprune.vit import feed_forward, head, num_patch_tokens

__all__ = [
    "BlockRates",
    "expected_kept",
    "kept_candidates",
    "masked_softmax",
    "merge_in_place",
    "relaxed_flops",
    "relaxed_forward",
    "block_rates",
    "straight_through_min",
    "token_mask",
]


def kept_candidates(patches: int, granularity: int) -> Tensor:
    """The candidate kept counts of a block, patch tokens: ``patches, patches - granularity, ...`` down to >= 1."""
    return torch.arange(patches, 0, -granularity, dtype=torch.float32)


def expected_kept(logits: Tensor, candidates: Tensor) -> Tensor:
    """The ceiling of the expected candidate under ``softmax(logits)``, straight-through: a scalar whose value is an
    integer and whose gradient is the expectation's."""
    expected = candidates @ logits.softmax(-1)
    return expected.detach().ceil() + (expected - expected.detach())


def straight_through_min(tokens: Tensor, prune: Tensor, merge: Tensor) -> Tensor:
    """``min(tokens, prune, merge)`` whose gradient reaches ``prune`` and ``merge`` in full and ``tokens`` not."""
    value = torch.minimum(torch.minimum(tokens, prune), merge).detach()
    return value + (prune - prune.detach()) + (merge - merge.detach())


def token_mask(survival: Tensor, kept: int, live: int) -> Tensor:
    """The mask of a removal over sequence positions: 0 at positions ``kept`` to ``live - 1``, 1 elsewhere, with the
    gradient of ``survival`` (the probability that each position survives)."""
    hard = torch.ones_like(survival)
    hard[kept:live] = 0
    return hard + (survival - survival.detach())


def masked_softmax(logits: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Attention weights over the unmasked keys: ``softmax`` with each key's weight multiplied by its mask (a query
    always keeps its own key) and renormalised, ``eps`` keeping it finite. ``[B, H, T, T], [B, T] -> [B, H, T, T]``."""
    tokens = logits.shape[-1]
    keys = mask[:, None, None, :]
    keys = keys + (1.0 - keys) * torch.eye(tokens, dtype=logits.dtype, device=logits.device)
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keys
    return (weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)


def _masked_attention(block: Block, x: Tensor, size: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The attention half of the block with proportional attention over the unmasked tokens: the tokens after the
    residual and the class token's attention to every token, averaged over heads (``[B, T]``)."""
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1) + size.log().view(batch, 1, 1, tokens)
    weights = masked_softmax(logits, mask)
    out = attn.norm((weights @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if attn.gate is not None:
        out = out * attn.gate(block.norm1(x)).sigmoid()
    return x + block.ls1(attn.proj(out)), weights[:, :, 0].mean(dim=1)


def merge_in_place(x: Tensor, size: Tensor, kept: int, stop: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Average each token at positions ``kept`` to ``stop - 1`` into its most similar token among the ``kept`` first
    (never a prefix token), leaving the merged tokens where they are; the destination's size grows by each merged
    token's size times its similarity, at least 1."""
    features = x[:, :stop].detach()
    features = features / features.norm(dim=-1, keepdim=True)
    similarity = features[:, kept:] @ features[:, :kept].transpose(1, 2)
    similarity[..., :num_prefix] = -torch.inf
    best, partner = similarity.max(dim=-1)
    index = partner[..., None]
    merged = x[:, :kept].scatter_reduce(1, index.expand(-1, -1, x.shape[-1]), x[:, kept:stop], reduce="mean")
    grown = torch.cat([size[:, :kept], size[:, kept:stop] * best[..., None]], dim=1).clamp(min=1)
    destinations = grown[:, :kept].scatter_add(1, index, grown[:, kept:])
    return torch.cat([merged, x[:, kept:]], dim=1), torch.cat([destinations, grown[:, kept:], size[:, stop:]], dim=1)


@dataclass(frozen=True)
class BlockRates:
    """A compressed block's kept counts (tokens of the sequence, prefix included; integer values, straight-through
    gradients) and the probability that each sequence position survives its pruning and its merging."""

    prune: Tensor
    merge: Tensor
    prune_survival: Tensor
    merge_survival: Tensor


def block_rates(logits: Tensor, candidates: Tensor, num_prefix: int) -> list[BlockRates]:
    """The kept counts and survival probabilities of blocks 1 to L - 1 from their ``logits`` ``[L - 1, 2, C]``
    (pruning, merging) over the ``candidates``."""
    positions = torch.arange(int(candidates[0]) + num_prefix, dtype=candidates.dtype)
    keeps = (positions[:, None] < candidates[None, :] + num_prefix).to(logits.dtype)  # [T, C]: candidate keeps it
    rates = []
    for prune, merge in logits:
        rates.append(
            BlockRates(
                expected_kept(prune, candidates) + num_prefix,
                expected_kept(merge, candidates) + num_prefix,
                keeps @ prune.softmax(-1),
                keeps @ merge.softmax(-1),
            )
        )
    return rates


def _relaxed_block(
    block: Block, x: Tensor, size: Tensor, mask: Tensor, live: int, rates: BlockRates | None, num_prefix: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One block of :func:`relaxed_forward`: ``(x, size, mask, live)`` after it, ``live`` the tokens not masked."""
    x, scores = _masked_attention(block, x, size, mask)
    scores = scores[:, num_prefix:].masked_fill(mask[:, num_prefix:] == 0, -torch.inf)
    order = scores.argsort(dim=1, descending=True) + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(len(x), -1)
    order = torch.cat([prefix, order], dim=1)
    x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    size, mask = size.gather(1, order[..., None]), mask.gather(1, order)
    if rates is not None:
        pruned = min(live, int(rates.prune))
        if pruned < live:
            mask = mask * token_mask(rates.prune_survival, pruned, live)
        merged = min(pruned, int(rates.merge))
        if merged < pruned:
            x, size = merge_in_place(x, size, merged, pruned, num_prefix)
            mask = mask * token_mask(rates.merge_survival, merged, pruned)
        live = merged
    return feed_forward(block, x), size, mask, live


def relaxed_forward(
    model: VisionTransformer, inputs: Tensor, rates: list[BlockRates], pre_logits: bool = False
) -> Tensor:
    """The model's outputs (with ``pre_logits``, the features its classifier reads) under the relaxed kept counts
    ``rates`` of blocks 1 to L - 1, from the token embeddings ``inputs`` ``[B, T, C]`` (:func:`attnprune.vit.embed`);
    average pooling weighs the unmasked tokens by size."""
    batch, tokens, _ = inputs.shape
    x, size, mask, live = inputs, inputs.new_ones(batch, tokens, 1), inputs.new_ones(batch, tokens), tokens
    for layer, block in enumerate(model.blocks):
        block_rate = rates[layer - 1] if layer else None
        x, size, mask, live = _relaxed_block(block, x, size, mask, live, block_rate, model.num_prefix_tokens)
    return head(model, model.norm(x), size * mask[..., None], pre_logits)


def relaxed_flops(model: VisionTransformer, rates: list[BlockRates]) -> Tensor:
    """FLOPs of the kept counts ``rates`` of blocks 1 to L - 1, straight-through (see the module docstring): equal to
    :func:`~attnprune.flops.count_flops` of the schedule's routing less the scorer's and reducer's own work."""
    tokens = float(num_patch_tokens(model) + model.num_prefix_tokens)
    costs = [(linear_macs(b.attn), 2 * b.attn.attn_dim, linear_macs(b.mlp)) for b in model.blocks]
    unpruned = sum(tokens * (attn + mix * tokens + mlp) for attn, mix, mlp in costs)
    total = torch.tensor(float(count_flops(model, Routing())) - unpruned, dtype=torch.float64)
    n = torch.tensor(tokens, dtype=torch.float64)
    for layer, (attn, mix, mlp) in enumerate(costs):
        total = total + n * attn + mix * n * n
        if layer:
            rate = rates[layer - 1]
            n = straight_through_min(n, rate.prune.double(), rate.merge.double())
        total = total + n * mlp
    return total
