"""Does the searched routing keep its lead on images and models the search was not tuned on?

For every model and budget, the default search (``attnprune.search.search_routing``) runs on several disjoint draws
of validation images (split seeds); every method is then scored on the test split, which no choice ever sees:
searched, ToMe, EViT, uniform attention top-k and random, each baseline the routing with the most FLOPs within the
same budget (EViT and attention top-k only on models with a class token). The margin is the searched routing's test
top-1 minus the best baseline's, per split seed. Each searched row also holds ``found_top1``, the test top-1 of the
routing the search found, returned by the held-out check or not: a second table gives its margin, what the check
costs and saves. Every row holds ``test_kl``, the search's objective on the test images (the KL divergence of the
pruned model's class distribution from the unpruned model's, mean over images), and each searched row ``paired_se``
(``found_paired_se`` for the routing found): the standard error of its test top-1 minus each baseline's, paired over
the test images. A third table gives the test KL of the routing found against the closest baseline's; the summary
ends with how large a top-1 margin the test split resolves and, seed by seed, the cells with a negative mean margin.

Rows go to ``benchmarks/results/search_generalization.json`` after every search (rerunning skips what is there, and
each search resumes from its state file), then one table and a figure of the margins are written.

    .venv/bin/python benchmarks/search_generalization.py --models checkpoints/fmnist_*.safetensors \\
        benchmarks/models/fmnist_gen_*.safetensors
    .venv/bin/python benchmarks/search_generalization.py --summarize   # table, README table and figure only

Runs on several cores at once write to their own ``--out_dir``; ``--merge OTHER.json ...`` folds their rows in.
``--reuse EARLIER.json`` takes DiffRate's rows from an earlier run on the same draws instead of rerunning its rate
search (3-4 minutes a draw): that search does not depend on the default one, so its schedule, FLOPs and test scores
hold. The paired standard errors against DiffRate need both routings' scores image by image, which the earlier file
keeps only as the errors of the routing it found: they are taken over where the default search finds the same
routing now (same test top-1 and KL) and the check returns it, and otherwise left out and named in the searched row's
``paired_se_missing``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from attnprune import Routing, count_flops, load_model  # noqa: E402
from attnprune.atomic import check_output_dir, staged_files, write_text_atomic  # noqa: E402
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli  # noqa: E402
from attnprune.lit.data import FashionMNISTDataModule  # noqa: E402
from attnprune.lit.data.splits import disjoint_draws  # noqa: E402
from attnprune.routing.baselines import matched_baselines  # noqa: E402
from attnprune.search import search_routing  # noqa: E402
from attnprune.search.check import standard_error  # noqa: E402
from attnprune.search.evaluator import Evaluator  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BASELINES = ("tome", "evit", "topk_attention", "pitome", "ppt", "diffrate", "random")
METHODS = ("searched", *BASELINES)
COST = ("wall_time_s", "forward_backward_passes", "full_forward_equivalents", "images_seen")


def key(routing: Routing) -> str:
    return json.dumps(routing.to_dict(), sort_keys=True)


def run(args: argparse.Namespace) -> None:
    out = args.out_dir / "search_generalization.json"
    result = json.loads(out.read_text()) if out.is_file() else {"rows": [], "models": {}}
    # a cell is done once its searched row has the paired standard errors against every baseline run now (the peer
    # PiToMe always, DiffRate's rate search with --diffrate; PPT is left out where its r cannot get under the budget);
    # older rows are redone (the search resumes from its finished state in seconds)
    wanted = {"pitome"} | ({"diffrate"} if args.diffrate else set())
    done = {(r["model"], r["budget"], r["split_seed"]) for r in result["rows"] if _complete(r, wanted)}
    result["rows"] = [r for r in result["rows"] if (r["model"], r["budget"], r["split_seed"]) in done]
    reuse = _reusable(args.reuse) if args.reuse else {}
    loaded = {}
    for budget in args.budgets:
        for path in args.models:
            name = Path(path).stem
            if all((name, budget, s) in done for s in args.split_seeds):
                continue
            if name not in loaded:
                model = load_model(path)
                data = FashionMNISTDataModule(batch_size=args.batch_size).for_model(model)
                validation = data.take("validation", args.draw_images * (max(args.split_seeds) + 1))
                # per test image: top1 (1 if correct) and kl from the unpruned model, whose outputs it computes once
                test = Evaluator(model, data.take("test", args.test_images), "kl")
                cut = disjoint_draws(validation, args.draw_images, args.split_seeds, args.batch_size)
                loaded[name] = model, cut, test
                unpruned_top1 = test.per_image(test.initial(), Routing(), 0)["top1"].mean().item()
                result["models"][name] = {"checkpoint": str(path), "unpruned_top1": unpruned_top1}
            model, validation_draws, test = loaded[name]
            unpruned, scored = count_flops(model, Routing()), {}
            for seed in args.split_seeds:
                if (name, budget, seed) in done:
                    continue
                found = search_routing(
                    model,
                    validation_draws[seed],
                    budget,
                    state_path=args.state_dir / f"{name}-{budget:g}-{seed}.json",
                    progress=False,
                )
                seconds = found.report["wall_time_s"]  # with the time saved in the state before a resumption
                before_check = Routing.from_dict(found.report["check"]["searched_routing"])
                calibration = torch.cat([x for x, _ in validation_draws[seed]])[:256]  # PPT's threshold
                # the most FLOPs within budget
                within = matched_baselines(model, budget * unpruned, within=True, calibration=calibration)
                reused = reuse.get((name, budget, seed), {})
                if args.diffrate and model.has_class_token and "diffrate" not in reused:  # DiffRate's own rate search
                    rates = search_routing(
                        model,
                        validation_draws[seed],
                        budget,
                        strategy="diffrate",
                        state_path=args.state_dir / f"{name}-{budget:g}-{seed}-diffrate.json",
                        progress=False,
                    )
                    # the schedule DiffRate found, before the held-out check
                    within["diffrate"] = Routing.from_dict(rates.report["check"]["searched_routing"])
                reports = {"searched": found.report, **({"diffrate": rates.report} if "diffrate" in within else {})}
                contenders = {"searched": found.routing, **within}
                for routing in (before_check, *contenders.values()):
                    if key(routing) not in scored:
                        scored[key(routing)] = test.per_image(test.initial(), routing, 0)
                returned = scored[key(found.routing)]
                same = _same_found(reused, scored[key(before_check)])
                for method, routing in contenders.items():
                    row = {
                        "model": name,
                        "budget": budget,
                        "split_seed": seed,
                        "method": method,
                        "gflops": count_flops(model, routing) / 1e9,
                        "top1": scored[key(routing)]["top1"].mean().item(),
                        "test_kl": scored[key(routing)]["kl"].mean().item(),
                        "flops_ratio": count_flops(model, routing) / unpruned,
                    }
                    if method == "searched":
                        row["returned"] = found.report["check"]["returned"]
                        row["found_top1"] = scored[key(before_check)]["top1"].mean().item()
                        row["found_test_kl"] = scored[key(before_check)]["kl"].mean().item()
                        for field, routing_scores in (
                            ("paired_se", returned),
                            ("found_paired_se", scored[key(before_check)]),
                        ):
                            row[field] = {
                                m: standard_error(routing_scores["top1"] - scored[key(r)]["top1"])
                                for m, r in within.items()
                            }
                        if "diffrate" in reused:  # the earlier errors hold only for the routing scored then
                            for field in ("found_paired_se", "paired_se"):
                                if same and (field == "found_paired_se" or row["returned"] == "searched"):
                                    row[field]["diffrate"] = reused["searched"]["found_paired_se"]["diffrate"]
                                else:
                                    row.setdefault("paired_se_missing", []).append(f"{field}.diffrate")
                        row["routing"] = routing.to_dict()
                    if method in reports:  # what each search cost, in the same run on the same cores
                        row["search_cost"] = {field: reports[method][field] for field in COST}
                    result["rows"].append(row)
                if "diffrate" in reused:
                    result["rows"].append(reused["diffrate"])
                print(
                    f"{name} budget {budget:g} seed {seed}: searched {returned['top1'].mean().item():.2%} "
                    f"(returned {found.report['check']['returned']}, {seconds:.0f} s)",
                    flush=True,
                )
                write_text_atomic(out, json.dumps(result, indent=1))


def _reusable(path: Path) -> dict[tuple, dict[str, dict]]:
    """Per (model, budget, split seed) of an earlier results file, its searched row and DiffRate's, where it has
    both: DiffRate's rate search does not depend on the default search, so its row can be taken over."""
    rows: dict[tuple, dict[str, dict]] = {}
    for row in json.loads(path.read_text())["rows"]:
        if row["method"] in ("searched", "diffrate"):
            rows.setdefault((row["model"], row["budget"], row["split_seed"]), {})[row["method"]] = row
    return {cell: methods for cell, methods in rows.items() if len(methods) == 2}


