"""The three claims attnprune rests on, tested on every model given, each with a bootstrap confidence interval.

- (a) attention is diffuse in shallow layers and concentrates deeper. Statistic: the normalized entropy of
  attention (over the patch tokens) averaged over the shallow third of the blocks minus that of the deep third;
  > 0 when deep attention is more concentrated. The verdict reads the query the model's readout uses (the class
  token for a class-token readout, all queries for an average-pool readout); both are reported, with the slope of
  entropy over depth (per block).
- (b) non-attention scorers are more reliable than attention in shallow layers. Statistic: over the shallow third of
  the blocks, the mean Spearman agreement with the leave-one-out oracle of the best non-attention scorer (embedding
  statistics and similarity; the ``random`` control is left out) minus that of the best attention scorer; the best
  scorer of each family is chosen again in every bootstrap sample.
- (c) the depth where attention takes over depends on the model and its training. Statistic: the transition depth,
  the first block from which the best attention scorer's oracle agreement is higher than every non-attention
  scorer's at every later block (blocks where the oracle is constant, the last block of a class-token readout, are
  skipped); ``None`` when attention never takes over. Also reported: the first block where attention leads at all
  (when it differs, the lead is not kept once gained) and the bootstrap distribution of the depth.

Every statistic is a mean over images of per-image values (entropy per image and block; Spearman per image, scorer
and block), so the model runs once per image; a bootstrap sample only reweights the images (seeded multinomial
counts), which costs one matrix product. Verdicts read the 95% percentile interval: ``holds`` when it lies on the
claim's side, ``reversed`` when it lies on the other side, ``unresolved`` otherwise. For (c): ``holds`` when
attention takes over in at least 97.5% of the samples, ``reversed`` when it takes over in at most 2.5%.

``benchmarks/claims.py`` runs them on the shipped models and writes ``benchmarks/results/claims.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprune.scoring import SCORERS
from attnprune.selectivity.analysis import layer_states, oracle_importance, patch_rows
from attnprune.selectivity.functional import normalized_entropy, spearman
from attnprune.selectivity.transition import claim_scorers, first_lead, informative_layers, transition_depth

__all__ = [
    "across_models",
    "attention_entropy",
    "bootstrap_weights",
    "claims",
    "collect",
    "entropy_drop",
    "entropy_slope",
    "image_statistics",
    "interval",
    "resampled_means",
    "scorer_gap",
    "shallow_blocks",
    "verdict",
]


# ------------------------------------------------------------------------------------------- per-image statistics
def attention_entropy(attn: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """Normalized entropy of one block's attention over the patch tokens, per image.

    Args:
        attn: attention probabilities ``[B, H, T, T]`` (queries, keys), the ``prefix`` tokens first.
        prefix: prefix tokens (class, distillation, registers); rows are restricted to the patch keys and
            renormalised, as :class:`attnprune.selectivity.SelectivityAnalyzer` does.

    Returns:
        ``(cls, all)``, each ``[B]``: the class-token query's entropy averaged over heads (NaN without a prefix
        token), and every query's averaged over heads and queries.
    """
    rows = patch_rows(attn, prefix)
    every = normalized_entropy(rows).mean(dim=(1, 2))
    cls = normalized_entropy(rows[:, :, 0]).mean(dim=1) if prefix else torch.full_like(every, math.nan)
    return cls, every


@torch.no_grad()
def image_statistics(model: nn.Module, images: Tensor, scorers: list[str], oracle: bool = True) -> dict[str, Tensor]:
    """Per-image statistics of one batch with the unpruned model.

    Returns:
        ``cls_entropy`` and ``all_entropy`` ``[B, L]`` (see :func:`attention_entropy`) and, with ``oracle``,
        ``spearman`` ``[B, S, L]``: each scorer's Spearman correlation with the leave-one-out oracle importance
        (:func:`attnprune.selectivity.oracle_importance`), in the order of ``scorers``.
    """
    prefix = model.num_prefix_tokens
    states, output = layer_states(model, images)
    cls, every, agreement = [], [], []
    for layer, state in enumerate(states):
        c, a = attention_entropy(state.ctx.attention, prefix)
        cls.append(c)
        every.append(a)
        if oracle:
            importance = oracle_importance(model, states, layer, output)
            agreement.append(
                torch.stack([spearman(SCORERS[s](state.tokens, state.ctx), importance) for s in scorers], 1)
            )
    stats = {"cls_entropy": torch.stack(cls, -1), "all_entropy": torch.stack(every, -1)}
    if oracle:
        stats["spearman"] = torch.stack(agreement, -1)
    return stats


# ------------------------------------------------------------------------------------- statistics (vectorised)
def shallow_blocks(depth: int) -> int:
    """Blocks in the shallow (and in the deep) third: ``ceil(depth / 3)``."""
    return max(1, math.ceil(depth / 3))


def entropy_drop(entropy: Tensor) -> Tensor:
    """Claim (a): mean entropy over the shallow third of the blocks minus over the deep third, ``[..., L] -> [...]``."""
    k = shallow_blocks(entropy.shape[-1])
    return entropy[..., :k].mean(-1) - entropy[..., -k:].mean(-1)


def entropy_slope(entropy: Tensor) -> Tensor:
    """Least-squares slope of entropy over the block index, ``[..., L] -> [...]`` (< 0: concentrates deeper)."""
    depth = torch.arange(entropy.shape[-1], dtype=entropy.dtype)
    centred = depth - depth.mean()
    return (entropy * centred).sum(-1) / (centred * centred).sum()


def scorer_gap(agreement: Tensor, attention: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Claim (b): best non-attention scorer minus best attention scorer, oracle agreement over the shallow third.

    Args:
        agreement: mean Spearman with the oracle ``[..., S, L]``.
        attention: ``[S]`` bool, which scorers are attention scorers.

    Returns:
        ``(gap, best_non_attention, best_attention)``: ``[...]``, and the indices of the two best scorers ``[...]``.
    """
    shallow = agreement[..., : shallow_blocks(agreement.shape[-1])].mean(-1)  # [..., S]
    non = shallow.masked_fill(attention, -math.inf).max(-1)
    att = shallow.masked_fill(~attention, -math.inf).max(-1)
    return non.values - att.values, non.indices, att.indices


