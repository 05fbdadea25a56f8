"""Accuracy against FLOPs: the searched routing and the baselines at matched FLOPs, on the test split.

For every budget, the routing is searched on validation images by the default search (``attnprune.search``: fidelity
to the unpruned model, the last 30% of the images checking it against the baselines within budget), then evaluated
on the test split together with
ToMe (r schedule tuned), EViT (keep tuned), uniform attention top-k and random, each tuned to the searched routing's
FLOPs (within 1% where the knob allows). Prints one table, writes ``benchmarks/results/pareto_<model>.json`` and a PNG
plot of top-1 against GFLOPs, one line per method; the searched routings also go to
``benchmarks/results/routings/<model>-<budget>.yaml``. Every option is checked (and every budget against the cheapest
routing the search space reaches) before any image is read, and the files are written together once every budget is
done: a run that fails leaves the results there as they were.

    .venv/bin/python benchmarks/pareto.py --model checkpoints/fmnist_supervised.safetensors
    .venv/bin/python benchmarks/pareto.py --summarize benchmarks/results/pareto_fmnist_*.json   # README table

``--summarize ... --recheck C`` retakes each held-out check's decision at a lower confidence than it ran at, from the
paired differences its report holds (:func:`attnprune.search.check.retake`): where the routing found is now returned,
its row takes the test top-1 and FLOPs the run measured for it, and the baselines there are tuned to its FLOPs and
scored again, as the run does; the results files, figures and searched routings (``--routing_dir``) are rewritten.
"""

from __future__ import annotations

import copy
import json
import time
from argparse import Namespace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from attnprune import Routing, count_flops, load_model, prune, unprune  # noqa: E402
from attnprune.atomic import atomic_path, check_output_dir, staged_files  # noqa: E402
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli  # noqa: E402
from attnprune.errors import UserError  # noqa: E402
from attnprune.lit.data import FashionMNISTDataModule  # noqa: E402
from attnprune.routing.baselines import matched_baselines  # noqa: E402
from attnprune.search import InfeasibleBudget, SearchSpace, cheapest_flops, search_routing  # noqa: E402
from attnprune.search.check import check_confidence, retake  # noqa: E402
from attnprune.search.core import STRATEGIES  # noqa: E402

SEARCHED_ROUTINGS = Path(__file__).parent / "results" / "routings"
METHODS = ("searched", "tome", "evit", "topk_attention", "pitome", "ppt", "diffrate", "random")
LABELS = {
    "searched": "searched",
    "tome": "ToMe",
    "evit": "EViT",
    "topk_attention": "attention top-k",
    "pitome": "PiToMe",
    "ppt": "PPT",
    "diffrate": "DiffRate",
    "random": "random",
}


@torch.no_grad()
def top1(model: torch.nn.Module, routing: Routing, batches: list) -> float:
    prune(model, routing)
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches)
    unprune(model)
    return correct / sum(len(y) for _, y in batches)


def calibration(val: list) -> torch.Tensor:
    """PPT's variance threshold is calibrated on the first 256 validation images."""
    return torch.cat([x for x, _ in val])[:256]


def scored_row(model: torch.nn.Module, method: str, budget: float, routing: Routing, test: list) -> dict:
    """A method's row at ``budget``: its FLOPs, test top-1 and routing."""
    flops, unpruned = count_flops(model, routing), count_flops(model)
    row = {"method": method, "budget": budget, "gflops": flops / 1e9, "flops_ratio": flops / unpruned}
    return row | {"top1": top1(model, routing, test), "routing": routing.to_dict()}