def _same_found(reused: dict[str, dict], found: dict) -> bool:
    """Whether the routing found now is the one the earlier run scored (same test top-1 and KL), so that its paired
    errors against DiffRate, image by image, are this routing's."""
    then = reused.get("searched")
    return (
        then is not None
        and abs(found["top1"].mean().item() - then["found_top1"]) <= 1e-9
        and abs(found["kl"].mean().item() - then["found_test_kl"]) <= 1e-9
    )


def _complete(row: dict, wanted: set[str]) -> bool:
    """Whether a searched row has paired errors against every ``wanted`` baseline the model can have (DiffRate ranks
    by class-token attention, as EViT does: a model without EViT has none), or names them missing (``--reuse``)."""
    missing = {field.split(".")[1] for field in row.get("paired_se_missing", []) if field.startswith("found_")}
    against = set(row.get("found_paired_se", {})) | missing
    return bool(against) and wanted - ({"diffrate"} if "evit" not in against else set()) <= against


def merge(out: Path, others: list[Path]) -> None:
    """Add the rows (and model entries) of ``others`` that ``out`` lacks, the first file's where several hold one."""
    result = json.loads(out.read_text()) if out.is_file() else {"rows": [], "models": {}}
    seen = {(r["model"], r["budget"], r["split_seed"], r["method"]) for r in result["rows"]}
    for path in others:
        other = json.loads(path.read_text())
        result["models"].update(other["models"])
        for row in other["rows"]:
            if (cell := (row["model"], row["budget"], row["split_seed"], row["method"])) not in seen:
                result["rows"].append(row)
                seen.add(cell)
    write_text_atomic(out, json.dumps(result, indent=1))


