"""The ``diffrate`` strategy: DiffRate's differentiable rate search (Chen et al., ICCV 2023; code OpenGVLab/DiffRate)
beside the discrete ones, with the model's weights frozen.

Each block from the second on learns two distributions over candidate kept counts, for pruning by class-token
attention and for merging into the most similar kept token, through the relaxed forward of
:mod:`attnprune.search.relaxation`. Every step runs it forward and backward on one batch of the searched images and
takes an AdamW step on the logits (no weight decay), the learning rate cosine-annealed from ``lr`` to ``min_lr`` over
the steps, minimising

    loss = task + flops_weight * (4.6 * (F - target) / F_unpruned) ** 2

with ``F`` the relaxed FLOPs. The official code (``engine.py``) adds ``5 * (F / 1e9 - target_gflops) ** 2``; FLOPs
are counted here in units of the unpruned model's FLOPs / 4.6, the GFLOPs of DeiT-S (the model whose weight of 5 the
official defaults were set on), so the penalty is the published one on DeiT-S and keeps its weight on any model.
The task loss is the search's objective: by default the KL divergence of the relaxed model's class distribution from
the unpruned model's on the same images (cosine distance of the features for a headless model), which needs no
labels, like the rest of the search; ``objective="top1"`` uses cross-entropy against the labels, as the official code
does (there with mixup, cutmix and label smoothing on augmented ImageNet, here on the cached images as they are).

The result is :meth:`Routing.diffrate` of the kept counts the logits give (the ceiling of each expected count). A
routing whose :func:`~attnprune.flops.count_flops` lands above the budget (the rounding, the scorer's and merging's
own work, a penalty that settles above the target) is brought within it one token at a time, where most tokens are
left (the deepest such block on a tie), and the report says how many tokens that moved.

Data-parallel (:mod:`~attnprune.search.distributed`), each step's batch is split among the ranks, each computing its
images' part of the loss (rank 0 adding the penalty), and their gradients are summed in rank order, so every rank
takes the same optimizer step. The rate search runs on the CPU only.
"""

from __future__ import annotations

import numbers
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler
from torch import Tensor
from tqdm.auto import tqdm

from attnprune.errors import UserError
from attnprune.fidelity import FIDELITY
from attnprune.flops import count_flops
from attnprune.routing import Routing
from attnprune.search.distributed import sum_over_ranks
from attnprune.search.relaxation import block_rates, expected_kept, kept_candidates, relaxed_flops, relaxed_forward
from attnprune.search.space import InfeasibleBudget
from attnprune.search.state import Best, SearchState
from attnprune.search.strategy import RateOptions, SearchContext
from attnprune.vit import num_patch_tokens

__all__ = ["DEIT_S_GFLOPS", "diffrate", "check_rate_search", "flops_penalty", "rate_schedule", "within_budget"]

DEIT_S_GFLOPS = 4.6  # the unit of the FLOPs penalty: the unpruned model counts as DeiT-S's 4.6 GFLOPs