def parse_args(argv: list[str] | None = None) -> Namespace:
    """The options, each checked as it is parsed (see :mod:`attnprune.cli`)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=model_source, help="weights file or hub name (attnprune.load_model)")
    parser.add_argument("--budgets", type=fraction, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--val_images", type=positive_int, default=5000)
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.3,
        help="fraction of the validation images kept out of the search to check its routing against the baselines",
    )
    parser.add_argument("--test_images", type=positive_int, default=10000)
    parser.add_argument("--strategy", default="beam", choices=sorted(STRATEGIES))
    parser.add_argument("--diffrate", action="store_true", help="also run DiffRate's rate search at every budget")
    parser.add_argument("--state_dir", type=Path, default=Path("runs/search"))
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--routing_dir",
        type=Path,
        default=SEARCHED_ROUTINGS,
        help="where each searched routing is written as <model>-<budget>.yaml (the quickstart reads them)",
    )
    parser.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="instead of running: combine earlier results into one table and figure (pareto_all.png)",
    )
    parser.add_argument(
        "--recheck",
        type=float,
        metavar="CONFIDENCE",
        help="with --summarize: retake each held-out check at this confidence (at most the one it ran at), tune the "
        "baselines again where the routing returned changes, and write the results files and searched routings",
    )
    args = parser.parse_args(argv)
    if args.recheck is not None:
        check_confidence(args.recheck)
        if not args.summarize:
            parser.error("--recheck needs --summarize (the results files to recheck)")
    for option in ("out_dir", "routing_dir", "state_dir"):
        check_output_dir(getattr(args, option), f"--{option}")
    if args.summarize:
        for path in args.summarize:
            if not path.is_file():
                raise FileNotFoundError(f"--summarize {path} does not exist; expected a pareto_<model>.json")
        return args
    if not args.model:
        parser.error("--model is required unless --summarize is given")
    if not 0 <= args.holdout < 1:
        parser.error(f"--holdout must be a fraction in [0, 1), got {args.holdout}")
    twice = sorted({b for b in args.budgets if args.budgets.count(b) > 1})
    if twice:
        parser.error(f"--budgets lists {', '.join(f'{b:g}' for b in twice)} more than once")
    return args


def check_budgets(model: torch.nn.Module, budgets: list[float]) -> None:
    """Refuse, before any image is read, a budget below the cheapest routing the search space reaches."""
    cheapest = cheapest_flops(model, SearchSpace()) / count_flops(model)
    low = [f"{b:g}" for b in budgets if b < cheapest]
    if low:
        raise InfeasibleBudget(
            f"--budgets {', '.join(low)}: below the cheapest routing the search space reaches, {cheapest:.1%} of the "
            "unpruned model's FLOPs"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        if args.recheck is not None:
            recheck(args.summarize, args.recheck, args.routing_dir)
        summarize(args.summarize, args.out_dir / "pareto_all.png")
        return

    torch.set_grad_enabled(False)
    model = load_model(args.model)
    check_budgets(model, args.budgets)
    name = Path(args.model).stem
    data = FashionMNISTDataModule(batch_size=500).for_model(model)
    val, test = data.take("validation", args.val_images), data.take("test", args.test_images)
    unpruned = count_flops(model)
    result = {
        "model": name,
        "checkpoint": args.model,
        "strategy": args.strategy,
        "unpruned": {"gflops": unpruned / 1e9, "top1": top1(model, Routing(), test)},
        "val_images": args.val_images,
        "test_images": args.test_images,
        "results": [],
    }
    searched = {}  # budget -> the routing found, written with the results at the end
    for budget in args.budgets:
        start = time.perf_counter()
        found = search_routing(
            model,
            val,
            budget,
            strategy=args.strategy,
            holdout=args.holdout,
            state_path=args.state_dir / f"{name}-{args.strategy}-{budget:g}.json",
        )
        searched[budget] = found.routing
        matched = matched_baselines(model, count_flops(model, found.routing), calibration=calibration(val))
        routings = {"searched": found.routing, **matched}
        if args.diffrate:  # DiffRate's own rate search at the same budget on the same images: the schedule it found,
            # before the held-out check (which would return a baseline in its place)
            rates = search_routing(
                model,
                val,
                budget,
                strategy="diffrate",
                holdout=args.holdout,
                state_path=args.state_dir / f"{name}-diffrate-{budget:g}.json",
            )
            routings["diffrate"] = Routing.from_dict(rates.report["check"]["searched_routing"])
        for method, routing in routings.items():
            row = scored_row(model, method, budget, routing, test)
            if method == "searched":
                row["search"] = found.report
                if returned(row) != "searched":  # what the search alone would have scored: does the check help?
                    unchecked = Routing.from_dict(found.report["check"]["searched_routing"])
                    row["unchecked"] = {
                        "flops_ratio": count_flops(model, unchecked) / unpruned,
                        "top1": top1(model, unchecked, test),
                    }
            result["results"].append(row)
        print(f"budget {budget:g}: searched in {time.perf_counter() - start:.0f} s", flush=True)

    path = args.out_dir / f"pareto_{name}.json"
    print_table(result)
    fig = figure(result)
    with staged_files() as stage:  # every file or none
        for budget, routing in searched.items():
            routing.to_yaml(stage(args.routing_dir / f"{name}-{budget:g}.yaml"))
        stage(path).write_text(json.dumps(result, indent=2))
        fig.savefig(stage(path.with_suffix(".png")), dpi=120)
    print(f"wrote {path}, {path.with_suffix('.png')} and the searched routings in {args.routing_dir}")


def by_budget(result: dict) -> list[tuple[float, dict[str, dict]]]:
    """``(budget, {method: row})`` pairs, largest budget first."""
    budgets = sorted({r["budget"] for r in result["results"]}, reverse=True)
    return [(b, {r["method"]: r for r in result["results"] if r["budget"] == b}) for b in budgets]


def returned(row: dict) -> str:
    """What the search returned: "searched", or the baseline that won the held-out check."""
    return row.get("search", {}).get("check", {}).get("returned", "searched")


def unchecked(row: dict) -> str:
    """Test top-1 and FLOPs ratio of the routing the search found, when the held-out check returned a baseline."""
    found = row.get("unchecked")
    return f"{found['top1']:.2%} at {found['flops_ratio']:.0%}" if found else ""


def beats_all(rows: dict[str, dict]) -> bool:
    """Whether the searched routing's test top-1 is at least every baseline's."""
    return all(rows["searched"]["top1"] >= row["top1"] for method, row in rows.items() if method != "searched")


def present(results: list[dict]) -> list[str]:
    """The methods the results hold, in :data:`METHODS` order (older results lack the peers; a model without a class
    token has no EViT, attention top-k or PPT)."""
    found = {row["method"] for result in results for row in result["results"]}
    return [m for m in METHODS if m in found]


def _cell(rows: dict[str, dict], method: str, text: str) -> str:
    return text.format(**rows[method]) if method in rows else "-"


def print_table(result: dict) -> None:
    """One row per budget: each method's test top-1 and FLOPs ratio, whether the search beat every baseline, which
    routing the search returned, and what the routing it found scored when the held-out check replaced it."""
    print(
        f"\n{result['model']}: unpruned {result['unpruned']['gflops']:.4f} GFLOPs, "
        f"top-1 {result['unpruned']['top1']:.2%}"
    )
    columns = "   searched >= all baselines   returned         found (not returned)"
    methods = present([result])
    print(f"{'budget':>7}" + "".join(f"{m:>16}" for m in methods) + columns)
    for budget, rows in by_budget(result):
        print(
            f"{budget:>7.0%}"
            + "".join(f"{_cell(rows, m, '{top1:>9.2%} {flops_ratio:>5.0%}'):>16}" for m in methods)
            + f"   {'yes' if beats_all(rows) else 'NO':<26}"
            + f"   {returned(rows['searched']):<14}   {unchecked(rows['searched'])}"
        )


def markdown_table(results: list[dict]) -> str:
    """All models in one Markdown table (the README's), the best top-1 of each row in bold; a searched cell names the
    baseline the search returned when that baseline won the held-out check."""
    methods = present(results)
    lines = [
        "| model (unpruned top-1) | budget | FLOPs used | "
        + " | ".join(LABELS[m] for m in methods)
        + " | searched >= all | found by the search, not returned |",
        "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " | --- | --- |",
    ]
    for result in results:
        for budget, rows in by_budget(result):
            best = max(r["top1"] for r in rows.values())
            cells = [
                _cell(rows, m, "**{top1:.2%}**" if rows.get(m, {}).get("top1") == best else "{top1:.2%}")
                for m in methods
            ]
            if returned(rows["searched"]) != "searched":
                cells[0] += f" (= {LABELS[returned(rows['searched'])]})"
            model = f"`{result['model']}` ({result['unpruned']['top1']:.2%})"
            lines.append(
                f"| {model} | {budget:.0%} | {rows['searched']['flops_ratio']:.0%} | "
                + " | ".join(cells)
                + f" | {'yes' if beats_all(rows) else 'NO'} | {unchecked(rows['searched'])} |"
            )
    return "\n".join(lines)


def figure(result: dict) -> plt.Figure:
    """One model's plot of :func:`plot`, with its legend."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot(result, ax)
    ax.legend()
    fig.tight_layout()
    return fig


def plot(result: dict, ax: plt.Axes) -> None:
    """Test top-1 against GFLOPs, one line per method, the unpruned model as a dotted line."""
    for method in present([result]):
        rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: r["gflops"])
        ax.plot(
            [r["gflops"] for r in rows],
            [100 * r["top1"] for r in rows],
            marker="o",
            label=LABELS[method],
            linewidth=2.2 if method == "searched" else 1.2,
        )
    ax.axhline(100 * result["unpruned"]["top1"], color="gray", linestyle=":", label="unpruned")
    ax.set(xlabel="GFLOPs per image", ylabel="test top-1 (%)", title=f"{result['model']}: accuracy at equal FLOPs")
    ax.grid(alpha=0.3)


