"""Depthwise 3x3 forward and forward+backward time per implementation, side by side.

    python benchmarks/depthwise.py [--batch 32] [--repeats 5]

The shapes are MobileNetV2's depthwise layers at 224x224 (one per distinct shape and
stride). Every implementation runs on the same inputs in the same process, so compare
the ratios, not absolute times: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from ca_flax.layers.depthwise import IMPLEMENTATIONS, depthwise_conv, resolve_impl

# (H, W, C, stride) of MobileNetV2 1.0's depthwise layers at 224x224.
SHAPES = [
    (112, 112, 32, 1),
    (112, 112, 96, 2),
    (56, 56, 144, 1),
    (56, 56, 144, 2),
    (28, 28, 192, 1),
    (28, 28, 192, 2),
    (14, 14, 384, 1),
    (14, 14, 576, 1),
    (14, 14, 576, 2),
    (7, 7, 960, 1),
]


def _time(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, compile excluded."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def bench_shape(h: int, w: int, c: int, stride: int, batch: int, repeats: int, dtype) -> dict[str, tuple[float, float]]:
    """Returns {impl: (forward ms, forward+backward ms)} for one layer shape."""
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (batch, h, w, c), dtype)
    kernel = jax.random.normal(kk, (3, 3, 1, c), dtype)
    results = {}
    for impl in IMPLEMENTATIONS:
        forward = jax.jit(lambda x, k, impl=impl: depthwise_conv(x, k, stride, impl))
        grad = jax.jit(
            jax.grad(lambda x, k, impl=impl: jnp.sum(depthwise_conv(x, k, stride, impl).astype(jnp.float32)), (0, 1))
        )
        results[impl] = (_time(forward, x, kernel, repeats=repeats), _time(grad, x, kernel, repeats=repeats))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} batch={args.batch} "
          f"dtype={args.dtype} auto={resolve_impl('auto')}")
    header = f"{'layer (HxWxC/stride)':<22}" + "".join(f"{impl + ' fwd':>14}{impl + ' f+b':>14}" for impl in IMPLEMENTATIONS)
    print(header + f"{'best f+b speedup vs xla':>26}")
    totals = {impl: [0.0, 0.0] for impl in IMPLEMENTATIONS}
    for h, w, c, stride in SHAPES:
        res = bench_shape(h, w, c, stride, args.batch, args.repeats, dtype)
        row = f"{f'{h}x{w}x{c}/{stride}':<22}"
        for impl in IMPLEMENTATIONS:
            fwd, fb = res[impl]
            totals[impl][0] += fwd
            totals[impl][1] += fb
            row += f"{fwd:>12.2f}ms{fb:>12.2f}ms"
        best = min(res[i][1] for i in IMPLEMENTATIONS if i != "xla")
        print(row + f"{res['xla'][1] / best:>25.1f}x")
    row = f"{'total':<22}" + "".join(f"{t[0]:>12.2f}ms{t[1]:>12.2f}ms" for t in totals.values())
    print(row)


if __name__ == "__main__":
    main()
