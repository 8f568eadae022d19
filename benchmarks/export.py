"""Batch-1 latency and file size of the exported files beside ``jax.jit(model.apply)``.

    python benchmarks/export.py [--model mobilenetv2_ca] [--width 1.0] [--image-size 224]
        [--runs 50] [--threads 2] [--out benchmarks/results/export.json]

Exports the model (random weights, BatchNorm statistics of random images: latency does
not depend on the values) to float32 and int8 LiteRT and ONNX files with
``ca_flax.export`` (int8 calibrated on random normal images: enough to time it, while
its top-1 agreement on random images says little of real accuracy), runs each in its runtime
with ``--threads`` threads, and prints a markdown table: median and 10th-90th
percentile batch-1 latency over ``--runs`` calls after warm-up, file size, conversion
seconds and the verification figure. Runs are interleaved round-robin so a change in the
machine's load hits every row alike; compare rows of one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from ca_flax.export import export
from ca_flax.export.api import reference_function, verification_inputs
from ca_flax.export.litert import tflite_runner
from ca_flax.export.onnx_file import onnx_runner
from ca_flax.models import create_model

CALIBRATION_BATCHES = 16


def _random_variables(model, shape: tuple[int, ...], batch: int = 8) -> dict:
    """Random weights whose BatchNorm statistics are those of random images (one
    train-mode pass at momentum 0), so activations and logits have a trained network's
    scale: with the initial statistics the logits are about 1e-12 and int8 rounds them
    all to zero. Latency does not depend on the values."""
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    variables = jax.jit(lambda key: model.init(key, x[:1], train=False))(jax.random.key(0))
    calibrate = model.clone(bn_momentum=0.0)
    _, stats = jax.jit(lambda v: calibrate.apply(v, x, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": jax.random.key(1)}))(variables)
    return {**variables, **stats}


def _latencies(runners: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Milliseconds per call of each runner, calls interleaved round-robin after two warm-ups."""
    for run in runners.values():
        run(), run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _row(name: str, times: list[float], size: int | None, convert_s: float | None, check: str) -> str:
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    size_text = f"{size / 2**20:.2f}" if size else ""
    convert_text = f"{convert_s:.1f}" if convert_s is not None else ""
    return f"| {name} | {p50:.2f} | {p10:.2f}-{p90:.2f} | {size_text} | {convert_text} | {check} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv2_ca")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    model = create_model(args.model, num_classes=args.num_classes, width_mult=args.width)
    shape = (1, args.image_size, args.image_size, model.in_channels)
    variables = _random_variables(model, shape)
    x = verification_inputs(shape, 1, seed=1)[0]
    calibration = verification_inputs(shape, CALIBRATION_BATCHES, seed=2)
    reference = reference_function(model, variables)
    runners: dict[str, Callable[[], object]] = {"jax.jit(model.apply)": lambda: reference(x)}
    rows: dict[str, dict] = {"jax.jit(model.apply)": {"bytes": None, "convert_s": None, "check": "reference"}}
    with tempfile.TemporaryDirectory() as tmp:
        for suffix, load in ((".tflite", tflite_runner), (".onnx", onnx_runner)):
            for quantize in (None, "int8"):
                path = Path(tmp) / f"model{'_int8' if quantize else ''}{suffix}"
                sidecar = export(model, variables, path, image_size=args.image_size, quantize=quantize,
                                 calibration=calibration if quantize else None)
                report = sidecar["verification"]
                check = (f"logits within {report['relative_error']:.1e}" if not quantize else
                         f"top-1 agreement {report['top1_agreement']:.0%} (random images)")
                name = f"{suffix[1:]} {quantize or 'float32'} ({sidecar['runtime']})"
                run = load(path, num_threads=args.threads)
                runners[name] = lambda run=run: run(x)
                rows[name] = {"bytes": sidecar["file_bytes"], "convert_s": sidecar["conversion_seconds"], "check": check}
        times = _latencies(runners, args.runs)
    header = [
        f"{args.model} width {args.width} at {args.image_size}x{args.image_size}, batch 1, {args.threads} threads, "
        f"{args.runs} runs; {datetime.date.today()} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores)",
        "",
        "| runtime | median ms | p10-p90 ms | MiB | convert s | check |",
        "|---|---:|---:|---:|---:|---|",
    ]
    table = [_row(name, times[name], row["bytes"], row["convert_s"], row["check"]) for name, row in rows.items()]
    print("\n".join(header + table))
    if args.out:
        results = {name: {**row, "median_ms": float(np.median(times[name])), "times_ms": times[name]}
                   for name, row in rows.items()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "date": str(datetime.date.today()),
                                              "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