def at_confidence(result: dict, confidence: float) -> dict:
    """``result`` as the held-out checks would have returned at ``confidence``: each searched row's stored check
    decides again, and where the routing found is now returned, the row takes the test top-1 and FLOPs measured for it
    (``unchecked``). A lower confidence only ever returns the routing found more often; a higher one would need the
    test top-1 of a baseline the check returns, which the run did not measure, so it is refused."""
    result = copy.deepcopy(result)
    for row in result["results"]:
        check = row.get("search", {}).get("check")
        if row["method"] != "searched" or check is None:
            continue
        method = retake(check, confidence)
        if method != check["returned"]:
            if method != "searched":
                raise UserError(
                    f"--recheck {confidence:g}: the check of {result['model']} at {row['budget']:g}, run at "
                    f"{check['confidence']:g}, would return {method}, whose test top-1 the run did not measure"
                )
            found = row.pop("unchecked")
            gflops = found["flops_ratio"] * result["unpruned"]["gflops"]
            row.update(top1=found["top1"], flops_ratio=found["flops_ratio"], gflops=gflops)
            row["routing"], check["returned"] = check["searched_routing"], "searched"
        check["confidence"] = confidence
    return result


def retune(result: dict, budgets: set[float]) -> None:
    """Tune the baselines again to the searched routing's FLOPs at ``budgets`` and score them on the test images, as
    the run does: after :func:`at_confidence` the searched routing there is another one, with other FLOPs. DiffRate's
    schedule, found for the budget, stays, and a baseline the results lack is not added. Runs where the results were
    made (their checkpoint, image counts)."""
    model = load_model(result["checkpoint"])
    data = FashionMNISTDataModule(batch_size=500).for_model(model)
    val = data.take("validation", min(256, result.get("val_images", 5000)))
    test = data.take("test", result.get("test_images", 10000))
    for budget in budgets:
        searched = next(r for r in result["results"] if r["budget"] == budget and r["method"] == "searched")
        target = count_flops(model, Routing.from_dict(searched["routing"]))
        present = {r["method"] for r in result["results"] if r["budget"] == budget}  # older runs lack the peers
        matched = {
            m: r for m, r in matched_baselines(model, target, calibration=calibration(val)).items() if m in present
        }
        result["results"] = [r for r in result["results"] if r["budget"] != budget or r["method"] not in matched]
        result["results"] += [scored_row(model, m, budget, routing, test) for m, routing in matched.items()]


