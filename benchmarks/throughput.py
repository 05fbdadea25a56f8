"""Throughput of pruned DeiT-S against the unpruned model, at equal FLOPs across methods.

Every routing is tuned to about ``--ratio`` of the unpruned FLOPs, then all are timed side by side in one process
(warm-up, interleaved rounds, median), eager and under ``torch.compile``, at every batch size of ``--batches`` and
every weight/activation dtype of ``--dtypes``. Prints one table and writes ``benchmarks/results/throughput.json``.

    .venv/bin/python benchmarks/throughput.py                 # CPU, float32, batches 1, 8, 32
    .venv/bin/python benchmarks/throughput.py --device cuda --dtypes float32 bfloat16 --batches 1 64 256 \
        --no-compile --out benchmarks/results/throughput_gpu.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import timm
import torch

from attnprune import Routing, count_flops, match_flops, prune
from attnprune.bench import time_interleaved

KNOBS = np.round(np.arange(0.30, 1.0, 0.01), 2).tolist()


def layerwise(keep: float) -> Routing:
    """Statistics where attention is still diffuse, CLS attention with fusion deeper."""
    return Routing.from_dict(
        {
            "name": "layerwise",
            "rules": [
                {"layer": 1, "score": "l2_norm", "keep": min(1.0, keep + 0.15), "reduce": "drop"},
                {"layer": 4, "score": "cls_attention", "keep": keep, "reduce": "fuse"},
                {"layer": 7, "score": "cls_attention", "keep": keep, "reduce": "fuse"},
            ],
        }
    )


def build_routings(model: torch.nn.Module, ratio: float) -> dict[str, Routing]:
    depth = len(model.blocks)
    return {
        "unpruned": Routing(),
        "evit": match_flops(model, lambda k: Routing.evit(keep=k), KNOBS, ratio),
        "tome": match_flops(model, lambda r: Routing.tome(int(r), depth), range(1, 30), ratio),
        "layerwise": match_flops(model, layerwise, KNOBS, ratio),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.65, help="target FLOPs as a fraction of the unpruned model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-compile", action="store_true", help="time eager mode only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = timm.create_model(args.model, pretrained=False).eval()
    routings = build_routings(reference, args.ratio)
    base_flops = count_flops(reference)
    flops = {name: count_flops(reference, routing) for name, routing in routings.items()}

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for mode in modes:
            models = {}
            for name, routing in routings.items():
                model = prune(timm.create_model(args.model, pretrained=False).eval().to(device, dtype), routing)
                models[name] = torch.compile(model) if mode == "compiled" else model
            for batch in args.batches:
                x = torch.randn(batch, 3, *reference.patch_embed.img_size, device=device, dtype=dtype)
                seconds = time_interleaved(models, x, warmup=args.warmup, repeats=args.repeats)
                for name in routings:
                    flops_ratio = base_flops / flops[name]
                    speedup = seconds["unpruned"] / seconds[name]
                    rows.append(
                        {
                            "dtype": dtype_name,
                            "mode": mode,
                            "batch": batch,
                            "routing": name,
                            "gflops": flops[name] / 1e9,
                            "flops_ratio": flops[name] / base_flops,
                            "images_per_s": batch / seconds[name],
                            "latency_ms": 1e3 * seconds[name],
                            "speedup": speedup,
                            "speedup_over_flops_reduction": speedup / flops_ratio,
                        }
                    )

    header = f"{'dtype':10}{'mode':9}{'batch':>6}  {'routing':10}{'GFLOPs':>8}{'FLOPs':>7}{'img/s':>9}{'ms/batch':>10}"
    header += f"{'speedup':>9}{'speedup/FLOPs-reduction':>25}"
    print(f"{args.model}, {device_name(device)}")
    print(header)
    for row in rows:
        print(
            f"{row['dtype']:10}{row['mode']:9}{row['batch']:>6}  {row['routing']:10}"
            f"{row['gflops']:>8.2f}{row['flops_ratio']:>7.0%}"
            f"{row['images_per_s']:>9.1f}{row['latency_ms']:>10.1f}{row['speedup']:>9.2f}"
            f"{row['speedup_over_flops_reduction']:>25.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "dtypes": args.dtypes,
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "command": "python benchmarks/throughput.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("out", "no_compile")
        )
        + (" --no-compile" if args.no_compile else ""),
        "routings": {name: routing.to_dict() for name, routing in routings.items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
