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

The per-image statistics are saved (``--stats_dir``) so that the bootstrap, the table and the figure are rerun
without the model; ``--reuse`` skips models whose statistics were saved with the same settings.

    nice -n 19 .venv/bin/python benchmarks/claims.py \\
        --models '[checkpoints/fmnist_supervised.safetensors, checkpoints/fmnist_distilled.safetensors]' \\
        --num_images 2000 --oracle_images 1000 --bootstrap 2000 --seed 0
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from jsonargparse import CLI
from torch import Tensor

from attnprune import load_model
from attnprune.scoring import SCORERS
from attnprune.selectivity.analysis import _patch_rows, layer_states, oracle_importance
from attnprune.selectivity.functional import normalized_entropy, spearman

RESULTS = Path(__file__).resolve().parent / "results"
NON_ATTENTION = ("statistics", "similarity")


# ------------------------------------------------------------------------------------------- per-image statistics
def claim_scorers(class_token: bool) -> list[str]:
    """Scorers compared in (b) and (c): attention, statistics and similarity (not the random control)."""
    return sorted(
        name
        for name, s in SCORERS.items()
        if s.family in ("attention", *NON_ATTENTION) and (class_token or not s.needs_class_token)
    )


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
    rows = _patch_rows(attn, prefix)
    every = normalized_entropy(rows).mean(dim=(1, 2))
    cls = normalized_entropy(rows[:, :, 0]).mean(dim=1) if prefix else torch.full_like(every, math.nan)
    return cls, every


@torch.no_grad()
def image_statistics(model, images: Tensor, scorers: list[str], oracle: bool = True) -> dict[str, Tensor]:
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


def informative_layers(model) -> list[bool]:
    """Blocks where removing a patch token can change the output: all but the last under a class-token readout."""
    depth = len(model.blocks)
    token_readout = getattr(model, "global_pool", "token") == "token"
    return [not (token_readout and layer == depth - 1) for layer in range(depth)]


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


def attention_leads(agreement: Tensor, attention: Tensor) -> Tensor:
    """``[..., S, L] -> [..., L]``: the best attention scorer agrees with the oracle strictly better than any other."""
    att = agreement.masked_fill(~attention[:, None], -math.inf).amax(-2)
    non = agreement.masked_fill(attention[:, None], -math.inf).amax(-2)
    return att > non


