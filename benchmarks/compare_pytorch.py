"""ca-flax against the authors' PyTorch model, side by side on this machine.

    python benchmarks/compare_pytorch.py [--batch 32] [--image-size 224] [--steps 10]
        [--out benchmarks/results/compare_pytorch.json] [--only torch_train_nchw,...]

Every measurement runs in a fresh subprocess, one after another (never two at once, so
they do not share cores), and reports images/s, compile (or first-call) seconds and the
process's peak resident memory from ``wait4``: the whole process, framework included, as
a user would see it. All of them run under the same allocator setting: glibc's default,
or ``--glibc-tunables glibc.malloc.hugetlb=1`` (transparent huge pages for ``malloc``,
which sped up PyTorch's inference by half on this machine) for every process. The
PyTorch model is ``tests/torch_reference.OfficialMBV2CA``, the authors' MobileNetV2+CA
with the released code's module structure.

Measurements:

- ``torch_{infer,train}_{nchw,channels_last}``: eager PyTorch, fp32. Training is SGD with
  momentum on cross-entropy in ``train()`` mode.
- ``torch_infer_compile``: ``torch.compile`` (default mode); its compile is the first call.
  ``--torch-compile-train`` adds ``torch_train_compile`` (slow to compile, slower to run).
- ``flax_infer``: ``jax.jit(model.apply)`` in eval mode.
- ``flax_train_step``: the trainer's jitted train step (same config, optimizer, state) in
  a bare loop; ``flax_trainer`` over it is what the training loop costs.
- ``flax_trainer``: the real trainer, ``train.py --config=configs/fake_data_benchmark.py``
  (data, step, metrics, checkpoint), in an empty workdir with an empty compilation cache;
  images/s from its ``metrics.jsonl`` (steady state), compile from its
  ``train_step_compile_s``.
- ``flax_trainer_cached``: the same command again in a new workdir sharing the first run's
  persistent compilation cache: what a second run pays to compile.

Prints a table with ratios against the best PyTorch configuration of each kind and writes
everything (plus the machine and versions) as JSON. Timings are noisy on shared
machines: compare within one run. No test asserts on these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "compare_pytorch.json"
TORCH_MEASUREMENTS = [
    "torch_infer_nchw", "torch_infer_channels_last", "torch_infer_compile",
    "torch_train_nchw", "torch_train_channels_last",
]
FLAX_MEASUREMENTS = ["flax_infer", "flax_train_step", "flax_trainer", "flax_trainer_cached"]


# ----------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line.
# ----------------------------------------------------------------------------------


def _timed_loop(step, steps: int, sync) -> tuple[float, float]:
    """(seconds of the first call, seconds per call over ``steps`` calls after a second warm-up)."""
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    sync(step())
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    return first, (time.perf_counter() - start) / steps


def torch_worker(kind: str, batch: int, size: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from torch_reference import OfficialMBV2CA

    torch.manual_seed(0)
    model = OfficialMBV2CA(num_classes=1000)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))
    if "channels_last" in kind:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if kind.startswith("torch_infer"):
        model.eval()
        net = torch.compile(model) if kind.endswith("compile") else model

        def step():
            with torch.inference_mode():
                return net(images)
    else:
        model.train()
        net = torch.compile(model) if kind.endswith("compile") else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(images), labels)
            loss.backward()
            opt.step()
            return loss.detach()

    first, per_step = _timed_loop(step, steps, lambda out: out.sum().item())
    return {"images_per_sec": batch / per_step, "compile_s": first if kind.endswith("compile") else None,
            "threads": torch.get_num_threads(), "version": torch.__version__}


def flax_infer_worker(batch: int, size: int, steps: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from ca_flax.models import create_model

    model = create_model("mobilenetv2_ca")
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    # Any finite values do for timing; running the initializers would only add compile time.
    variables = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
    start = time.perf_counter()
    infer = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    _, per_step = _timed_loop(lambda: infer(variables, images), steps, jax.block_until_ready)
    return {"images_per_sec": batch / per_step, "compile_s": compile_s, "version": jax.__version__,
            "backend": jax.default_backend()}


def flax_train_step_worker(batch: int, size: int, steps: int) -> dict:
    """The trainer's own jitted step (same config, optimizer and state) in a bare loop:
    what ``flax_trainer`` would reach if the loop around the step cost nothing."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ca_flax.data import synthetic
    from ca_flax.training.optim import create_optimizer, learning_rate_schedule
    from ca_flax.training.state import create_train_state
    from ca_flax.training.steps import train_step
    from ca_flax.training.trainer import build_model
    from configs import fake_data_benchmark

    config = fake_data_benchmark.get_config()
    config.batch_size, config.image_size = batch, size
    model = build_model(config, synthetic.NUM_CLASSES)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    gen = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.05 * gen.standard_normal(s.shape), s.dtype), shapes)
    tx = create_optimizer(config, learning_rate_schedule(config, 1000, 1000))
    state = create_train_state(model, variables, tx, jax.random.PRNGKey(1))
    data = next(synthetic.batches(image_size=size, global_batch_size=batch, seed=0))
    data = {k: jnp.asarray(v) for k, v in data.items()}
    step_fn = jax.jit(functools.partial(train_step, num_classes=synthetic.NUM_CLASSES), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], data)
        return metrics["loss"]

    _, per_step = _timed_loop(step, steps, jax.block_until_ready)
    return {"images_per_sec": batch / per_step, "compile_s": compile_s}


