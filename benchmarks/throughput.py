"""Throughput of pruned ViTs against the unpruned model, at equal FLOPs across methods, in every inference mode.

Every routing (EViT, ToMe, a layer-wise routing) is tuned to the same fraction of the unpruned FLOPs (``--ratio``, or
ToMe's ``--tome_r`` with the others matched to it). For each model, dtype and mode (see
:data:`attnprune.inference.MODES`), the unpruned model and every routing are timed side by side in one process
(first call timed on its own: compilation and graph capture; then warm-up and interleaved rounds, median), at every
batch size of ``--batches``. Before timing, each mode's float32 logits are checked against the eager PyTorch
reference (reference reducers) on a small batch. Prints one table and writes a JSON file
``{"device", "torch", "rows": [{"model", "dtype", "mode", "batch", "routing", "gflops", "ms", "speedup",
"efficiency", ...}], "checks": [...]}``, where ``efficiency`` is the speed-up divided by the FLOPs reduction
(1.0: the FLOPs saved became time). ``--summarize FILE`` prints the README's Markdown table from such a file.

What has run so far is kept after every step in ``<out>.partial.json`` beside ``--out`` (a run cut short keeps what
it measured); ``--out`` itself is written only when every step ran and every check passed. A step that fails (a mode
the device cannot run) is recorded under ``errors`` and the others still run, but the run then ends with exit status 1,
leaving ``--out`` as it was and its record in the partial file.

    .venv/bin/python benchmarks/throughput.py                 # CPU, DeiT-S, float32, eager and compiled
    .venv/bin/python benchmarks/throughput.py --smoke         # a tiny model in seconds (what the tests run)
    .venv/bin/python benchmarks/throughput.py --models deit_small_patch16_224 transformers_vit_s16 \
        open_clip_vit_s16 --out benchmarks/results/throughput_libraries.json   # converted models beside DeiT-S
    bash benchmarks/gpu_session.sh                            # the CUDA run (see its header)
    .venv/bin/python benchmarks/throughput.py --summarize benchmarks/results/throughput_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from attnprune import Routing, convert, count_flops, fused, load_model, match_flops, prune
from attnprune.atomic import check_distinct_outputs, check_output_file, write_text_atomic
from attnprune.cli import ArgumentParser, fraction, positive_int, run_cli
from attnprune.errors import UserError
from attnprune.inference import MODES, InferenceModel
from attnprune.timing import device_name, synchronize, time_interleaved

KNOBS = np.round(np.arange(0.30, 1.0, 0.01), 2).tolist()
ROUTINGS = ("unpruned", "evit", "layerwise", "tome")
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
LIBRARY_MODELS = ("transformers_vit_s16", "open_clip_vit_s16")
"""Models of other libraries at DeiT-S's size (ViT-S/16 in transformers, open_clip's ViT-S-16 image tower), random
weights, converted to timm ViTs by attnprune.convert (the hf and clip extras)."""
CHECK_BATCH = 4
TOLERANCE = 1e-4


def _layers(depth: int, at: tuple[int, ...]) -> list[int]:
    """Layers given for a 12-block model, scaled to ``depth`` blocks."""
    return sorted({min(depth - 1, round(layer * depth / 12)) for layer in at})


def layerwise(keep: float, depth: int = 12) -> Routing:
    """The layer-wise preset pruning early (blocks 1, 4 and 7 of 12), statistics keeping 0.15 more at the first."""
    return Routing.layerwise(keep, _layers(depth, (1, 4, 7)), first_keep=min(1.0, keep + 0.15))


def build_routings(model: nn.Module, ratio: float, tome_r: int | None = None) -> dict[str, Routing]:
    """The routings of :data:`ROUTINGS` at about ``ratio`` of the FLOPs (ToMe's with ``tome_r`` when given)."""
    depth = len(model.blocks)
    if tome_r is not None:
        tome = Routing.tome(tome_r, depth)
        ratio = count_flops(model, tome) / count_flops(model)
    else:
        tome = match_flops(model, lambda r: Routing.tome(int(r), depth), range(1, 30), ratio)
    evit_layers = _layers(depth, (3, 6, 9))
    return {
        "unpruned": Routing(),
        "evit": match_flops(model, lambda k: Routing.evit(keep=k, layers=evit_layers), KNOBS, ratio),
        "layerwise": match_flops(model, lambda k: layerwise(k, depth), KNOBS, ratio),
        "tome": tome,
    }


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A seeded random-init timm model (offline: ``pretrained=False``); ``tiny``: a depth-4, width-32 ViT on 32 px;
    one of :data:`LIBRARY_MODELS`: that library's model of DeiT-S's size, random-init and converted."""
    torch.manual_seed(seed)
    if name == "tiny":
        return timm.models.vision_transformer.VisionTransformer(**TINY).eval()
    if name == "transformers_vit_s16":
        import transformers

        config = transformers.ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_labels=1000)
        return convert(transformers.ViTForImageClassification(config).eval())
    if name == "open_clip_vit_s16":
        return load_model("open_clip:ViT-S-16")
    return timm.create_model(name, pretrained=False).eval()


def wrap(model: nn.Module, mode: str, backend: str) -> nn.Module:
    """``model`` in ``mode``: eager as it is, else an :class:`~attnprune.inference.InferenceModel`."""
    if mode == "eager":
        return model
    return InferenceModel(model, mode, **({} if mode in ("eager", "cudagraph") else {"backend": backend}))


def check_outputs(
    model_name: str, routings: dict[str, Routing], modes: list[str], device: torch.device, backend: str
) -> list[dict]:
    """Float32 logits of every routing in every mode against the eager PyTorch reference (reference reducers)."""
    checks = []
    for name, routing in routings.items():
        model = prune(make_model(model_name).to(device), routing)
        size = model.patch_embed.img_size
        x = torch.randn(CHECK_BATCH, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad(), fused.use_impl("reference"):
            expected = model(x)
        for mode in modes:
            check = {"model": model_name, "routing": name, "mode": mode}
            try:
                with torch.no_grad():
                    diff = (wrap(model, mode, backend)(x).float() - expected).abs().max().item()
            except Exception as error:  # noqa: BLE001  (a mode that fails is a failed check, not a lost run)
                checks.append({**check, "max_abs_diff": None, "ok": False, "error": repr(error)})
                print(f"check {model_name} {name:10} {mode:19} FAILED: {error!r}", flush=True)
                continue
            checks.append({**check, "max_abs_diff": diff, "ok": diff <= TOLERANCE})
            flag = "ok" if diff <= TOLERANCE else f"MISMATCH (> {TOLERANCE:g})"
            print(f"check {model_name} {name:10} {mode:19} float32 max |diff| {diff:.2e} {flag}", flush=True)
        torch._dynamo.reset()
    return checks


def time_group(
    model_name: str,
    routings: dict[str, Routing],
    dtype: torch.dtype,
    mode: str,
    batches: list[int],
    args: argparse.Namespace,
) -> list[dict]:
    """Time every routing of one (model, dtype, mode) side by side at each batch size."""
    device = torch.device(args.device)
    plain = make_model(model_name)
    img_size = plain.patch_embed.img_size
    flops = {name: count_flops(plain, routing) for name, routing in routings.items()}
    models = {}
    for name, routing in routings.items():
        models[name] = wrap(prune(make_model(model_name).to(device, dtype), routing), mode, args.backend)
    if mode not in ("eager", "cudagraph"):
        warm_compiler(device)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, *img_size, device=device, dtype=dtype)
        first = {}
        for name, model in models.items():  # compilation and capture, timed on their own
            start = time.perf_counter()
            with torch.no_grad():
                model(x)
            synchronize(device)
            first[name] = time.perf_counter() - start
        seconds = time_interleaved(models, x, warmup=args.warmup, repeats=args.repeats, progress=False)
        for name in routings:
            speedup = seconds["unpruned"] / seconds[name]
            flops_ratio = flops[name] / flops["unpruned"]
            rows.append(
                {
                    "model": model_name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "mode": mode,
                    "batch": batch,
                    "routing": name,
                    "routing_name": routings[name].name,
                    "gflops": flops[name] / 1e9,
                    "flops_ratio": flops_ratio,
                    "ms": 1e3 * seconds[name],
                    "images_per_s": batch / seconds[name],
                    "speedup": speedup,
                    "efficiency": speedup * flops_ratio,
                    "first_call_s": first[name],
                }
            )
            print_row(rows[-1])
        for model in models.values():  # free this batch's CUDA graphs before the next
            if isinstance(model, InferenceModel):
                model.clear_graphs()
    torch._dynamo.reset()
    return rows


def warm_compiler(device: torch.device) -> None:
    """Compile something small first, so that the compiler's start-up (worker processes, imports) is not charged to
    whichever routing compiles first."""
    torch.compile(lambda t: (t * 2.0).sin().sum(dim=-1))(torch.randn(8, 8, device=device))


def compile_times(
    model_name: str, routings: dict[str, Routing], dtype: torch.dtype, mode: str, batch: int, args: argparse.Namespace
) -> list[dict]:
    """Seconds to the first output of each routing in ``mode`` (compilation, warm-up, capture), each from a cold
    compiler cache (Dynamo reset, Inductor's on-disk caches off), so no routing reuses another's graphs."""
    device = torch.device(args.device)
    warm_compiler(device)
    rows = []
    for name, routing in routings.items():
        torch._dynamo.reset()
        model = wrap(prune(make_model(model_name).to(device, dtype), routing), mode, args.backend)
        inner = model.model if isinstance(model, InferenceModel) else model
        x = torch.randn(batch, 3, *inner.patch_embed.img_size, device=device, dtype=dtype)
        cold = {
            key: False for key in ("fx_graph_cache", "autotune_local_cache") if hasattr(torch._inductor.config, key)
        }
        with torch._inductor.config.patch(cold):
            start = time.perf_counter()
            with torch.no_grad():
                model(x)
            synchronize(device)
        seconds = time.perf_counter() - start
        rows.append({"model": model_name, "dtype": str(dtype).removeprefix("torch."), "mode": mode, "batch": batch})
        rows[-1].update(routing=name, compile_s=seconds)
        print(f"compile {model_name} {rows[-1]['dtype']} {mode} batch {batch} {name:10} {seconds:.1f} s", flush=True)
    torch._dynamo.reset()
    return rows


HEADER = (
    f"{'model':24}{'dtype':10}{'mode':20}{'batch':>6}  {'routing':10}{'GFLOPs':>8}{'FLOPs':>7}{'ms':>10}"
    f"{'speedup':>9}{'efficiency':>11}{'first s':>9}"
)


def print_row(row: dict) -> None:
    print(
        f"{row['model'][:23]:24}{row['dtype']:10}{row['mode']:20}{row['batch']:>6}  {row['routing']:10}"
        f"{row['gflops']:>8.2f}{row['flops_ratio']:>7.0%}{row['ms']:>10.2f}{row['speedup']:>9.2f}"
        f"{row['efficiency']:>11.2f}{row['first_call_s']:>9.1f}",
        flush=True,
    )


def best_modes(rows: list[dict]) -> list[dict]:
    """Per (model, dtype, batch, routing), the row of the fastest mode; speed-up and efficiency recomputed against
    the unpruned model in ITS fastest mode (each model as a user would run it)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["model"], row["dtype"], row["batch"], row["routing"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    out = []
    for (model, dtype, batch, _), row in best.items():
        base = best.get((model, dtype, batch, "unpruned"))
        if base is None:
            continue
        speedup = base["ms"] / row["ms"]
        out.append({**row, "speedup": speedup, "efficiency": speedup * row["flops_ratio"]})
    return out


def summarize(result: dict, impl: str | None = None) -> str:
    """The README table: per model, dtype and batch, the unpruned model's time and each routing's speed-up
    (efficiency), every model in its fastest mode; rows timed with the reducers ``impl`` (default: the run's)."""
    impl = result["impl"] if impl is None else impl
    rows = best_modes([row for row in result["rows"] if row.get("impl", result["impl"]) == impl])
    routings = [r for r in ROUTINGS if r != "unpruned" and any(row["routing"] == r for row in rows)]
    lines = [
        f"Device: {result['device']} (torch {result['torch']}); each entry in its fastest mode; "
        "speed-up over the unpruned model (efficiency = speed-up / FLOPs reduction).",
        "",
        "| model | dtype | batch | unpruned ms (mode) | " + " | ".join(routings) + " |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in routings) + " |",
    ]
    index = {(r["model"], r["dtype"], r["batch"], r["routing"]): r for r in rows}
    for model, dtype, batch in sorted({(r["model"], r["dtype"], r["batch"]) for r in rows}):
        base = index[(model, dtype, batch, "unpruned")]
        cells = []
        for routing in routings:
            row = index.get((model, dtype, batch, routing))
            cells.append("" if row is None else f"{row['speedup']:.2f}x ({row['efficiency']:.2f}, {row['mode']})")
        lines.append(f"| {model} | {dtype} | {batch} | {base['ms']:.2f} ({base['mode']}) | " + " | ".join(cells) + " |")
    if result.get("compile"):
        lines += ["", "| model | dtype | mode | batch | routing | first output s (compile) | x unpruned |"]
        lines.append("| --- | --- | --- | ---: | --- | ---: | ---: |")
        base = {(r["model"], r["mode"]): r["compile_s"] for r in result["compile"] if r["routing"] == "unpruned"}
        for r in result["compile"]:
            ratio = r["compile_s"] / base[(r["model"], r["mode"])] if (r["model"], r["mode"]) in base else float("nan")
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['batch']} | {r['routing']} | {r['compile_s']:.1f} "
                f"| {ratio:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each checked before any model is built (see :mod:`attnprune.cli`)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["deit_small_patch16_224"],
        help=f"timm architectures, tiny, or {', '.join(LIBRARY_MODELS)} (converted, DeiT-S's size)",
    )
    parser.add_argument("--ratio", type=fraction, default=0.65, help="target FLOPs as a fraction of the unpruned model")
    parser.add_argument("--tome_r", type=positive_int, default=None, help="ToMe's r; the others match its FLOPs")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=["eager", "regional"], choices=MODES)
    parser.add_argument(
        "--step",
        action="append",
        default=[],
        metavar="SPEC",
        help="run these steps in order, each for every model (repeatable; replaces --dtypes/--modes/--batches/"
        "--check_modes): check:MODE[,MODE...] checks float32 logits, time:DTYPE:MODE:BATCHES[:IMPL] times, "
        "e.g. time:bfloat16:cudagraph:1,64,256, compile:MODE:BATCH:DTYPE times each routing's compilation from a "
        "cold cache",
    )
    parser.add_argument("--check_modes", nargs="*", default=None, help="modes checked in float32 (default: --modes)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled modes")
    parser.add_argument(
        "--impl",
        default="auto",
        choices=fused.IMPLS,
        help="reducers (auto: see attnprune.fused.set_impl; with --summarize: the rows timed with these)",
    )
    parser.add_argument("--budget_s", type=float, default=None, help="skip the groups left once this much has run")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, float32, batches 1 and 4, 2 rounds")
    parser.add_argument("--summarize", type=Path, default=None, help="print the Markdown table of a results file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.repeats, args.warmup, args.ratio = ["tiny"], [1, 4], 2, 1, 0.65
    if args.summarize is not None:
        if not args.summarize.is_file():
            raise FileNotFoundError(f"--summarize {args.summarize} does not exist; expected a results file")
        return args
    unknown = [name for name in args.models if name not in ("tiny", *LIBRARY_MODELS) and not timm.is_model(name)]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not a timm architecture (nor tiny, {', '.join(LIBRARY_MODELS)})")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UserError(f"--device {args.device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    check_output_file(args.out, "--out")
    check_distinct_outputs({"--out": args.out, "its partial record": partial_path(args.out)})
    steps(args)  # a bad --step fails here, before any model is built
    return args


def partial_path(out: Path) -> Path:
    """Where a run keeps what it has measured so far: ``throughput_gpu.partial.json`` for ``throughput_gpu.json``."""
    return out.with_name(f"{out.stem}.partial{out.suffix or '.json'}")


Step = tuple  # ("check", modes) or ("time", dtype, mode, batches, impl)


def steps(args: argparse.Namespace) -> list[Step]:
    """What to run, in order, for every model: ``--step`` options, else checks of every mode then every
    (dtype, mode) at ``--batches``."""
    if not args.step:
        modes = args.check_modes if args.check_modes is not None else args.modes
        timed = [("time", dtype, mode, args.batches, args.impl) for dtype in args.dtypes for mode in args.modes]
        return [("check", modes), *timed]
    out = []
    for spec in args.step:
        kind, *fields = spec.split(":")
        if kind == "check" and len(fields) == 1 and all(m in MODES for m in fields[0].split(",")):
            out.append(("check", fields[0].split(",")))
            continue
        dtypes = ("float32", "bfloat16", "float16")
        if (
            kind == "compile"
            and len(fields) == 3
            and fields[0] in MODES
            and fields[1].isdigit()
            and int(fields[1]) > 0
            and fields[2] in dtypes
        ):
            out.append(("compile", fields[0], int(fields[1]), fields[2]))
            continue
        if kind == "time" and len(fields) in (3, 4) and fields[0] in dtypes and fields[1] in MODES:
            impl = fields[3] if len(fields) == 4 else args.impl
            if impl in fused.IMPLS and all(b.isdigit() and int(b) > 0 for b in fields[2].split(",")):
                out.append(("time", fields[0], fields[1], [int(b) for b in fields[2].split(",")], impl))
                continue
        raise UserError(
            f"--step {spec!r}: expected check:MODE[,MODE...], time:DTYPE:MODE:BATCHES[:IMPL] or "
            f"compile:MODE:BATCH:DTYPE (modes {MODES}, impls {fused.IMPLS})"
        )
    return out


def run_step(step: Step, model_name: str, routings: dict[str, Routing], result: dict, args: argparse.Namespace) -> None:
    """Run one step of :func:`steps` for one model, adding its checks or rows to ``result``."""
    if step[0] == "check":
        with fused.use_impl(args.impl):
            result["checks"] += check_outputs(model_name, routings, step[1], torch.device(args.device), args.backend)
        return
    if step[0] == "compile":
        _, mode, batch, dtype = step
        result["compile"] += compile_times(model_name, routings, getattr(torch, dtype), mode, batch, args)
        return
    _, dtype, mode, batches, impl = step
    with fused.use_impl(impl):
        rows = time_group(model_name, routings, getattr(torch, dtype), mode, batches, args)
    result["rows"] += [{**row, "impl": impl} for row in rows]


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.summarize is not None:
        print(summarize(json.loads(args.summarize.read_text()), None if args.impl == "auto" else args.impl))
        return None
    plan = steps(args)
    device = torch.device(args.device)
    started = time.perf_counter()
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "impl": args.impl,
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "routings": {},
        "checks": [],
        "skipped": [],
        "errors": [],
        "compile": [],
        "rows": [],
    }
    routings = {name: build_routings(make_model(name), args.ratio, args.tome_r) for name in args.models}
    result["routings"] = {m: {name: r.to_dict() for name, r in rs.items()} for m, rs in routings.items()}
    partial = partial_path(args.out)
    print(HEADER)
    for step in plan:
        for model_name in args.models:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                result["skipped"].append({"model": model_name, "step": list(step)})
                print(f"skipped {model_name} {step}: over --budget_s {args.budget_s:g}", flush=True)
                continue
            try:
                run_step(step, model_name, routings[model_name], result, args)
            except Exception as error:  # noqa: BLE001  (one failing step must not lose the others' results)
                result["errors"].append({"model": model_name, "step": list(step), "error": repr(error)})
                print(f"FAILED {model_name} {step}: {error!r}", flush=True)
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write_text_atomic(partial, json.dumps(result, indent=2))  # a run cut short keeps what it measured
    result["elapsed_s"] = time.perf_counter() - started
    failed = [f"{len(result['errors'])} steps failed"] if result["errors"] else []
    if not all(check["ok"] for check in result["checks"]):
        failed.append(f"some outputs differ from the PyTorch reference by more than {TOLERANCE:g} (or failed)")
    if failed:
        write_text_atomic(partial, json.dumps(result, indent=2))
        raise SystemExit(f"error: {'; '.join(failed)}: {args.out} not written, the run is in {partial}")
    write_text_atomic(args.out, json.dumps(result, indent=2))
    partial.unlink(missing_ok=True)
    print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    run_cli(main)