# ----------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_weights(n: int, samples: int, seed: int) -> Tensor:
    """``[samples, n]`` resampling counts: row ``r`` counts how often each of ``n`` images is drawn (with
    replacement, ``n`` draws) in bootstrap sample ``r``. The same seed gives the same counts."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (samples, n), generator=generator)
    return torch.zeros(samples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64)
    )


def resampled_means(values: Tensor, weights: Tensor) -> Tensor:
    """Means of per-image ``values [n, ...]`` under each row of ``weights [R, n]``: ``[R, ...]``."""
    n = values.shape[0]
    return (weights @ values.reshape(n, -1).to(weights.dtype) / weights.sum(1, keepdim=True)).view(
        -1, *values.shape[1:]
    )


def interval(samples: Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples ``[R]``."""
    tail = (1 - level) / 2
    lo, hi = torch.quantile(samples.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    """``holds`` when the interval is above 0, ``reversed`` when below, ``unresolved`` when it contains 0."""
    return "holds" if lo > 0 else "reversed" if hi < 0 else "unresolved"


# ---------------------------------------------------------------------------------------------------- the claims
def claims(stats: dict, bootstrap: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Test the three claims on one model's per-image statistics (see the module docstring).

    Args:
        stats: ``cls_entropy``, ``all_entropy`` ``[n, L]``, ``spearman`` ``[m, S, L]``, ``scorers`` (``S`` names),
            ``informative`` (``L`` bools), ``readout`` (``"cls"`` or ``"all"``).
        bootstrap: bootstrap samples.
        seed: seed of the resampling (the entropy images and the oracle images are resampled independently).
        level: confidence level of the intervals.

    Returns:
        ``{"a": ..., "b": ..., "c": ...}`` in the schema of ``claims.json`` (with details).
    """
    scorers = list(stats["scorers"])
    attention = torch.tensor([SCORERS[s].family == "attention" for s in scorers])
    agreement = stats["spearman"].double()
    oracle_weights = bootstrap_weights(agreement.shape[0], bootstrap, seed + 1)
    mean, boot = agreement.mean(0), resampled_means(agreement, oracle_weights)
    return {
        "a": _claim_a(stats, bootstrap_weights(stats["all_entropy"].shape[0], bootstrap, seed), level),
        "b": _claim_b(mean, boot, attention, scorers, level),
        "c": _claim_c(mean, boot, attention, torch.tensor(stats["informative"]), scorers, level),
    }


def _claim_a(stats: dict, weights: Tensor, level: float) -> dict:
    """Claim (a) for both queries, the verdict read on the readout's query."""
    tail = (1 - level) / 2
    queries = {}
    for query in ("cls", "all"):
        entropy = stats[f"{query}_entropy"].double()
        if torch.isnan(entropy).all():
            continue
        mean, boot = entropy.mean(0), resampled_means(entropy, weights)
        drop, slope = entropy_drop(boot), entropy_slope(boot)
        lo, hi = interval(drop, level)
        queries[query] = {
            "statistic": float(entropy_drop(mean)),
            "ci": [lo, hi],
            "verdict": verdict(lo, hi),
            "slope": float(entropy_slope(mean)),
            "slope_ci": list(interval(slope, level)),
            "entropy": mean.tolist(),
            "entropy_ci": [torch.quantile(boot, q, dim=0).tolist() for q in (tail, 1 - tail)],
        }
    readout = stats["readout"] if stats["readout"] in queries else "all"
    a = {k: queries[readout][k] for k in ("statistic", "ci")}
    a.update(holds=queries[readout]["verdict"] == "holds", verdict=queries[readout]["verdict"], query=readout)
    a["queries"] = queries
    return a


def _claim_b(mean: Tensor, boot: Tensor, attention: Tensor, scorers: list[str], level: float) -> dict:
    """Claim (b) from the oracle agreement ``[S, L]`` and its bootstrap samples ``[R, S, L]``."""
    gap, best_non, best_att = scorer_gap(mean, attention)
    lo, hi = interval(scorer_gap(boot, attention)[0], level)
    return {
        "statistic": float(gap),
        "ci": [lo, hi],
        "holds": verdict(lo, hi) == "holds",
        "verdict": verdict(lo, hi),
        "shallow_blocks": shallow_blocks(mean.shape[-1]),
        "best_non_attention": scorers[int(best_non)],
        "best_attention": scorers[int(best_att)],
    }


def _claim_c(
    mean: Tensor, boot: Tensor, attention: Tensor, informative: Tensor, scorers: list[str], level: float
) -> dict:
    """Claim (c): the transition depth, its interval and distribution, and the first lead beside it."""
    depth, tail = mean.shape[-1], (1 - level) / 2
    takes_over, first = transition_depth(mean, attention, informative), first_lead(mean, attention, informative)
    samples, firsts = transition_depth(boot, attention, informative), first_lead(boot, attention, informative)
    lo = int(torch.quantile(samples.double(), tail, interpolation="lower"))
    hi = int(torch.quantile(samples.double(), 1 - tail, interpolation="higher"))
    share = float((samples < depth).double().mean())
    c_verdict = "holds" if share >= 1 - tail else "reversed" if share <= tail else "unresolved"

    def as_depth(d: Tensor | int) -> int | None:
        return None if int(d) >= depth else int(d)

    def distribution(values: Tensor) -> dict[str, float]:
        return {
            ("none" if d == depth else str(d)): float((values == d).double().mean())
            for d in sorted(set(values.tolist()))
        }

    return {
        "depth": as_depth(takes_over),
        "ci": [as_depth(lo), as_depth(hi)],
        "holds": c_verdict == "holds",
        "verdict": c_verdict,
        "share_with_transition": share,
        "first_lead": as_depth(first),
        "distribution": distribution(samples),
        "first_lead_distribution": distribution(firsts),
        "agreement": {s: mean[i].tolist() for i, s in enumerate(scorers)},
    }


# ----------------------------------------------------------------------------------------------------- the run
def collect(
    network: nn.Module,
    batches: Iterable[Tensor],
    num_images: int,
    oracle_images: int,
    oracle_from: int = 0,
    progress: bool = True,
) -> dict:
    """Per-image statistics of ``network`` on the first ``num_images`` images of ``batches``, the oracle's on images
    ``oracle_from`` to ``oracle_images`` of them (``oracle_from > 0`` tops up statistics saved earlier).

    Args:
        network: the unpruned model.
        batches: preprocessed validation images (never test images).
        num_images: images analysed.
        oracle_images: the first of them that get the leave-one-out oracle.
        oracle_from: images before this one already had the oracle (topping up earlier statistics).
        progress: show a progress bar.

    Returns:
        :func:`image_statistics` of all images concatenated (``spearman`` only for the oracle's images), and what
        :func:`claims` needs to read them: ``scorers``, ``informative``, ``readout``, ``depth``, counts and timings.
    """
    scorers = claim_scorers(network.has_class_token)
    parts: dict[str, list[Tensor]] = {}
    seen, timings = 0, {"entropy_s": 0.0, "oracle_s": 0.0}
    bar = tqdm(total=num_images, desc="claims statistics", unit="image", disable=not progress)
    for images in batches:
        images = images[: num_images - seen]
        begin = min(len(images), max(0, oracle_from - seen))  # images [begin, end) of the batch get the oracle
        end = min(len(images), max(0, oracle_images - seen))
        for chunk, oracle in ((images[:begin], False), (images[begin:end], True), (images[end:], False)):
            if len(chunk):
                start = time.perf_counter()
                for key, value in image_statistics(network, chunk, scorers, oracle).items():
                    parts.setdefault(key, []).append(value)
                timings["oracle_s" if oracle else "entropy_s"] += time.perf_counter() - start
        seen += len(images)
        bar.update(len(images))
        if seen >= num_images:
            break
    bar.close()
    stats = {key: torch.cat(value) for key, value in parts.items()}
    readout = "cls" if getattr(network, "global_pool", "token") == "token" and network.has_class_token else "all"
    stats.update(
        paradigm=getattr(network, "attnprune_spec", {}).get("paradigm", "unknown"),
        depth=len(network.blocks),
        scorers=scorers,
        informative=informative_layers(network),
        readout=readout,
        images=seen,
        oracle_images=min(oracle_images, seen),
        oracle_from=oracle_from,
        **timings,
    )
    return stats


def across_models(rows: list[dict]) -> dict:
    """Claim (c) across models: the pairs of models whose transition-depth intervals are apart ("never" counting as
    deeper than any block), and the models where attention leads at some block but not at every later one."""

    def bounds(row: dict) -> tuple[float, float]:
        return tuple(math.inf if d is None else d for d in row["claims"]["c"]["ci"])

    apart = [
        [x["model"], y["model"]]
        for i, x in enumerate(rows)
        for y in rows[i + 1 :]
        if bounds(x)[1] < bounds(y)[0] or bounds(y)[1] < bounds(x)[0]
    ]
    return {
        "depths": {row["model"]: row["claims"]["c"]["depth"] for row in rows},
        "depends_on_model": bool(apart),
        "pairs_apart": apart,
        "lead_not_kept": [
            row["model"]
            for row in rows
            if row["claims"]["c"]["first_lead"] is not None
            and row["claims"]["c"]["first_lead"] != row["claims"]["c"]["depth"]
        ],
    }
