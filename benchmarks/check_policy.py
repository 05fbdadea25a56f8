"""How confident should the held-out check be? Judged on validation images that neither the search nor the check saw.

For every model and budget the default search runs on one draw of validation images (the generalization benchmark's
draw ``--search_seed``, with its state files, so that benchmark resumes these searches). Its held-out check holds the
paired differences of the routing found against every baseline, which give the routing the check returns at any
confidence: the routing found when the upper bound ``difference + z * standard_error`` is below 0 against every
baseline, otherwise the baseline with the lowest held-out loss (0.5 is the plain lowest held-out loss). Each
confidence's choice is then judged on the other draws' validation images (``--judge_seeds``): its top-1 minus the best
baseline's there, and its KL from the unpruned model minus the closest baseline's. The test split is never read.

Prints one table (mean over models per budget and confidence) and writes ``benchmarks/results/check_policy.json``
after every cell (rerunning skips the cells there).

    .venv/bin/python benchmarks/check_policy.py --models checkpoints/fmnist_*.safetensors \\
        benchmarks/models/fmnist_gen_*.safetensors

``--reducers`` and ``--beam_width`` judge another search the same way (its state files in their own ``--state_dir``):
the default space's peers' moves were chosen so (``benchmarks/results/check_policy_moves.json``, against
``check_policy.json``, made with the 2022 moves alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from attnprune import Routing, count_flops, load_model
from attnprune.atomic import check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, fraction, model_source, positive_int, run_cli
from attnprune.errors import UserError
from attnprune.lit.data import FashionMNISTDataModule
from attnprune.lit.data.splits import disjoint_draws
from attnprune.routing.baselines import matched_baselines
from attnprune.search import SearchSpace, search_routing
from attnprune.search.check import check_confidence, retake, split_holdout
from attnprune.search.evaluator import Evaluator

RESULTS = Path(__file__).parent / "results"


def run(args: argparse.Namespace) -> None:
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    done = {(row["model"], row["budget"]) for row in result["rows"]}
    seeds = sorted({args.search_seed, *args.judge_seeds})
    for path in args.models:
        name = Path(path).stem
        if all((name, budget) in done for budget in args.budgets):
            continue
        model = load_model(path)
        data = FashionMNISTDataModule(batch_size=args.batch_size).for_model(model)
        cut = disjoint_draws(data.take("validation", args.draw_images * (max(seeds) + 1)), args.draw_images, seeds, 250)
        judge = Evaluator(model, [batch for seed in args.judge_seeds for batch in cut[seed]], "kl")
        unpruned = count_flops(model, Routing())
        for budget in args.budgets:
            if (name, budget) in done:
                continue
            found = search_routing(
                model,
                cut[args.search_seed],
                budget,
                state_path=args.state_dir / f"{name}-{budget:g}-{args.search_seed}.json",
                space=SearchSpace(reducers=tuple(args.reducers)) if args.reducers else None,
                beam_width=args.beam_width,
                progress=False,
            )
            check = found.report["check"]
            held_out = split_holdout(cut[args.search_seed], 0.3)[1]
            calibration = torch.cat([x for x, _ in held_out])[:256]  # PPT's threshold, as the check calibrated it
            contenders = {
                "searched": Routing.from_dict(check["searched_routing"]),
                **matched_baselines(model, budget * unpruned, within=True, calibration=calibration),
            }
            contenders.pop("random", None)
            judged = {}
            for method, routing in contenders.items():
                values = judge.per_image(judge.initial(), routing, 0)
                judged[method] = {"top1": values["top1"].mean().item(), "kl": values["kl"].mean().item()}
            result["rows"].append(
                {
                    "model": name,
                    "budget": budget,
                    "returned": {f"{c:g}": retake(check, c) for c in args.confidences},
                    "judged": judged,
                    "judge_images": judge.images,
                    "check": {"holdout": check["holdout"], "paired": check["paired"]},
                }
            )
            print(f"{name} budget {budget:g}: {result['rows'][-1]['returned']}", flush=True)
            write_text_atomic(args.out, json.dumps(result, indent=1))
    summarize(result, args.confidences)


def merge(out: Path, others: list[Path]) -> None:
    """Add the rows of ``others`` that ``out`` lacks."""
    result = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    seen = {(row["model"], row["budget"]) for row in result["rows"]}
    for path in others:
        result["rows"] += [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["budget"]) not in seen]
    write_text_atomic(out, json.dumps(result, indent=1))


def summarize(result: dict, confidences: list[float]) -> None:
    """Per budget and confidence: the mean over models of the judged top-1 margin (points) and KL margin (10^-3
    nats) of the routing returned over the best baseline, and how often the routing found was returned."""
    budgets = sorted({row["budget"] for row in result["rows"]}, reverse=True)
    print("\njudged margin of the routing returned over the best baseline: top-1 points / KL 10^-3 nats", end="")
    print(" (times the routing found was returned)")
    print(f"{'confidence':>10} " + "".join(f"{b:>24.0%}" for b in budgets))
    for confidence in [*confidences, None]:
        cells = []
        for budget in budgets:
            top1, kl, returned = [], [], 0
            for row in (r for r in result["rows"] if r["budget"] == budget):
                method = "searched" if confidence is None else row["returned"][f"{confidence:g}"]
                baselines = {m: v for m, v in row["judged"].items() if m != "searched"}
                top1.append(100 * (row["judged"][method]["top1"] - max(v["top1"] for v in baselines.values())))
                kl.append(1000 * (row["judged"][method]["kl"] - min(v["kl"] for v in baselines.values())))
                returned += method == "searched"
            cells.append(f"{statistics.mean(top1):+.2f} / {statistics.mean(kl):+.2f} ({returned}/{len(top1)})")
        label = "found" if confidence is None else f"{confidence:g}"
        print(f"{label:>10} " + "".join(f"{cell:>24}" for cell in cells))
    for confidence in confidences:
        swaps = [(r["judged"]["searched"], r["judged"][r["returned"][f"{confidence:g}"]]) for r in result["rows"]]
        swaps = [(found, baseline) for found, baseline in swaps if found is not baseline]
        closer = sum(found["kl"] < baseline["kl"] for found, baseline in swaps)
        better = sum(found["top1"] > baseline["top1"] for found, baseline in swaps)
        print(
            f"at {confidence:g} a baseline was returned in {len(swaps)} of {len(result['rows'])} searches; the routing "
            f"found was closer to the unpruned model in {closer} of them and more accurate in {better}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=model_source, nargs="+", default=[], help="weights files (load_model)")
    parser.add_argument("--budgets", type=fraction, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--confidences", type=float, nargs="+", default=[0.5, 0.6, 0.75, 0.9, 0.95])
    parser.add_argument("--search_seed", type=int, default=0, help="the draw searched and checked on")
    parser.add_argument("--judge_seeds", type=int, nargs="+", default=[1, 2], help="the draws judged on")
    parser.add_argument("--draw_images", type=positive_int, default=1500, help="validation images per draw")
    parser.add_argument("--batch_size", type=positive_int, default=250)
    parser.add_argument("--reducers", nargs="+", default=None, help="the search space's reducers (default: its own)")
    parser.add_argument("--beam_width", type=positive_int, default=2)
    parser.add_argument("--state_dir", type=Path, default=Path("runs/search_generalization"))
    parser.add_argument("--out", type=Path, default=RESULTS / "check_policy.json")
    parser.add_argument("--summarize", action="store_true", help="only print the table")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="fold these results files' rows in first")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    for confidence in args.confidences:
        check_confidence(confidence)
    if args.search_seed in args.judge_seeds:
        raise UserError(f"--search_seed {args.search_seed} is also in --judge_seeds: judge on draws not searched on")
    torch.set_grad_enabled(False)
    if args.merge:
        merge(args.out, args.merge)
    if args.summarize:
        summarize(json.loads(args.out.read_text()), args.confidences)
    else:
        run(args)


if __name__ == "__main__":
    run_cli(main)
