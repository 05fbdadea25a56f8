"""Per-layer selectivity of a timm ViT: how concentrated, how stable and how reliable its attention is.

:class:`SelectivityAnalyzer` runs the (unpruned) model with attention materialised, and accumulates, for every
block, torchmetrics from :mod:`attnprune.selectivity.metrics`:

- concentration of the class token's attention over the patch tokens (``cls_*``) and of every query's (``all_*``):
  normalized entropy, Gini, top-10% mass, effective share, max weight;
- stability: agreement between heads, rank correlation with a noisy copy of the image and with its horizontal
  mirror (tokens re-aligned), and with the previous layer's ranking;
- reliability: for every registered scorer, Spearman correlation and top-k overlap with an oracle importance, the
  change of the model's output when the token is removed at that layer (leave-one-out, batched).

Only analysis pays for the attention matrix: the pruned forward of :mod:`attnprune.vit` never materialises it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from attnprune.errors import UserError, check_number
from attnprune.fidelity import output_change
from attnprune.scoring import SCORERS, ScoreContext
from attnprune.selectivity.metrics import (
    EffectiveShare,
    Gini,
    HeadAgreement,
    MaxWeight,
    MeanOverRows,
    NormalizedEntropy,
    RankStability,
    TopKMass,
    TopKOverlap,
)
from attnprune.vit import attend, embed, feed_forward

__all__ = [
    "CONCENTRATION",
    "LayerState",
    "SelectivityAnalyzer",
    "layer_states",
    "oracle_importance",
    "patch_rows",
]

CONCENTRATION = {
    "normalized_entropy": NormalizedEntropy,
    "gini": Gini,
    "topk_mass": TopKMass,
    "effective_share": EffectiveShare,
    "max_weight": MaxWeight,
}


@dataclass
class LayerState:
    """One block at its pruning point: ``tokens`` after attention (before the MLP) and what the scorers read."""

    tokens: Tensor
    ctx: ScoreContext


@torch.no_grad()
def layer_states(model: VisionTransformer, images: Tensor) -> tuple[list[LayerState], Tensor]:
    """Run the unpruned model with attention materialised; returns every block's state and the model output."""
    x = embed(model, images)
    states = []
    for i, block in enumerate(model.blocks):
        x, q, k, v, probs = attend(block, x, need_probs=True)
        states.append(LayerState(x, ScoreContext(q, k, block.attn.scale, model.num_prefix_tokens, None, probs, i, v=v)))
        x = feed_forward(block, x)
    return states, model.forward_head(model.norm(x))


@torch.no_grad()
def oracle_importance(
    model: VisionTransformer, states: list[LayerState], layer: int, output: Tensor, chunk: int = 2048
) -> Tensor:
    """How much the output changes when each patch token is removed at ``layer``'s pruning point.

    All leave-one-out sequences of the batch run as one batch (in chunks of ``chunk`` sequences) through the rest of
    the network: ``B * N`` sequences, not ``N`` forwards.

    Args:
        model: the unpruned timm ViT.
        states: :func:`layer_states` of the batch.
        layer: block index.
        output: the model output on the full sequences.
        chunk: sequences per forward.

    Returns:
        ``[B, N]`` importance of each patch token (KL divergence of the logits, or 1 - cosine of features).
    """
    tokens = states[layer].tokens
    batch, total, width = tokens.shape
    prefix = model.num_prefix_tokens
    n = total - prefix
    keep = torch.arange(total, device=tokens.device).expand(n, total)
    keep = keep[keep != (torch.arange(n, device=tokens.device) + prefix)[:, None]].view(n, total - 1)
    sequences = tokens[:, keep].reshape(batch * n, total - 1, width)
    reference = output.repeat_interleave(n, dim=0)
    changes = []
    for start in range(0, batch * n, chunk):
        x = feed_forward(model.blocks[layer], sequences[start : start + chunk])
        for block in model.blocks[layer + 1 :]:
            x = block(x)
        changes.append(output_change(model, reference[start : start + chunk], model.forward_head(model.norm(x))))
    return torch.cat(changes).view(batch, n)


def patch_rows(attn: Tensor, prefix: int) -> Tensor:
    """Attention rows restricted to the patch tokens and renormalised: ``[..., T] -> [..., N]``."""
    rows = attn[..., prefix:]
    return rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _unflip(scores: Tensor, grid: tuple[int, int]) -> Tensor:
    """Scores of a horizontally mirrored image's patches, put back in the original image's patch order."""
    return scores.unflatten(-1, grid).flip(-1).flatten(-2)