def transition_depth(agreement: Tensor, attention: Tensor, informative: Tensor) -> tuple[Tensor, Tensor]:
    """Claim (c): the block from which attention leads, and the first block where it leads at all.

    Args:
        agreement: mean Spearman with the oracle ``[..., S, L]``.
        attention: ``[S]`` bool, which scorers are attention scorers.
        informative: ``[L]`` bool, blocks where the oracle can vary (the others are skipped).

    Returns:
        ``(takes_over, first_lead)``, each ``[...]`` long: the first informative block from which the best attention
        scorer leads at every later informative block, and the first informative block where it leads; ``L`` (the
        depth) when there is none.
    """
    depth = agreement.shape[-1]
    leads = attention_leads(agreement, attention) & informative
    held = (leads | ~informative).flip(-1).cumprod(-1).flip(-1).bool()  # leads at every informative block from here on
    none = torch.full(leads.shape[:-1], depth, dtype=torch.long)
    blocks = torch.arange(depth).expand_as(leads)
    takes_over = torch.where(held & leads, blocks, depth).amin(-1)
    first = torch.where(leads, blocks, depth).amin(-1)
    return torch.minimum(takes_over, none), torch.minimum(first, none)


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
    informative = torch.tensor(stats["informative"])
    tail = (1 - level) / 2

    weights = bootstrap_weights(stats["all_entropy"].shape[0], bootstrap, seed)
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

    agreement = stats["spearman"].double()
    oracle_weights = bootstrap_weights(agreement.shape[0], bootstrap, seed + 1)
    mean, boot = agreement.mean(0), resampled_means(agreement, oracle_weights)
    gap, best_non, best_att = scorer_gap(mean, attention)
    gaps = scorer_gap(boot, attention)[0]
    lo, hi = interval(gaps, level)
    b = {
        "statistic": float(gap),
        "ci": [lo, hi],
        "holds": verdict(lo, hi) == "holds",
        "verdict": verdict(lo, hi),
        "shallow_blocks": shallow_blocks(agreement.shape[-1]),
        "best_non_attention": scorers[int(best_non)],
        "best_attention": scorers[int(best_att)],
    }

    depth = agreement.shape[-1]
    takes_over, first = transition_depth(mean, attention, informative)
    samples, firsts = transition_depth(boot, attention, informative)
    lo = int(torch.quantile(samples.double(), tail, interpolation="lower"))
    hi = int(torch.quantile(samples.double(), 1 - tail, interpolation="higher"))
    share = float((samples < depth).double().mean())
    c_verdict = "holds" if share >= 1 - tail else "reversed" if share <= tail else "unresolved"
    as_depth = lambda d: None if int(d) >= depth else int(d)  # noqa: E731
    c = {
        "depth": as_depth(takes_over),
        "ci": [as_depth(lo), as_depth(hi)],
        "holds": c_verdict == "holds",
        "verdict": c_verdict,
        "share_with_transition": share,
        "first_lead": as_depth(first),
        "distribution": {
            ("none" if d == depth else str(d)): float((samples == d).double().mean())
            for d in sorted(set(samples.tolist()))
        },
        "first_lead_distribution": {
            ("none" if d == depth else str(d)): float((firsts == d).double().mean())
            for d in sorted(set(firsts.tolist()))
        },
        "agreement": {s: mean[i].tolist() for i, s in enumerate(scorers)},
    }
    return {"a": a, "b": b, "c": c}


# ----------------------------------------------------------------------------------------------------- the run
def validation_images(network, batch_size: int = 50, data_root: str | None = None) -> Iterable[Tensor]:
    """Batches of Fashion-MNIST validation images (the 5,000 held out of training, in a fixed order), preprocessed
    for ``network``."""
    from attnprune.lit.data import FashionMNISTDataModule

    kwargs = {"root": data_root} if data_root else {}
    data = FashionMNISTDataModule(eval_batch_size=batch_size, num_workers=0, **kwargs).for_model(network)
    data.setup("validate")
    return (images for images, _ in data.val_dataloader())


def collect(network, batches: Iterable[Tensor], num_images: int, oracle_images: int, oracle_from: int = 0) -> dict:
    """Per-image statistics of ``network`` on the first ``num_images`` images of ``batches``, the oracle's on images
    ``oracle_from`` to ``oracle_images`` of them (``oracle_from > 0`` tops up statistics saved earlier).

    Returns:
        :func:`image_statistics` of all images concatenated (``spearman`` only for the oracle's images), and what
        :func:`claims` needs to read them: ``scorers``, ``informative``, ``readout``, ``depth``, counts and timings.
    """
    scorers = claim_scorers(network.has_class_token)
    parts: dict[str, list[Tensor]] = {}
    seen, timings = 0, {"entropy_s": 0.0, "oracle_s": 0.0}
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
        print(f"  {seen}/{num_images} images, {sum(timings.values()):.0f} s", flush=True)
        if seen >= num_images:
            break
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


def _bold(verdict: str) -> str:
    return verdict if verdict == "holds" else f"**{verdict}**"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _block(d: int | None) -> str:
    return "never" if d is None else str(d)


