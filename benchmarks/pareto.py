"""Accuracy against FLOPs: the searched routing and the baselines at matched FLOPs, on the test split.

For every budget, the routing is searched on validation images (``attnprune.search``), then evaluated on the test
split together with ToMe (r schedule tuned), EViT (keep tuned), uniform attention top-k and random, each tuned to the
searched routing's FLOPs (within 1% where the knob allows). Prints one table, writes
``benchmarks/results/pareto_<model>.json`` and a PNG plot of top-1 against GFLOPs, one line per method.

    .venv/bin/python benchmarks/pareto.py --model checkpoints/fmnist_supervised.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from attnprune import Routing, count_flops, load_model, prune, unprune  # noqa: E402
from attnprune.flops import matched_baselines  # noqa: E402
from attnprune.lit.data import FashionMNISTDataModule  # noqa: E402
from attnprune.search import search_routing  # noqa: E402

METHODS = ("searched", "tome", "evit", "topk_attention", "random")


@torch.no_grad()
def top1(model: torch.nn.Module, routing: Routing, batches: list) -> float:
    prune(model, routing)
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches)
    unprune(model)
    return correct / sum(len(y) for _, y in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="weights file or hub name (attnprune.load_model)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--val-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--strategy", default="beam")
    parser.add_argument("--state-dir", type=Path, default=Path("runs/search"))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = load_model(args.model)
    name = Path(args.model).stem
    data = FashionMNISTDataModule(batch_size=500).for_model(model)
    val, test = data.take("validation", args.val_images), data.take("test", args.test_images)
    unpruned = count_flops(model)
    result = {
        "model": name,
        "checkpoint": args.model,
        "strategy": args.strategy,
        "unpruned": {"gflops": unpruned / 1e9, "top1": top1(model, Routing(), test)},
        "results": [],
    }
    for budget in args.budgets:
        start = time.perf_counter()
        found = search_routing(
            model,
            val,
            budget,
            strategy=args.strategy,
            state_path=args.state_dir / f"{name}-{args.strategy}-{budget:g}.json",
        )
        routings = {"searched": found.routing, **matched_baselines(model, count_flops(model, found.routing))}
        for method, routing in routings.items():
            flops = count_flops(model, routing)
            row = {
                "method": method,
                "budget": budget,
                "gflops": flops / 1e9,
                "flops_ratio": flops / unpruned,
                "top1": top1(model, routing, test),
                "routing": routing.to_dict(),
            }
            if method == "searched":
                row["search"] = found.report
            result["results"].append(row)
        print(f"budget {budget:g}: searched in {time.perf_counter() - start:.0f} s", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"pareto_{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{name}: unpruned {result['unpruned']['gflops']:.4f} GFLOPs, top-1 {result['unpruned']['top1']:.2%}")
    print(f"{'budget':>7}" + "".join(f"{m:>16}" for m in METHODS) + "   searched >= all baselines")
    for budget in args.budgets:
        rows = {r["method"]: r for r in result["results"] if r["budget"] == budget}
        wins = all(rows["searched"]["top1"] >= rows[m]["top1"] for m in METHODS[1:])
        print(
            f"{budget:>7.0%}"
            + "".join(f"{rows[m]['top1']:>9.2%} {rows[m]['flops_ratio']:>5.0%}" for m in METHODS)
            + f"   {'yes' if wins else 'NO'}"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: r["gflops"])
        ax.plot(
            [r["gflops"] for r in rows],
            [100 * r["top1"] for r in rows],
            marker="o",
            label=method,
            linewidth=2.2 if method == "searched" else 1.2,
        )
    ax.axhline(100 * result["unpruned"]["top1"], color="gray", linestyle=":", label="unpruned")
    ax.set(xlabel="GFLOPs per image", ylabel="test top-1 (%)", title=f"{name}: accuracy at equal FLOPs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