def by_draw(result: dict, before_check: bool = False, metric: str = "top1") -> dict[tuple, dict[str, float]]:
    """``metric`` of every method per (model, budget, split seed), the searched one's of the routing found with
    ``before_check``; rows without it are left out."""
    values: dict[tuple, dict[str, float]] = {}
    for row in result["rows"]:
        value = row.get(f"found_{metric}") if before_check and row["method"] == "searched" else row.get(metric)
        if value is not None:
            values.setdefault((row["model"], row["budget"], row["split_seed"]), {})[row["method"]] = value
    return values


def margins(result: dict, before_check: bool = False, metric: str = "top1") -> dict[tuple[str, float], list[float]]:
    """Searched minus the best baseline per (model, budget), one value per split seed: in test top-1 points, or with
    ``metric="test_kl"`` in test KL (10^-3 nats; negative: closer to the unpruned model than every baseline). With
    ``before_check``, of the routing the search found rather than the one the held-out check returned."""
    best_of, scale = (max, 100) if metric == "top1" else (min, 1000)
    found: dict[tuple[str, float], list[float]] = {}
    for (model, budget, _), values in sorted(by_draw(result, before_check, metric).items()):
        if "searched" in values and "tome" in values:  # EViT and attention top-k need a class token
            best = best_of(values[m] for m in BASELINES if m in values)
            found.setdefault((model, budget), []).append(scale * (values["searched"] - best))
    return found