def table(rows: list[dict]) -> str:
    """The claims table in Markdown: each claim's statistic, 95% interval and verdict per model (not "holds" in bold),
    then (a) for both queries."""
    lines = [
        "| model | paradigm | blocks | images (oracle) | (a) query | (a) entropy shallow - deep | (a) 95% CI | (a) "
        "| (b) best non-attention vs best attention | (b) difference | (b) 95% CI | (b) "
        "| (c) attention takes over at block | (c) 95% CI | (c) |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | --- | --- | ---: | --- | --- | ---: | --- | --- |",
    ]
    for row in rows:
        a, b, c = row["claims"]["a"], row["claims"]["b"], row["claims"]["c"]
        query = "class token" if a["query"] == "cls" else "all queries"
        lines.append(
            f"| `{row['model']}` | {row['paradigm']} | {row['depth']} "
            f"| {row.get('images')} ({row.get('oracle_images')}) | {query} | {_num(a['statistic'])} "
            f"| [{_num(a['ci'][0])}, {_num(a['ci'][1])}] | {_bold(a['verdict'])} "
            f"| `{b['best_non_attention']}` vs `{b['best_attention']}` | {_num(b['statistic'])} "
            f"| [{_num(b['ci'][0])}, {_num(b['ci'][1])}] | {_bold(b['verdict'])} "
            f"| {_block(c['depth'])} | [{_block(c['ci'][0])}, {_block(c['ci'][1])}] | {_bold(c['verdict'])} |"
        )
    lines += [
        "",
        "| model | readout | class-token query: shallow - deep [95% CI] | all queries: shallow - deep [95% CI] "
        "| attention first leads at block |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for row in rows:
        a, c = row["claims"]["a"], row["claims"]["c"]
        cells = []
        for query in ("cls", "all"):
            q = a["queries"].get(query)
            cells.append(
                "no class token"
                if q is None
                else f"{_num(q['statistic'])} [{_num(q['ci'][0])}, {_num(q['ci'][1])}] {_bold(q['verdict'])}"
            )
        readout = "class token" if a["query"] == "cls" else "average pool"
        lines.append(f"| `{row['model']}` | {readout} | {cells[0]} | {cells[1]} | {_block(c['first_lead'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> list[Path]:
    """Entropy over depth per model (class-token and all queries, 95% bands), transition depth marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False, sharey=True)
    for ax, row in zip(axes.flat, rows, strict=False):
        a, c = row["claims"]["a"], row["claims"]["c"]
        for query, colour in (("cls", "tab:blue"), ("all", "tab:orange")):
            if query not in a["queries"]:
                continue
            q = a["queries"][query]
            blocks = range(len(q["entropy"]))
            label = "class-token query" if query == "cls" else "all queries"
            ax.plot(
                blocks, q["entropy"], marker="o", color=colour, label=label + (" (readout)" * (a["query"] == query))
            )
            ax.fill_between(blocks, q["entropy_ci"][0], q["entropy_ci"][1], color=colour, alpha=0.25, linewidth=0)
        if c["depth"] is not None:
            lo, hi = c["ci"]
            ax.axvline(
                c["depth"], color="k", linestyle="--", linewidth=1.2, label=f"attention takes over: {c['depth']}"
            )
            ax.axvspan(lo - 0.5, (hi if hi is not None else row["depth"] - 1) + 0.5, color="k", alpha=0.07)
        else:
            ax.text(0.02, 0.04, "attention never takes over", transform=ax.transAxes, fontsize=8)
        ax.set(title=f"{row['model']} ({row['paradigm']})", xlabel="block (0-based)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if c["depth"] is None else "best")
    for ax in axes[:, 0]:
        ax.set_ylabel("normalized attention entropy")
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    paths = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def main(
    models: list[str],
    num_images: int = 2000,
    oracle_images: int = 1000,
    bootstrap: int = 2000,
    seed: int = 0,
    batch_size: int = 50,
    threads: int | None = None,
    stats_dir: str = str(RESULTS / "claims_stats"),
    output: str = str(RESULTS / "claims.json"),
    figure: str = str(RESULTS / "claims.png"),
    reuse: bool = True,
    saved_only: bool = False,
    data_root: str | None = None,
) -> dict:
    """Test the claims on every model in ``models`` (weights files), write ``output``, print the table, plot.

    Args:
        models: weights files (or Lightning checkpoints) loadable with ``attnprune.load_model``.
        num_images: first validation images of Fashion-MNIST analysed (never test images); (a) uses all of them.
        oracle_images: the first of these on which the leave-one-out oracle runs; (b) and (c) use them.
        bootstrap: bootstrap samples.
        seed: bootstrap seed.
        batch_size: images per forward.
        threads: torch CPU threads (default: torch's).
        stats_dir: where per-image statistics are saved (``<model stem>.pt``).
        output: the claims JSON.
        figure: the figure (``.png`` and ``.pdf``).
        reuse: load saved statistics of a model analysed with the same ``num_images`` (and run the oracle only on the
            images past those it was run on, up to ``oracle_images``).
        saved_only: run no model: use every model's saved statistics as they are (with as many oracle images as
            they hold).
        data_root: folder of the Fashion-MNIST IDX files (default: the data module's).
    """
    if threads:
        torch.set_num_threads(threads)
    Path(stats_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for model_path in models:
        cache = Path(stats_dir) / f"{Path(model_path).stem}.pt"
        saved = torch.load(cache, weights_only=False) if reuse and cache.is_file() else None
        if saved is not None and (saved["images"] != num_images or saved["oracle_images"] > oracle_images):
            saved = None
        if saved_only:
            saved = torch.load(cache, weights_only=False)
        stats = saved
        if not saved_only and (saved is None or saved["oracle_images"] < oracle_images):
            begin = 0 if saved is None else saved["oracle_images"]
            start = time.perf_counter()
            network = load_model(model_path)
            batches = validation_images(network, batch_size, data_root)
            print(f"{model_path}: oracle on images {begin}-{oracle_images} of {num_images}", flush=True)
            stats = collect(network, batches, num_images, oracle_images, oracle_from=begin)
            stats["model"] = model_path
            stats["seconds"] = time.perf_counter() - start
            stats["threads"] = torch.get_num_threads()
            if saved is not None:  # top up: the oracle statistics of the first images were saved
                stats["spearman"] = torch.cat([saved["spearman"], stats["spearman"]])
                for key in ("seconds", "oracle_s"):
                    stats[key] += saved[key]
            stats.pop("oracle_from")
            torch.save(stats, cache)
        start = time.perf_counter()
        result = claims(stats, bootstrap, seed)
        rows.append(
            {
                "model": Path(model_path).stem,
                "paradigm": stats["paradigm"],
                "claims": result,
                "file": model_path,
                "depth": stats["depth"],
                "images": stats["images"],
                "oracle_images": stats["oracle_images"],
                "analysis_seconds": round(stats["seconds"], 1),
                "bootstrap_seconds": round(time.perf_counter() - start, 2),
            }
        )
    out = {
        "models": rows,
        "across_models": across_models(rows),
        "settings": {
            "split": "Fashion-MNIST validation (5,000 training images held out, FashionMNISTDataModule seed 0)",
            "num_images": sorted({row["images"] for row in rows}),
            "oracle_images": sorted({row["oracle_images"] for row in rows}),
            "bootstrap": bootstrap,
            "seed": seed,
            "level": 0.95,
            "command": "benchmarks/claims.py (see the module docstring for the definitions)",
        },
    }
    Path(output).write_text(json.dumps(out, indent=1) + "\n")
    print(table(rows))
    summary = out["across_models"]
    print(
        f"(c) across models: depths {summary['depths']}; the depth depends on the model (two 95% intervals apart): "
        f"{summary['depends_on_model']}; attention's lead is lost again in {summary['lead_not_kept']}"
    )
    paths = plot(rows, Path(figure))
    print(f"wrote {output}, {', '.join(map(str, paths))}")
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    CLI(main, as_positional=False)