def recheck(paths: list[Path], confidence: float, routing_dir: Path) -> None:
    """Write each results file and its figure as its held-out checks return at ``confidence``
    (:func:`at_confidence`, the baselines tuned again where the searched routing changed: :func:`retune`), and the
    searched routing of every budget whose decision changed to ``routing_dir``, all files or none."""
    with staged_files() as stage:
        for path in paths:
            before = json.loads(path.read_text())
            after, changed = at_confidence(before, confidence), set()
            for old, new in zip(before["results"], after["results"], strict=True):
                if new["method"] == "searched" and new["routing"] != old["routing"]:
                    routing = Routing.from_dict(new["routing"])
                    routing.to_yaml(stage(routing_dir / f"{after['model']}-{new['budget']:g}.yaml"))
                    print(f"{after['model']} at {new['budget']:g}: now the routing found, {new['top1']:.2%}")
                    changed.add(new["budget"])
            if changed:
                retune(after, changed)
            stage(path).write_text(json.dumps(after, indent=2))
            figure(after).savefig(stage(path.with_suffix(".png")), dpi=120)


def summarize(paths: list[Path], out: Path) -> None:
    """Several models' results: print the README table and write one figure with a panel per model."""
    results = [json.loads(p.read_text()) for p in paths]
    cols = min(2, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for result, ax in zip(results, axes.flat[: len(results)], strict=True):
        plot(result, ax)
    for ax in axes.flat[len(results) :]:
        ax.remove()
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    print(markdown_table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