def resolution(result: dict, before_check: bool = False) -> dict[tuple[str, float], list[tuple[float, float | None]]]:
    """Per (model, budget), a ``(margin, standard error)`` pair in test top-1 points per split seed: the margin over the
    best baseline and its standard error paired over the test images. Of the draws where the held-out check returned
    the routing found (a returned baseline's margin is exactly 0); with ``before_check``, of the routing found in
    every draw."""
    tops = by_draw(result, before_check)
    field = "found_paired_se" if before_check else "paired_se"
    pairs: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for row in result["rows"]:
        if row["method"] == "searched" and field in row and (before_check or row["returned"] == "searched"):
            cell = tops[(row["model"], row["budget"], row["split_seed"])]
            best = max((m for m in BASELINES if m in cell), key=cell.get)
            margin = 100 * (cell["searched"] - cell[best])
            error = row[field].get(best)  # None: not computed (--reuse: DiffRate's, the routing found has changed)
            pairs.setdefault((row["model"], row["budget"]), []).append((margin, None if error is None else 100 * error))
    return pairs


def _print_resolution(result: dict, before_check: bool) -> None:
    """The range of the paired standard errors, and each cell with a negative mean margin, seed by seed."""
    pairs = resolution(result, before_check)
    errors = [error for cell in pairs.values() for _, error in cell if error is not None]
    which = "found" if before_check else "returned (when the check returned the routing found)"
    if errors:
        print(
            f"\npaired standard error of the test top-1 margin of the routing {which}: {min(errors):.2f} to "
            f"{max(errors):.2f} points (median {statistics.median(errors):.2f}, {len(errors)} searches; n/a: "
            f"{sum(error is None for cell in pairs.values() for _, error in cell)} left out by --reuse)"
        )
    for cell, values in margins(result, before_check).items():
        if statistics.mean(values) < 0 and cell in pairs:
            seeds = ", ".join(
                f"{margin:+.2f} ± {'n/a' if error is None else f'{error:.2f}'}" for margin, error in pairs[cell]
            )
            print(f"  {cell[0]} at {cell[1]:.0%}, mean {statistics.mean(values):+.2f}: {seeds}")


def _print_flops_match(result: dict) -> None:
    """Each baseline's FLOPs against the searched routing's in the same draw: the lowest ratio over all draws."""
    flops = by_draw(result, metric="gflops")
    lowest = {}
    for values in flops.values():
        for method in BASELINES:
            if method in values and "searched" in values:
                ratio = values[method] / values["searched"]
                lowest[method] = min(lowest.get(method, ratio), ratio)
    if lowest:
        text = ", ".join(f"{method} {ratio:.3f}" for method, ratio in lowest.items())
        print(f"\nlowest FLOPs of each baseline relative to the searched routing's, over all draws: {text}")


def _print_against_diffrate(result: dict) -> None:
    """Per budget, the default search against DiffRate's rate search on the same draws: the test top-1 margin of
    the routing each returned (mean over models and split seeds, with the root mean square of the paired standard
    errors) and what each search cost, in the same run on the same cores."""
    rows = {(r["model"], r["budget"], r["split_seed"], r["method"]): r for r in result["rows"]}
    cells: dict[float, list[tuple[dict, dict]]] = {}
    for (model, budget, seed, method), row in rows.items():
        if method == "diffrate" and "search_cost" in row:
            cells.setdefault(budget, []).append((rows[(model, budget, seed, "searched")], row))
    if not cells:
        return
    header = "| budget | searches | default − DiffRate (top-1 points) | paired SE, median | below −2 SE | "
    header += "wall time (s) | forward+backward passes | images seen (forward) |"
    lines = [header, "| --- |" + " --- |" * 7]
    for budget in sorted(cells, reverse=True):
        pairs = cells[budget]
        gaps = [100 * (ours["top1"] - theirs["top1"]) for ours, theirs in pairs]
        known = [  # (margin, paired error) where the error was computed (--reuse may leave it out)
            (gap, 100 * ours["paired_se"]["diffrate"])
            for gap, (ours, _) in zip(gaps, pairs, strict=True)
            if "diffrate" in ours["paired_se"]
        ]
        below = sum(gap < -2 * error for gap, error in known)
        median = statistics.median(error for _, error in known) if known else float("nan")
        cost = {
            field: [statistics.mean(row["search_cost"][field] for row in side) for side in zip(*pairs, strict=True)]
            for field in ("wall_time_s", "forward_backward_passes", "images_seen")
        }
        seconds, passes, seen = cost["wall_time_s"], cost["forward_backward_passes"], cost["images_seen"]
        lines.append(
            f"| {budget:.0%} | {len(pairs)} | {statistics.mean(gaps):+.2f} | {median:.2f} | "
            f"{below} | {seconds[0]:.0f} vs {seconds[1]:.0f} ({seconds[0] / seconds[1]:.2f}x) | "
            f"{passes[0]:.0f} vs {passes[1]:.0f} | {seen[0]:,.0f} vs {seen[1]:,.0f} |"
        )
    print("\nthe default search against DiffRate's rate search, same draws, mean over models and split seeds:")
    print("\n".join(lines))


