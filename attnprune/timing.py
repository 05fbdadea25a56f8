"""Throughput measurement: candidates timed side by side, interleaved, medians; and the name of the device timed."""

from __future__ import annotations

import platform
import statistics
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["device_name", "synchronize", "time_interleaved"]


def device_name(device: torch.device) -> str:
    """The device as result tables name it: ``cuda:0 (NVIDIA H200)``, or ``cpu (x86_64 CPU, 2 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA; a no-op elsewhere), so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_interleaved(
    models: dict[str, nn.Module], x: Tensor, warmup: int = 2, repeats: int = 10, progress: bool = True
) -> dict[str, float]:
    """Median seconds per forward of each model on ``x``, timed in interleaved rounds.

    Every round runs each model once, starting from a different model each round, so that drifts in machine
    load (thermal, other processes) fall on all candidates alike.

    Args:
        models: name -> model, already in eval mode and on ``x``'s device.
        x: the input batch.
        warmup: untimed rounds first (compilation, allocator, caches).
        repeats: timed rounds.
        progress: show a progress bar.
    """
    names = list(models)
    for _ in range(warmup):
        for name in names:
            models[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in tqdm(range(repeats), desc=f"timing batch {x.shape[0]}", disable=not progress, leave=False):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            synchronize(x.device)
            start = time.perf_counter()
            models[name](x)
            synchronize(x.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
