"""Where a train step's (or an inference call's) time goes, per layer type.

    python benchmarks/profile_step.py [--model mobilenetv2_ca] [--batch 32] [--image-size 224] [--steps 2]
        [--inference [--eval-micro-batch auto|N|none]]

``--inference`` profiles ``jax.jit(model.apply)`` in eval mode instead (the fused native
units of ``layers/fused.py`` are their own rows).

Compiles the SGD train step of ``benchmarks/model.py``, traces ``--steps`` executions
with ``jax.profiler`` (XLA:CPU emits one trace event per executed kernel when compiled
with ``xla_cpu_enable_xprof_traceme``), and sums kernel time by the layer each kernel
came from: the HLO metadata of every fused kernel names the Flax module path and
whether it belongs to the forward pass or to the transpose (backward) pass. Kernel time
is summed over threads, so the total can exceed the step's wall time on several cores.
It runs under the process's allocator setting; ``train.py`` uses glibc's default ``malloc``
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` profiles the huge-page variant docs/performance.md compares).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax
from jax._src.lib import _profile_data  # the reader behind jax.profiler's own tools

from model import _variables as model_variables  # benchmarks/model.py, next to this script
from model import sgd_train_setup
from ca_flax.models import create_model

# First match wins; patterns are searched in the HLO op_name (the Flax module path).
LAYER_TYPES = [
    ("expand + depthwise unit (native)", r"/fused_expand_depthwise_unit"),
    ("depthwise unit (native)", r"/fused_depthwise_unit"),
    ("stem unit (native)", r"/fused_dense_unit"),
    ("depthwise 3x3 conv", r"/(depthwise|dw[12])/conv"),
    ("coordinate attention", r"/attention/"),
    ("BatchNorm + activation", r"/bn/"),
    # MobileNetV2's expand / project / head, MobileNeXt's pw1 / pw2.
    ("1x1 conv (matmul)", r"/(expand|project|head|pw[12])(\.convolve)?/conv"),
    ("stem 3x3 conv", r"/stem/conv"),
    ("classifier", r"/classifier"),
]
_KERNEL = re.compile(r'^\s+%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')


def layer_type(op_name: str) -> str:
    for label, pattern in LAYER_TYPES:
        if re.search(pattern, op_name):
            return label
    return "loss, optimizer, other"


def kernel_origins(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Kernel (instruction) name -> (layer type, 'forward' or 'backward')."""
    origins = {}
    for line in hlo_text.splitlines():
        match = _KERNEL.match(line)
        if match:
            name, op_name = match.groups()
            origins[name] = (layer_type(op_name), "backward" if "transpose(" in op_name else "forward")
    return origins


def build_step(model_name: str, batch: int, size: int):
    """The compiled SGD train step of ``benchmarks/model.py`` and its arguments."""
    train_step, args = sgd_train_setup(create_model(model_name), batch, size)
    compiled = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(*args).compile(
        compiler_options={"xla_cpu_enable_xprof_traceme": True})
    return compiled, args


def build_inference(model_name: str, batch: int, size: int, micro_batch: str):
    """The compiled ``jax.jit(model.apply)`` (eval mode) and its arguments, as the step's."""
    setting = None if micro_batch == "none" else (micro_batch if micro_batch == "auto" else int(micro_batch))
    model = create_model(model_name, eval_micro_batch=setting)
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
    variables = model_variables(model, (1, size, size, 3))
    compiled = jax.jit(model.apply).lower(variables, images).compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
    return compiled, (variables, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv2_ca")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--inference", action="store_true", help="profile jax.jit(model.apply) in eval mode")
    parser.add_argument("--eval-micro-batch", default="auto", help="with --inference: auto, an int, or none")
    args = parser.parse_args()

    if args.inference:
        compiled, (variables, images) = build_inference(args.model, args.batch, args.image_size, args.eval_micro_batch)
        run = lambda: compiled(variables, images)  # noqa: E731
    else:
        compiled, state = build_step(args.model, args.batch, args.image_size)

        def run():
            nonlocal state
            *carry, loss = compiled(*state)
            state = (*carry, *state[3:])
            return loss

    origins = kernel_origins(compiled.as_text())
    for _ in range(2):  # warm up: first-touch of buffers is not the steady state
        jax.block_until_ready(run())

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(args.steps):
            out = run()
        jax.block_until_ready(out)
        wall = (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        profile = _profile_data.ProfileData.from_file(str(trace))

    per_type: dict[tuple[str, str], float] = collections.defaultdict(float)
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in origins:
                    per_type[origins[event.name]] += event.duration_ns / 1e6 / args.steps
    total = sum(per_type.values())
    what = "eval call" if args.inference else "step"
    print(f"{args.model} batch={args.batch} {args.image_size}x{args.image_size}: {wall * 1e3:.0f} ms per {what} (traced), "
          f"{total:.0f} ms of kernel time over all threads")
    print(f"{'layer type':<34}{'forward ms':>12}{'backward ms':>13}{'share':>8}")
    labels_ = [label for label, _ in LAYER_TYPES] + ["loss, optimizer, other"]
    for label in sorted(labels_, key=lambda l: -(per_type[(l, 'forward')] + per_type[(l, 'backward')])):
        fwd, bwd = per_type[(label, "forward")], per_type[(label, "backward")]
        print(f"{label:<34}{fwd:>12.0f}{bwd:>13.0f}{(fwd + bwd) / total:>8.1%}")


if __name__ == "__main__":
    main()
