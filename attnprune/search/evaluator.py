"""Scores routings on validation images, finishing from cached token states of the prefix already fixed."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from attnprune.errors import check_finite_outputs
from attnprune.fidelity import FIDELITY, fidelity_metric
from attnprune.routing import Routing
from attnprune.search.distributed import Shard, agree
from attnprune.search.objective import top1_error
from attnprune.vit import embed, head, run_blocks

__all__ = ["Evaluator", "States"]

States = list[tuple[Tensor, Tensor | None]]


class Evaluator:
    """Objective, fidelity and top-1 of routings on fixed validation batches.

    The unpruned model's outputs are computed once; every measurement compares the pruned outputs with them. In a
    data-parallel search each rank holds its share of the images (:mod:`~attnprune.search.distributed`) and every
    measurement gathers the ranks' per-image values, so it is the same on every rank and in one process.

    Args:
        model: the timm ViT (eval mode).
        batches: ``(images, labels)`` pairs (this rank's share of them); labels may be None (then no top-1).
        objective: the concrete objective ranking candidates (``kl``, ``cosine`` or ``top1``). ``cosine`` compares
            the pooled features the classifier reads (all a headless model outputs), also on a model with a head.
        shard: which share ``batches`` are (default: the whole set, in one process).

    Raises:
        UserError: the unpruned model's outputs on an image are not finite (raised on every rank).
    """

    def __init__(
        self,
        model: VisionTransformer,
        batches: list[tuple[Tensor, Tensor | None]],
        objective: str,
        shard: Shard | None = None,
    ) -> None:
        self.model, self.objective = model, objective
        # the output change measured: the objective's, else (top1) the model's own (KL for a classifier)
        self.fidelity = objective if objective in FIDELITY else fidelity_metric(model)
        self.pre_logits = self.fidelity == "cosine"  # what the reference holds: features, not logits
        self.raw = [images for images, _ in batches]
        self.labels = [labels for _, labels in batches]
        # top-1 needs labels and a classifier (a headless backbone's output is a feature, not logits)
        self.has_labels = model.num_classes > 0 and all(labels is not None for labels in self.labels)
        self.shard = shard or Shard(sum(len(images) for images in self.raw))
        self.images = self.shard.total
        with torch.no_grad():
            self.inputs = [embed(model, images) for images in self.raw]
            depth = len(model.blocks)
            self.reference = [
                head(model, model.norm(run_blocks(model, x, None, Routing(), {}, 0, depth)[0]), None, self.pre_logits)
                for x in self.inputs
            ]
        agree(self._check_reference)  # a search ranking NaN losses would return garbage
        self.block_passes = depth  # blocks run over the whole validation set (the reference pass included)
        self.candidates = 0

    def _check_reference(self) -> None:
        """Refuse non-finite reference outputs, naming the first image that has them."""
        outputs = torch.cat(self.reference)
        bad = (~torch.isfinite(outputs)).flatten(1).any(1).nonzero().flatten()
        if len(bad):
            image = int(bad[0])
            check_finite_outputs(outputs[image], "the searched model", f"validation image {self.shard.position(image)}")

    def plans(self, routing: Routing) -> dict:
        tokens = self.inputs[0].shape[1] - self.model.num_prefix_tokens
        return {plan.rule.layer: plan for plan in routing.resolve(len(self.model.blocks), tokens)}

    def initial(self) -> States:
        """The token states entering block 0."""
        return [(x, None) for x in self.inputs]

    @torch.no_grad()
    def advance(self, states: States, routing: Routing, start: int, stop: int, images: int | None = None) -> States:
        """Token states after blocks ``start``..``stop - 1`` under ``routing``; the ``states`` are of the first
        ``images`` images of the set (all of them by default), which the work done is counted in."""
        plans = self.plans(routing)
        self.block_passes += (stop - start) * (self.images if images is None else images) / self.images
        return [run_blocks(self.model, x, size, routing, plans, start, stop) for x, size in states]

    @torch.no_grad()
    def measure(self, states: States, routing: Routing, start: int, images: int | None = None) -> dict[str, float]:
        """Mean per-image metrics of ``routing`` finishing from ``states`` at block ``start``, on all images or on
        the first ``images``.

        Returns:
            ``loss`` (the objective), the output change measured (``kl`` or ``cosine``: the objective's, or the
            model's own under ``top1``) and, with labels, ``top1``.
        """
        return {name: values.mean().item() for name, values in self.per_image(states, routing, start, images).items()}

    @torch.no_grad()
    def per_image(self, states: States, routing: Routing, start: int, images: int | None = None) -> dict[str, Tensor]:
        """The metrics of :meth:`measure`, one value per image (``[N]`` float64 tensors, every rank's images in
        order), for paired comparisons."""
        self.candidates += 1
        first = self.images if images is None else min(images, self.images)
        trimmed, left = [], self.shard.count(first)
        for x, size in states:
            if left <= 0:
                break
            trimmed.append((x[:left], size[:left] if size is not None else None))
            left -= len(trimmed[-1][0])
        done = self.advance(trimmed, routing, start, len(self.model.blocks), first)
        names = [self.fidelity, "top1"] if self.has_labels else [self.fidelity]
        rows = [torch.zeros(0, len(names), dtype=torch.float64, device=self.reference[0].device)]
        for (x, size), reference, labels in zip(done, self.reference, self.labels, strict=False):
            normed = self.model.norm(x)
            outputs = head(self.model, normed, size, self.pre_logits)
            values = [FIDELITY[self.fidelity](reference[: len(x)], outputs)]
            if self.has_labels:
                logits = head(self.model, normed, size) if self.pre_logits else outputs
                values.append(1.0 - top1_error(logits, labels[: len(x)]))
            rows.append(torch.stack(values, 1).double())
        gathered = self.shard.gather(torch.cat(rows), first)
        metrics = {name: gathered[:, column] for column, name in enumerate(names)}
        metrics["loss"] = 1.0 - metrics["top1"] if self.objective == "top1" else metrics[self.fidelity]
        return metrics

    def first_images(self, count: int) -> Tensor:
        """The first ``count`` images of the set (on every rank, gathered from every rank's share)."""
        return self.shard.gather(torch.cat(self.raw)[: self.shard.count(count)], count)