def check_rate_search(model: VisionTransformer, rates: RateOptions) -> int:
    """Refuse settings the rate search cannot run with, before any work.

    Returns:
        The FLOPs of the cheapest routing it can return (one patch token left after block 1).

    Raises:
        UserError: a model without a class token (DiffRate ranks tokens by class-token attention), a model off the
            CPU (the relaxation keeps its logits there), or a setting out of range.
    """
    if not model.has_class_token:
        raise UserError(
            "search strategy 'diffrate' ranks tokens by class-token attention, but the model has no class token "
            "(class_token=False); use strategy 'beam'"
        )
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(
            f"search strategy 'diffrate' runs on the CPU only, got a model on {device}; use strategy 'beam'"
        )
    patches = num_patch_tokens(model)
    for name in ("steps", "batch_size", "granularity"):
        value = getattr(rates, name)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise UserError(f"search rates.{name} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "seed"):
        value = getattr(rates, name)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise UserError(f"search rates.{name} must be an integer >= 0, got {value!r}")
    if rates.granularity >= patches:
        raise UserError(f"search rates.granularity {rates.granularity} leaves the {patches} patch tokens one candidate")
    for name in ("lr", "min_lr", "flops_weight"):
        value = getattr(rates, name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise UserError(f"search rates.{name} must be a finite number >= 0, got {value!r}")
    if not 0 < rates.lr or rates.min_lr > rates.lr:
        raise UserError(f"search rates need 0 <= min_lr <= lr and lr > 0, got lr={rates.lr!r}, min_lr={rates.min_lr!r}")
    depth = len(model.blocks)
    cheapest = [patches + 1] + [2] * (depth - 1)
    return count_flops(model, Routing.diffrate(cheapest, cheapest))


def flops_penalty(flops: Tensor, target: float, unpruned: float, weight: float) -> Tensor:
    """``weight * (4.6 * (flops - target) / unpruned) ** 2``: the official ``5 * (F / 1e9 - target) ** 2`` with the
    unpruned model counted as DeiT-S's 4.6 GFLOPs."""
    return weight * (DEIT_S_GFLOPS * (flops - target) / unpruned) ** 2


def rate_schedule(logits: Tensor, patches: int, granularity: int) -> tuple[list[int], list[int]]:
    """The kept counts of the ``logits`` ``[L - 1, 2, C]``, DiffRate's ``prune_kept_num`` and ``merge_kept_num``
    (one per block, class token included; block 0 keeps every token)."""
    candidates = kept_candidates(patches, granularity)
    with torch.no_grad():
        counts = [[int(expected_kept(row, candidates)) + 1 for row in block] for block in logits]
    return [patches + 1] + [p for p, _ in counts], [patches + 1] + [m for _, m in counts]


def within_budget(
    model: VisionTransformer, prune_kept: list[int], merge_kept: list[int], target: float
) -> tuple[Routing, int]:
    """:meth:`Routing.diffrate` of the kept counts, with one token fewer after a block at a time until its FLOPs are
    within ``target``: after the block that leaves the most tokens (the deepest of those on a tie), by merging one
    more where it merges, else by pruning one more.

    Returns:
        The routing and the number of tokens removed to bring it within budget.

    Raises:
        InfeasibleBudget: even one token after block 1 is above the target.
    """
    prune, merge, moved = list(prune_kept), list(merge_kept), 0
    while count_flops(model, routing := Routing.diffrate(prune, merge)) > target:
        left, pruned, tokens = [], [], prune[0]
        for p, m in zip(prune, merge, strict=True):
            pruned.append(min(tokens, p))
            tokens = min(pruned[-1], m)
            left.append(tokens)
        layer = max(range(1, len(left)), key=lambda i: (left[i], i))
        if left[layer] <= 2:
            raise InfeasibleBudget(f"no DiffRate schedule of this model meets {target / 1e9:.4g} GFLOPs")
        if merge[layer] < pruned[layer]:
            merge[layer] -= 1
        else:
            prune[layer] = pruned[layer] - 1
        moved += 1
    return routing, moved


class _Batches:
    """The searched images' indices per step: all of them when a batch holds them, else a seeded shuffle per pass
    over them (the last incomplete batch of a pass dropped), the same on every run and on a resumed one."""

    def __init__(self, images: int, batch_size: int, seed: int) -> None:
        self.images, self.batch, self.seed = images, min(batch_size, images), seed
        self.epoch, self.order = -1, torch.arange(images)

    def __call__(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.images // self.batch)
        if self.batch < self.images and epoch != self.epoch:
            generator = torch.Generator().manual_seed((self.seed << 32) + epoch)
            self.epoch, self.order = epoch, torch.randperm(self.images, generator=generator)
        return self.order[position * self.batch : (position + 1) * self.batch]


def _optimizer(logits: Tensor, rates: RateOptions, saved: dict | None) -> tuple[torch.optim.AdamW, CosineLRScheduler]:
    """AdamW on the logits (no weight decay) and its cosine schedule over the steps, restored from ``saved``."""
    optimizer = torch.optim.AdamW([logits], lr=rates.lr, weight_decay=0.0)
    scheduler = CosineLRScheduler(optimizer, t_initial=rates.steps, lr_min=rates.min_lr)
    if saved is not None:
        state = optimizer.state_dict()
        if saved["optimizer"]:
            state["state"] = {0: {key: torch.tensor(value) for key, value in saved["optimizer"].items()}}
        optimizer.load_state_dict(state)
        scheduler.load_state_dict(saved["scheduler"])
    return optimizer, scheduler


def _saved(logits: Tensor, optimizer: torch.optim.AdamW, scheduler: CosineLRScheduler) -> dict:
    """The rate search's own state as JSON-ready data (float32 values are exact as JSON doubles)."""
    adam = optimizer.state.get(logits, {})
    return {
        "logits": logits.tolist(),
        "optimizer": {key: value.tolist() for key, value in adam.items()},
        "scheduler": scheduler.state_dict(),
    }


def _step_loss(
    context: SearchContext, data: dict[str, Tensor | None], index: Tensor, logits: Tensor, step: int
) -> tuple[Tensor, Tensor]:
    """This rank's part of the loss of one step on the searched images ``index`` (its images' task losses over the
    batch, and on rank 0 the FLOPs penalty), and the relaxed FLOPs."""
    model, evaluator, rates = context.model, context.evaluator, context.rates
    candidates = kept_candidates(num_patch_tokens(model), rates.granularity)
    block = block_rates(logits, candidates, model.num_prefix_tokens)
    flops = relaxed_flops(model, block)
    weight = rates.flops_weight if step >= rates.warmup_steps and evaluator.shard.rank == 0 else 0.0
    unpruned = count_flops(model, Routing())
    loss = flops_penalty(flops, context.target, unpruned, weight)
    local = evaluator.shard.local(index)
    if len(local):
        outputs = relaxed_forward(model, data["inputs"][local], block, evaluator.pre_logits)
        if evaluator.objective == "top1":
            task = F.cross_entropy(outputs, data["labels"][local], reduction="sum")
        else:
            task = FIDELITY[evaluator.objective](data["reference"][local], outputs).sum()
        loss = task / len(index) + loss.to(task.dtype)
    return loss, flops


def diffrate(context: SearchContext, state: SearchState) -> None:
    """Run (or resume) the rate search in ``state``; see the module docstring."""
    model, evaluator, rates = context.model, context.evaluator, context.rates
    patches, depth = num_patch_tokens(model), len(model.blocks)
    data = {
        "inputs": torch.cat(evaluator.inputs),
        "reference": torch.cat(evaluator.reference),
        "labels": torch.cat(evaluator.labels) if evaluator.objective == "top1" else None,
    }
    saved = state.extra
    shape = (depth - 1, 2, len(kept_candidates(patches, rates.granularity)))
    initial = torch.tensor(saved["logits"]) if saved is not None else torch.zeros(shape)  # uniform, as the official
    logits = initial.requires_grad_(True)
    optimizer, scheduler = _optimizer(logits, rates, saved)
    batches = _Batches(evaluator.images, rates.batch_size, rates.seed)
    bar = tqdm(total=rates.steps, initial=state.step, desc="routing search (diffrate)", disable=not context.progress)
    for step in range(state.step, rates.steps):
        started = time.perf_counter()
        index = batches(step)
        scheduler.step(step)
        with torch.enable_grad():
            loss, flops = _step_loss(context, data, index, logits, step)
            (grad,) = torch.autograd.grad(loss, [logits], allow_unused=True, materialize_grads=True)
        logits.grad = sum_over_ranks(grad)
        optimizer.step()
        evaluator.block_passes += depth * len(index) / evaluator.images
        state.step, state.forward_backward_passes = step + 1, state.forward_backward_passes + 1
        state.extra = {**_saved(logits, optimizer, scheduler), "relaxed_flops": flops.item()}
        state.checkpoint(evaluator, context.path, started)
        bar.update(1)
    bar.close()
    if state.best is None:  # saved only with the routing, so an interrupted end reruns from the saved logits
        started = time.perf_counter()
        prune_kept, merge_kept = rate_schedule(logits.detach(), patches, rates.granularity)
        routing, moved = within_budget(model, prune_kept, merge_kept, context.target)
        state.best = Best(routing, evaluator.measure(evaluator.initial(), routing, 0))
        relaxed = state.extra.get("relaxed_flops") if state.extra else None
        state.extra = {
            **(state.extra or {}),
            "report": {
                "rate_schedule": {"prune_kept": prune_kept, "merge_kept": merge_kept},
                "relaxed_flops_ratio": None if relaxed is None else relaxed / count_flops(model, Routing()),
                "tokens_moved_within_budget": moved,
            },
        }
        state.checkpoint(evaluator, context.path, started)