def _print_per_method(result: dict) -> None:
    """Per budget: what the held-out check returned, and the searched routing's mean lead over each baseline (mean
    over models of the mean over split seeds, test top-1 points); per (model, budget): the most accurate baseline and,
    where DiffRate ran, the default search minus DiffRate's with the standard error of that mean (paired SEs of the
    seeds combined)."""
    rows = [r for r in result["rows"] if r["method"] == "searched"]
    cells: dict[tuple[str, float], list[dict[str, float]]] = {}
    for (model, budget, _), values in sorted(by_draw(result).items()):
        cells.setdefault((model, budget), []).append(values)
    print("\nper budget: routings the check returned; the searched routing's mean lead over each baseline")
    for budget in sorted({b for _, b in cells}, reverse=True):
        returned = Counter(r["returned"] for r in rows if r["budget"] == budget)
        leads = []
        for method in BASELINES:
            per_model = [
                statistics.mean(100 * (v["searched"] - v[method]) for v in draws)
                for (_, b), draws in cells.items()
                if b == budget and all(method in v for v in draws)
            ]
            if per_model:
                leads.append(f"{method} {statistics.mean(per_model):+.2f} ({len(per_model)})")
        print(f"  {budget:.0%}: returned {dict(returned.most_common())}; lead over {', '.join(leads)}")
    print("\nper (model, budget): the most accurate baseline (mean over seeds); default - DiffRate ± SE of the mean")
    se = {(r["model"], r["budget"]): [] for r in rows}
    for r in rows:
        if "diffrate" in r.get("paired_se", {}):
            se[(r["model"], r["budget"])].append(100 * r["paired_se"]["diffrate"])
    for (model, budget), draws in cells.items():
        means = {m: statistics.mean(v[m] for v in draws) for m in BASELINES if m != "random" and m in draws[0]}
        line = f"  {model} at {budget:.0%}: {max(means, key=means.get)}"
        if all("diffrate" in v for v in draws):
            gap = statistics.mean(100 * (v["searched"] - v["diffrate"]) for v in draws)
            line += f"; default - DiffRate {gap:+.2f}"
            if len(se[(model, budget)]) == len(draws):  # not when --reuse left the paired errors out
                error = sum(e * e for e in se[(model, budget)]) ** 0.5 / len(draws)
                line += f" ± {error:.2f}{' (below -2 SE)' if gap < -2 * error else ''}"
        print(line)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(result: dict, out_dir: Path) -> None:
    """Print the tables (and their Markdown for the README) and draw the margins with their spread."""
    before = margins(result, before_check=True)
    if before:
        _table(result, before, "margin of the routing found, before the held-out check, test top-1 points")
    kl = margins(result, before_check=True, metric="test_kl")
    if kl:
        _table(result, kl, "test KL of the routing found minus the best baseline's, 10^-3 nats (lower: closer)")
        lower = sum(v < 0 for values in kl.values() for v in values)
        print(f"the routing found has the lower test KL in {lower} of {sum(map(len, kl.values()))} searches")
    found = margins(result)
    models, budgets, means = _table(result, found, "margin of searched over the best baseline, test top-1 points")
    for before_check in (True, False):
        _print_resolution(result, before_check)
    _print_flops_match(result)
    _print_against_diffrate(result)
    _print_per_method(result)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*X"
    for i, model in enumerate(models):
        xs = [b for b in budgets if (model, b) in found]
        offset = (i - (len(models) - 1) / 2) * 0.006
        ax.errorbar(
            [100 * (b + offset) for b in xs],
            [statistics.mean(found[(model, b)]) for b in xs],
            yerr=[spread(found[(model, b)]) for b in xs],
            marker=markers[i % len(markers)],
            capsize=3,
            linestyle="none",
            label=model,
        )
    ax.plot(
        [100 * b for b in budgets],
        [statistics.mean(v) if v else float("nan") for v in means],
        "k-",
        lw=2,
        label="mean over models",
    )
    ax.axhline(0, color="gray", linestyle=":")
    ax.set(
        xlabel="FLOPs budget (% of the unpruned model)",
        ylabel="searched − best baseline (test top-1, points)",
        title="Routing search on held-out test images: mean ± std over split seeds",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with staged_files() as stage:
        for suffix in (".png", ".pdf"):
            fig.savefig(stage(out_dir / f"search_generalization{suffix}"), dpi=130, bbox_inches="tight")
    print(f"wrote {out_dir / 'search_generalization.png'} and .pdf")


def _table(result: dict, found: dict, title: str) -> tuple[list[str], list[float], list[list[float]]]:
    """Print one table of margins and its Markdown; return the models, the budgets and the per-budget model means."""
    models = sorted({m for m, _ in found})
    budgets = sorted({b for _, b in found}, reverse=True)
    print(f"\n{title}: mean ± std over split seeds (n)")
    print(f"{'model':28}" + "".join(f"{b:>16.0%}" for b in budgets))
    lines = ["| model (unpruned top-1) | " + " | ".join(f"{b:.0%}" for b in budgets) + " |"]
    lines.append("| --- |" + " --- |" * len(budgets))
    for model in models:
        cells = [found.get((model, b)) for b in budgets]
        print(f"{model:28}" + "".join(f"{_cell(c):>16}" for c in cells))
        unpruned = result["models"][model]["unpruned_top1"]
        lines.append(f"| `{model}` ({unpruned:.2%}) | " + " | ".join(_cell(c) for c in cells) + " |")
    means = [[statistics.mean(found[(m, b)]) for m in models if (m, b) in found] for b in budgets]
    print(f"{'mean over models':28}" + "".join(f"{_cell(v, seeds=False):>16}" for v in means))
    lines.append("| **mean over models** | " + " | ".join(f"**{_cell(v, seeds=False)}**" for v in means) + " |")
    print("\n" + "\n".join(lines))
    return models, budgets, means


def _cell(values: list[float] | None, seeds: bool = True) -> str:
    if not values:
        return "–"
    text = f"{statistics.mean(values):+.2f} ± {spread(values):.2f}"
    return f"{text} ({len(values)})" if seeds else text


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=model_source, nargs="+", default=[], help="weights files (load_model)")
    parser.add_argument("--budgets", type=fraction, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--split_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draw_images", type=positive_int, default=1500, help="validation images per split seed")
    parser.add_argument("--test_images", type=positive_int, default=10000)
    parser.add_argument("--batch_size", type=positive_int, default=250)
    parser.add_argument("--state_dir", type=Path, default=Path("runs/search_generalization"))
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--summarize", action="store_true", help="only print the table and draw the figure")
    parser.add_argument("--diffrate", action="store_true", help="also run DiffRate's rate search on every draw")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="fold these results files' rows in first")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="take DiffRate's rows from this earlier results file of the same draws instead of rerunning its search",
    )
    args = parser.parse_args(argv)
    if min(args.split_seeds) < 0 or len(set(args.split_seeds)) < len(args.split_seeds):
        parser.error(f"--split_seeds must be distinct integers of at least 0 (each a draw), got {args.split_seeds}")
    for option in ("out_dir", "state_dir"):
        check_output_dir(getattr(args, option), f"--{option}")
    for option, path in [*(("--merge", p) for p in args.merge), *([("--reuse", args.reuse)] if args.reuse else [])]:
        if not path.is_file():
            raise FileNotFoundError(f"{option} {path} does not exist; expected a search_generalization.json")
    if not args.summarize and not args.models:
        parser.error("--models is required unless --summarize is given")
    torch.set_grad_enabled(False)
    if args.merge:
        merge(args.out_dir / "search_generalization.json", args.merge)
    if not args.summarize:
        run(args)
    summarize(json.loads((args.out_dir / "search_generalization.json").read_text()), args.out_dir)


if __name__ == "__main__":
    run_cli(main)
