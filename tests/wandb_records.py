"""Read back what an offline W&B run wrote: the records of its ``run-*.wandb`` file.

The file is a LevelDB-style log (wandb writes it from its Go core and no longer ships a Python reader): a 7-byte
header (``:W&B``, 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte header (CRC32, little-endian
length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf ``Record`` payload.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # the rest of the block is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0 and length == 0:
            offset += room
            continue
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _settled_records(run_dir: Path, attempts: int = 5) -> list[wandb_internal_pb2.Record]:
    """The run's records, read again after a pause if wandb's writer process was still finishing the file."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    for attempt in range(attempts):
        try:
            return read_records(path)
        except DecodeError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)
    return []


def logged_keys(run_dir: Path) -> set[str]:
    """Every metric key in the history and summary records of the run in ``run_dir``."""
    keys = set()
    for record in _settled_records(run_dir):
        kind = record.WhichOneof("record_type")
        items = record.history.item if kind == "history" else record.summary.update if kind == "summary" else []
        keys.update(item.key or "/".join(item.nested_key) for item in items)
    return keys


def run_config(run_dir: Path) -> dict:
    """The run's config (``wandb.config``) as a dict, from its config records (later updates win)."""
    import json

    config: dict = {}
    for record in _settled_records(run_dir):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
    return config


def logged_history(run_dir: Path) -> dict[str, list[float]]:
    """Every numeric value of each metric key in the run's history records, in logging order."""
    import json

    history: dict[str, list[float]] = {}
    for record in _settled_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                value = json.loads(item.value_json)
                if isinstance(value, (int, float)):
                    history.setdefault(item.key or "/".join(item.nested_key), []).append(value)
    return history
