"""The benchmark results file: one JSON document, validated on write and on read.

Schema "cosmolit-bench/1" (documented in README.md, "Benchmarks")::

    {
      "schema": "cosmolit-bench/1",
      "kind": "train" | "generate" | "overhead",
      "label": "cosmolit cpu",          # legend of the run in plots
      "environment": {...},             # cosmolit.bench.env.capture_environment()
      "settings": {...},                # what was asked (command options)
      "results": [row, ...]
    }

Rows, all times in seconds; `step_time` / `time` are summaries with the keys of
cosmolit.bench.callbacks.summarize (n, median, q1, q3, iqr, min, max, mean):

- train:    model, batch_size, mode, step_time, images_per_second, seconds_per_100_epochs
            (optional: steps_timed, warmup_steps, device_iterations, note)
- generate: n, time, images_per_second (optional: mode, repeats, note, decode_time: the decoder
            alone on latents drawn beforehand)
- overhead: name, value, unit (optional: a, b, batch_size, goal, note)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cosmolit.errors import UsageError

SCHEMA = "cosmolit-bench/1"
KINDS = ("train", "generate", "overhead")
STAT_REQUIRED = ("n", "median", "q1", "q3", "min", "max")
ROW_REQUIRED = {
    "train": {"model": str, "batch_size": int, "mode": str, "step_time": dict, "images_per_second": float,
              "seconds_per_100_epochs": float},
    "generate": {"n": int, "time": dict, "images_per_second": float},
    "overhead": {"name": str, "value": float, "unit": str},
}


def _check_type(value, tp, where: str) -> None:
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise UsageError(f"{where} is {value!r}; a finite number is required")
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise UsageError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def _check_stats(stats: dict, where: str) -> None:
    for key in STAT_REQUIRED:
        if key not in stats:
            raise UsageError(f"{where} lacks '{key}' (required: {', '.join(STAT_REQUIRED)})")
    _check_type(stats["n"], int, f"{where}.n")
    if stats["n"] <= 0:
        raise UsageError(f"{where}.n is {stats['n']}; at least one timed step is required")
    for key in STAT_REQUIRED[1:]:
        _check_type(stats[key], float, f"{where}.{key}")
        if stats[key] < 0:
            raise UsageError(f"{where}.{key} is negative ({stats[key]})")


def validate(payload, where: str = "results") -> dict:
    """Check a results document against the schema; returns it, or raises UsageError (one line)."""
    if not isinstance(payload, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(payload).__name__}")
    if payload.get("schema") != SCHEMA:
        raise UsageError(f"{where}: 'schema' is {payload.get('schema')!r}, expected {SCHEMA!r}")
    kind = payload.get("kind")
    if kind not in KINDS:
        raise UsageError(f"{where}: 'kind' is {kind!r}; allowed: {', '.join(KINDS)}")
    for key, tp in (("label", str), ("environment", dict), ("settings", dict), ("results", list)):
        if key not in payload:
            raise UsageError(f"{where}: missing '{key}'")
        _check_type(payload[key], tp, f"{where}.{key}")
    if not payload["results"]:
        raise UsageError(f"{where}: 'results' is empty")
    for i, row in enumerate(payload["results"]):
        rw = f"{where}.results[{i}]"
        _check_type(row, dict, rw)
        for key, tp in ROW_REQUIRED[kind].items():
            if key not in row:
                raise UsageError(f"{rw} lacks '{key}' (a {kind} row needs {', '.join(ROW_REQUIRED[kind])})")
            _check_type(row[key], tp, f"{rw}.{key}")
            if tp is dict:
                _check_stats(row[key], f"{rw}.{key}")
    return payload


def make_payload(kind: str, results: list, environment: dict, settings: dict | None = None,
                 label: str | None = None) -> dict:
    """Assemble (and validate) a results document."""
    payload = {"schema": SCHEMA, "kind": kind,
               "label": label or f"cosmolit {environment.get('accelerator', '?')}",
               "environment": environment, "settings": dict(settings or {}), "results": list(results)}
    return validate(payload, "payload")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        return obj.item()
    return obj


def write_results(path: str | Path, payload: dict, force: bool = False) -> Path:
    """Validate `payload` and write it to `path` atomically (refuses to overwrite without force)."""
    from cosmolit.dataset import atomic_path, check_output_path

    path = check_output_path(path, force=force, what="results file")
    payload = validate(_jsonable(payload), str(path))
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=2, allow_nan=False)
            fh.write("\n")
    return path


def load_results(path: str | Path) -> dict:
    """Read and validate a results file; UsageError naming the file and the problem otherwise."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"results file {str(path)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"results file {str(path)!r} is a folder; give a .json file")
    try:
        with open(path) as fh:
            payload = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"results file {str(path)!r} is not valid JSON ({exc})") from None
    return validate(payload, str(path))
