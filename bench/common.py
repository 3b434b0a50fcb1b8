"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import contextmanager

import torch


@contextmanager
def timer(result: dict, key: str):
    start = time.perf_counter()
    yield
    result[key] = time.perf_counter() - start


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0]}


def emit(record: dict) -> None:
    """Prints the benchmark's one JSON line."""
    print(json.dumps(record), flush=True)