class SelectivityAnalyzer(nn.Module):
    """Accumulates per-layer selectivity metrics over batches (and DDP ranks, via torchmetrics).

    Args:
        depth: blocks of the analysed model.
        class_token: the model has a class token (the ``cls_*``, head-agreement and stability metrics read it).
        scorers: scorer names whose reliability is measured (default: every registered scorer).
        oracle: measure reliability against the leave-one-out oracle (the costly part).
        keep: fraction of tokens of the top-k overlap.
        noise_std: standard deviation of the Gaussian noise of the perturbation test (inputs are normalised).
    """

    def __init__(
        self,
        depth: int,
        class_token: bool = True,
        scorers: list[str] | None = None,
        oracle: bool = True,
        keep: float = 0.5,
        noise_std: float = 0.1,
    ) -> None:
        super().__init__()
        check_number("SelectivityAnalyzer depth", depth, 1, integer=True)
        check_number("SelectivityAnalyzer keep", keep, 0, 1, low_open=True)
        check_number("SelectivityAnalyzer noise_std", noise_std, 0)
        unknown = [name for name in scorers or () if name not in SCORERS]
        if unknown:
            raise UserError(f"SelectivityAnalyzer: unknown scorer {unknown[0]!r} (known: {', '.join(sorted(SCORERS))})")
        self.depth, self.class_token, self.oracle, self.noise_std = depth, class_token, oracle, noise_std
        names = scorers if scorers is not None else sorted(SCORERS)
        self.scorers = [s for s in names if class_token or not SCORERS[s].needs_class_token]
        metrics: dict[str, MeanOverRows] = {}
        for layer in range(depth):
            for name, cls in CONCENTRATION.items():
                metrics[f"all_{name}/layer_{layer}"] = cls()
                if class_token:
                    metrics[f"cls_{name}/layer_{layer}"] = cls()
            if class_token:
                metrics[f"head_agreement/layer_{layer}"] = HeadAgreement()
                metrics[f"noise_stability/layer_{layer}"] = RankStability()
                metrics[f"flip_stability/layer_{layer}"] = RankStability()
                if layer > 0:
                    metrics[f"layer_stability/layer_{layer}"] = RankStability()
            if oracle:
                for scorer in self.scorers:
                    metrics[f"reliability_spearman_{scorer}/layer_{layer}"] = RankStability()
                    metrics[f"reliability_overlap_{scorer}/layer_{layer}"] = TopKOverlap(keep)
        self.metrics = nn.ModuleDict({key.replace("/", "__"): metric for key, metric in metrics.items()})
        self.oracle_sequences = 0

    def _metric(self, key: str) -> MeanOverRows:
        return self.metrics[key.replace("/", "__")]

    @torch.no_grad()
    def update(self, model: VisionTransformer, images: Tensor) -> None:
        """Analyse one batch of preprocessed images with the unpruned ``model``.

        Raises:
            UserError: ``model`` has another number of blocks than the analyzer's ``depth``, or no class token where
                the analyzer reads one.
        """
        if len(model.blocks) != self.depth:
            raise UserError(
                f"SelectivityAnalyzer was built for {self.depth} blocks but the model has {len(model.blocks)}; give "
                "depth=len(model.blocks)"
            )
        if self.class_token and not model.has_class_token:
            raise UserError("SelectivityAnalyzer reads the class token (class_token=True), but the model has none")
        prefix = model.num_prefix_tokens
        states, output = layer_states(model, images)
        if self.class_token:
            grid = model.patch_embed.dynamic_feat_size(images.shape[-2:])
            noisy, _ = layer_states(model, images + self.noise_std * torch.randn_like(images))
            mirrored, _ = layer_states(model, images.flip(-1))
        previous = None
        for layer, state in enumerate(states):
            for name in CONCENTRATION:
                self._metric(f"all_{name}/layer_{layer}").update(patch_rows(state.ctx.attention, prefix))
            if self.class_token:
                heads = patch_rows(state.ctx.cls_attention, prefix)  # [B, H, N]
                ranking = heads.mean(dim=1)
                for name in CONCENTRATION:
                    self._metric(f"cls_{name}/layer_{layer}").update(heads)
                if heads.shape[1] > 1:
                    self._metric(f"head_agreement/layer_{layer}").update(heads)
                noisy_ranking = patch_rows(noisy[layer].ctx.cls_attention, prefix).mean(dim=1)
                mirrored_ranking = patch_rows(mirrored[layer].ctx.cls_attention, prefix).mean(dim=1)
                self._metric(f"noise_stability/layer_{layer}").update(ranking, noisy_ranking)
                self._metric(f"flip_stability/layer_{layer}").update(ranking, _unflip(mirrored_ranking, grid))
                if previous is not None:
                    self._metric(f"layer_stability/layer_{layer}").update(ranking, previous)
                previous = ranking
            if self.oracle:
                importance = oracle_importance(model, states, layer, output)
                self.oracle_sequences += importance.numel()
                for scorer in self.scorers:
                    scores = SCORERS[scorer](state.tokens, state.ctx)
                    self._metric(f"reliability_spearman_{scorer}/layer_{layer}").update(scores, importance)
                    self._metric(f"reliability_overlap_{scorer}/layer_{layer}").update(scores, importance)

    def compute(self) -> dict[str, list[float]]:
        """``{metric: [value at layer 0, 1, ...]}`` (NaN where a metric is undefined, e.g. layer_stability at 0)."""
        results: dict[str, list[float]] = {}
        for key, metric in self.metrics.items():
            name, layer = key.split("__")
            values = results.setdefault(name, [math.nan] * self.depth)
            values[int(layer.removeprefix("layer_"))] = float(metric.compute()) if metric.update_count else math.nan
        return results

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.oracle_sequences = 0