def flax_trainer_run(
    batch: int, size: int, steps: int, workdir: Path, cache: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, Path]:
    """Starts train.py on the benchmark config; the caller waits (for peak memory)."""
    command = [
        sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "fake_data_benchmark.py"),
        "--workdir", str(workdir), "--compilation_cache_dir", str(cache),
        f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}", f"--config.image_size={size}",
        # Two warm-up steps (compile, then one more) before the measured ones.
        f"--config.num_train_steps={steps + 2}", f"--config.log_every_steps={steps + 2}",
    ]
    log = workdir.with_suffix(".log")
    proc = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return proc, log


# ----------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------


def _wait_with_peak(proc: subprocess.Popen) -> tuple[int, float]:
    """(exit status, peak RSS in MiB) of a child, from wait4's rusage (kilobytes on Linux)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def worker_environment(glibc_tunables: str | None) -> dict[str, str]:
    """The same allocator setting for every process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GLIBC_TUNABLES", None)
    if glibc_tunables:
        env["GLIBC_TUNABLES"] = glibc_tunables
    return env


def run_worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--steps", str(args.steps)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=worker_environment(args.glibc_tunables))
        status, peak = _wait_with_peak(proc)
        out.seek(0)
        text = out.read()
    if status != 0:
        raise RuntimeError(f"{name} failed (exit {status}):\n{text[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": peak}


def run_trainer(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    cache = scratch / "jax_cache"  # shared by the two trainer runs: the second one hits it
    workdir = scratch / name
    proc, log = flax_trainer_run(args.batch, args.image_size, args.steps, workdir, cache,
                                 worker_environment(args.glibc_tunables))
    status, peak = _wait_with_peak(proc)
    if status != 0:
        raise RuntimeError(f"{name} failed (exit {status}):\n{log.read_text()[-3000:]}")
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rate = [m["images_per_sec"] for m in lines if "images_per_sec" in m][-1]
    compile_s = [m["train_step_compile_s"] for m in lines if "train_step_compile_s" in m][-1]
    return {"images_per_sec": rate, "compile_s": compile_s, "peak_rss_mib": peak}


def _ratio_table(results: dict[str, dict]) -> list[str]:
    """Text table; ratios are against the best PyTorch eager (train) or any (infer) config."""
    best = {}
    for kind in ("infer", "train"):
        torch_rates = {k: v["images_per_sec"] for k, v in results.items()
                       if k.startswith(f"torch_{kind}") and not (kind == "train" and k.endswith("compile"))}
        if torch_rates:
            best[kind] = max(torch_rates.items(), key=lambda kv: kv[1])
    rows = [f"{'measurement':<28}{'img/s':>9}{'compile s':>11}{'peak MiB':>10}  ratio"]
    for name, r in results.items():
        kind = "infer" if "infer" in name else "train"
        ratio = ""
        if kind in best and name.startswith("flax"):
            ratio = f"{r['images_per_sec'] / best[kind][1]:.2f}x {best[kind][0]}"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        rows.append(f"{name:<28}{r['images_per_sec']:>9.2f}{compile_s:>11}{r['peak_rss_mib']:>10.0f}  {ratio}")
    if "flax_trainer" in results and "flax_train_step" in results:
        loop = 1 - results["flax_trainer"]["images_per_sec"] / results["flax_train_step"]["images_per_sec"]
        rows.append(f"training loop overhead over the bare step: {loop:+.1%}")
    return rows


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up ones")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", default="", help="comma-separated subset of measurements")
    parser.add_argument("--torch-compile-train", action="store_true", help="also time torch.compile training")
    parser.add_argument("--glibc-tunables", default=None,
                        help="GLIBC_TUNABLES for every process, e.g. glibc.malloc.hugetlb=1 (default: none)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker.startswith("torch"):
            result = torch_worker(args.worker, args.batch, args.image_size, args.steps)
        elif args.worker == "flax_train_step":
            result = flax_train_step_worker(args.batch, args.image_size, args.steps)
        else:
            result = flax_infer_worker(args.batch, args.image_size, args.steps)
        print(json.dumps(result))
        return

    names = TORCH_MEASUREMENTS + (["torch_train_compile"] if args.torch_compile_train else []) + FLAX_MEASUREMENTS
    if args.only:
        unknown = set(args.only.split(",")) - set(names) - {"torch_train_compile"}
        if unknown:
            parser.error(f"unknown measurement(s) {sorted(unknown)}; choose from {names + ['torch_train_compile']}")
        names = [n for n in names + ["torch_train_compile"] if n in args.only.split(",")]
    if "flax_trainer_cached" in names and "flax_trainer" not in names:
        parser.error("flax_trainer_cached reuses flax_trainer's compilation cache: measure both.")

    print(f"MobileNetV2+CA, batch {args.batch}, {args.image_size}x{args.image_size}, fp32, {args.steps} timed steps; "
          f"{_machine()['cpu']} ({os.cpu_count()} cores); GLIBC_TUNABLES={args.glibc_tunables or '(unset)'}", flush=True)
    results: dict[str, dict] = {}
    scratch = Path(tempfile.mkdtemp(prefix="ca_flax_compare_"))
    try:
        for name in names:
            results[name] = run_trainer(name, args, scratch) if name.startswith("flax_trainer") else run_worker(name, args)
            print(f"  {name}: {results[name]['images_per_sec']:.2f} img/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = _ratio_table(results)
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"batch": args.batch, "image_size": args.image_size, "steps": args.steps, "dtype": "float32",
                "glibc_tunables": args.glibc_tunables}
    report = {"settings": settings,
              "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "results": results, "table": table}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
