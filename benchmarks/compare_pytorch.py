"""ca-flax against the authors' PyTorch model, side by side on this machine.

    python benchmarks/compare_pytorch.py [--model mobilenetv2_ca|mobilenext|mobilenext_ca]
        [--batch 32] [--image-size 224] [--steps 10] [--repeats 3]
        [--out benchmarks/results/compare_pytorch.json] [--only torch_train_nchw,...]
        [--torch-python /path/to/venv-with-newest-torch/bin/python]
    python benchmarks/compare_pytorch.py --device gpu --dtype bfloat16 --batch 256 \
        --out benchmarks/results/compare_pytorch_gpu.json

Every measurement runs in a fresh subprocess, one after another (never two at once, so
they do not share cores), and reports images/s, compile (or first-call) seconds and the
process's peak resident memory from ``wait4``: the whole process, framework included, as
a user would see it. ``--repeats N`` (default 3) runs the whole list N times over, round
robin (so a slow spell of the machine falls on every measurement alike), and reports
each measurement's median, with every run kept in the JSON. All of them run under the
same allocator setting: glibc's default, or ``--glibc-tunables glibc.malloc.hugetlb=1``
(transparent huge pages for ``malloc``, which sped up PyTorch's inference by half on
this machine) for every process. The PyTorch model (``--model``) is from ``tests/torch_reference.py``: ``OfficialMBV2CA``, the
authors' MobileNetV2+CA with the released code's module structure; ``OfficialMobileNeXt``,
the official MobileNeXt; and for ``mobilenext_ca`` the same with the authors' ``CoordAtt``
after the first depthwise conv (MobileNeXt+CA was never released; the tests check it
against ca-flax's ``mobilenext_ca`` output for output). ca-flax runs the registered model
of the same name.

Measurements:

- ``torch_{infer,train}_{nchw,channels_last}``: eager PyTorch, fp32. Training is SGD with
  momentum on cross-entropy in ``train()`` mode.
- ``torch_infer_compile``: ``torch.compile`` (default mode); its compile is the first call.
  ``--torch-compile-train`` adds ``torch_train_compile`` (slow to compile, slower to run).
- ``torch_infer_compile_microbatch`` (CPU): ``torch.compile`` fed the batch
  ``--torch-micro-batch`` images at a time (4: the fastest of 2, 4 and 8 here). Not one of
  the reference configurations the ratios use: it is the micro-batching ``flax_infer``
  does, given to PyTorch too, and its ratio is printed on a line of its own.
- ``flax_infer``: ``ca_flax.inference.make_predictor`` (eval mode, batch sharded over the
  devices, micro-batches per backend); on CPU with one JAX device per core
  (``use_cpu_device_per_core``). ``flax_infer_jit``: a plain ``jax.jit(model.apply)`` on
  JAX's default single CPU device, with the model's defaults (eval micro-batches of 8
  and the native inference units on CPU); ``flax_infer_jit_whole_batch``: the same with
  ``eval_micro_batch=None`` (one pass over the batch, native units only).
- ``flax_train_step``: the trainer's jitted train step (same config, optimizer, state and
  steps per compiled call: 8 on CPU) in a bare loop; ``flax_trainer`` over it is what the
  training loop costs.
- ``flax_trainer``: the real trainer, ``train.py --config=configs/fake_data_benchmark.py``
  (data, step, metrics, checkpoint), in an empty workdir with an empty compilation cache;
  images/s from its ``metrics.jsonl`` (steady state), compile from its
  ``train_step_compile_s``.
- ``flax_trainer_cached``: the same command again in a new workdir sharing the first run's
  persistent compilation cache: what a second run pays to compile.

On a GPU (``--device gpu``), ``--dtype bfloat16`` runs PyTorch under AMP (``autocast`` to
bfloat16; channels_last is its fast layout) and ca-flax with ``dtype=bfloat16`` (float32
parameters and BatchNorm statistics in both). The trainer measurements are left out there
(its TensorBoard writer needs TensorFlow); peak device memory comes from
``torch.cuda.max_memory_allocated`` and XLA's ``peak_bytes_in_use``. A first measurement,
``gpu_matmul_peak``, times a large bfloat16 matrix product: the table gives each
measurement's model FLOP/s (2 x MAdds per image, x3 for a training step) as a fraction of
it. ``--depthwise-impl`` times ca-flax with another depthwise implementation.

On the CPU a first measurement, ``cpu_matmul_peak``, times a large float32 matrix
product (XLA and numpy's BLAS, the faster one): the table gives each measurement's model
FLOP/s (2 x MAdds per image at the benchmark's size, x3 for a training step) as a
fraction of it.

Prints a table with ratios against the best PyTorch configuration of each kind and writes
everything (plus the machine and versions) as JSON after every measurement, so an
interrupted run keeps what it measured. A measurement that fails or passes
``--worker-timeout`` is recorded with its error and the run goes on. Timings are noisy on shared
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "compare_pytorch.json"
TORCH_MEASUREMENTS = [
    "torch_infer_nchw", "torch_infer_channels_last", "torch_infer_compile",
    "torch_train_nchw", "torch_train_channels_last", "torch_infer_compile_microbatch",
]
# Not one of the reference configurations: torch.compile fed the batch in
# micro-batches, the same trick ca-flax's predictor plays (CPU only; reported beside).
MICROBATCH = "torch_infer_compile_microbatch"
FLAX_MEASUREMENTS = ["flax_infer", "flax_infer_jit", "flax_infer_jit_whole_batch", "flax_train_step", "flax_trainer",
                     "flax_trainer_cached"]
# --model: ca-flax's registered name -> (tests/torch_reference.py class, its arguments).
MODELS = {
    "mobilenetv2_ca": ("OfficialMBV2CA", {}),
    "mobilenext": ("OfficialMobileNeXt", {}),
    "mobilenext_ca": ("OfficialMobileNeXt", {"coord_att": True}),
}


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


def torch_worker(
    kind: str, model_name: str, batch: int, size: int, steps: int, device: str, dtype: str, micro_batch: int
) -> dict:
    import contextlib

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import torch_reference

    torch.manual_seed(0)
    torch_device = "cuda" if device == "gpu" else "cpu"
    cls, kwargs = MODELS[model_name]
    model = getattr(torch_reference, cls)(num_classes=1000, **kwargs).to(torch_device)
    images = torch.randn(batch, 3, size, size, device=torch_device)
    labels = torch.randint(0, 1000, (batch,), device=torch_device)
    # AMP: float32 parameters, bfloat16 compute where autocast deems it safe.
    autocast = (lambda: torch.autocast(torch_device, dtype=torch.bfloat16)) if dtype == "bfloat16" \
        else contextlib.nullcontext
    if "channels_last" in kind or kind == MICROBATCH:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if kind == MICROBATCH:
        model.eval()
        net = torch.compile(model)
        chunks = [c.contiguous(memory_format=torch.channels_last) for c in images.split(micro_batch)]

        def step():
            with torch.inference_mode(), autocast():
                return torch.cat([net(chunk) for chunk in chunks])
    elif kind.startswith("torch_infer"):
        model.eval()
        net = torch.compile(model) if kind.endswith("compile") else model

        def step():
            with torch.inference_mode(), autocast():
                return net(images)
    else:
        model.train()
        net = torch.compile(model) if kind.endswith("compile") else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(net(images).float(), labels)
            loss.backward()
            opt.step()
            return loss.detach()

    first, per_step = _timed_loop(step, steps, lambda out: out.float().sum().item())
    result = {"images_per_sec": batch / per_step, "compile_s": first if "compile" in kind else None,
              "threads": torch.get_num_threads(), "version": torch.__version__}
    if device == "gpu":
        result["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["device_name"] = torch.cuda.get_device_name()
    return result


def _jax_device_peak(result: dict, compiled=None) -> dict:
    """Adds XLA's peak device allocation on an accelerator (CPU reports none), and what the
    executable itself needs (arguments, outputs, temporaries: XLA's memory analysis).

    The allocator's peak includes what cuDNN's autotuning took while compiling (a scratch
    buffer larger than the inference program's own need on the H200: docs/performance.md,
    "On a GPU"), so both are reported."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if jax.default_backend() != "cpu" and "peak_bytes_in_use" in stats:
        result["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
        result["device_name"] = jax.local_devices()[0].device_kind
        analysis = compiled.memory_analysis() if compiled is not None else None
        if analysis is not None:
            needed = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
            result["executable_device_mib"] = needed / 2**20
    return result


def gpu_matmul_peak_worker(size: int = 8192, repeats: int = 20) -> dict:
    """The measured bfloat16 matrix-product rate: the ceiling model FLOP/s are compared with."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a, b = (jax.random.normal(k, (size, size), jnp.bfloat16) for k in keys)
    matmul = jax.jit(lambda a, b: a @ b)
    _, per_call = _timed_loop(lambda: matmul(a, b), repeats, jax.block_until_ready)
    return _jax_device_peak({"tflops": 2 * size**3 / per_call / 1e12, "version": jax.__version__})


def cpu_matmul_peak_worker(size: int = 4096, repeats: int = 10) -> dict:
    """The measured float32 matrix-product rate on the CPU (all cores): the faster of XLA's
    and numpy's BLAS, the ceiling model FLOP/s are compared with."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a, b = (jax.random.normal(k, (size, size), jnp.float32) for k in keys)
    matmul = jax.jit(lambda a, b: a @ b)
    _, xla = _timed_loop(lambda: matmul(a, b), repeats, jax.block_until_ready)
    a_np, b_np = np.asarray(a), np.asarray(b)
    _, blas = _timed_loop(lambda: a_np @ b_np, repeats, lambda out: out)
    rates = {"xla": 2 * size**3 / xla / 1e12, "numpy": 2 * size**3 / blas / 1e12}
    return {"tflops": max(rates.values()), **{f"{k}_tflops": v for k, v in rates.items()}}


def model_madds_worker(model_name: str, size: int) -> dict:
    """Multiply-accumulates per image at the benchmark's size (at 224: the papers' MAdds),
    from XLA's cost analysis."""
    from ca_flax.models import create_model
    from ca_flax.models.summary import summarize

    return {"madds": summarize(create_model(model_name), (1, size, size, 3)).total_madds}


def flax_infer_worker(
    kind: str, model_name: str, batch: int, size: int, steps: int, device: str, dtype: str, depthwise_impl: str
) -> dict:
    """``flax_infer``: ``ca_flax.inference.make_predictor`` (on CPU with one device per
    core, micro-batches per backend); ``flax_infer_jit``: a plain ``jax.jit(model.apply)``
    (``flax_infer_jit_whole_batch``: with ``eval_micro_batch=None``)."""
    import functools

    import jax

    from ca_flax.inference import make_predictor, resolve_micro_batch, use_cpu_device_per_core

    predictor = kind == "flax_infer"
    if predictor and device == "cpu":
        use_cpu_device_per_core()  # before JAX's first computation
    import jax.numpy as jnp

    from ca_flax.models import create_model
    from ca_flax.training import parallel

    whole = {"eval_micro_batch": None} if kind == "flax_infer_jit_whole_batch" else {}
    model = create_model(model_name, dtype=jnp.dtype(dtype), depthwise_impl=depthwise_impl, **whole)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    # Any finite values do for timing; running the initializers would only add compile time.
    variables = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
    setup = {}
    if predictor:
        mesh = parallel.make_mesh()
        variables = jax.device_put(variables, parallel.replicated(mesh))
        images = jax.device_put(images, parallel.data_sharding(mesh))
        apply = make_predictor(model, mesh=mesh)
        setup = {"devices": jax.device_count(), "micro_batch": resolve_micro_batch("auto")}
    else:
        apply = jax.jit(functools.partial(model.apply, train=False))
    start = time.perf_counter()
    infer = apply.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    _, per_step = _timed_loop(lambda: infer(variables, images), steps, jax.block_until_ready)
    return _jax_device_peak({"images_per_sec": batch / per_step, "compile_s": compile_s, **setup,
                             "version": jax.__version__, "backend": jax.default_backend()}, infer)


def flax_train_step_worker(model_name: str, batch: int, size: int, steps: int, dtype: str, depthwise_impl: str) -> dict:
    """The trainer's own jitted step (same config, optimizer, state and steps per call) in a
    bare loop: what ``flax_trainer`` would reach if the loop around the step cost nothing."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ca_flax.data import synthetic
    from ca_flax.training.optim import create_optimizer, learning_rate_schedule
    from ca_flax.training.state import create_train_state
    from ca_flax.training.steps import train_steps
    from ca_flax.training.trainer import build_model, steps_per_call
    from configs import fake_data_benchmark

    config = fake_data_benchmark.get_config()
    config.model, config.batch_size, config.image_size, config.dtype = model_name, batch, size, dtype
    config.model_kwargs.depthwise_impl = depthwise_impl
    per_call = steps_per_call(config, config.num_train_steps)
    model = build_model(config, synthetic.NUM_CLASSES)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    gen = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.05 * gen.standard_normal(s.shape), s.dtype), shapes)
    tx = create_optimizer(config, learning_rate_schedule(config, 1000, 1000))
    state = create_train_state(model, variables, tx, jax.random.PRNGKey(1))
    data = next(synthetic.batches(image_size=size, global_batch_size=batch, seed=0))
    data = {k: jnp.asarray(np.stack([v] * per_call)) for k, v in data.items()}
    step_fn = jax.jit(functools.partial(train_steps, num_classes=synthetic.NUM_CLASSES), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def call():
        box[0], metrics = compiled(box[0], data)
        return metrics["loss"]

    calls = max(1, -(-steps // per_call))
    _, per_call_s = _timed_loop(call, calls, jax.block_until_ready)
    return _jax_device_peak({"images_per_sec": batch * per_call / per_call_s, "compile_s": compile_s,
                             "steps_per_call": per_call}, compiled)


def flax_trainer_run(
    model_name: str, batch: int, size: int, steps: int, workdir: Path, cache: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, Path]:
    """Starts train.py on the benchmark config; the caller waits (for peak memory)."""
    total = 8 + 8 * -(-steps // 8)
    command = [
        sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "fake_data_benchmark.py"),
        "--workdir", str(workdir), "--compilation_cache_dir", str(cache), f"--config.model={model_name}",
        f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}", f"--config.image_size={size}",
        # One warm-up call of 8 steps (compile and run; the trainer calls 8 steps at a time
        # on CPU), then at least --steps measured ones, all logged at the end.
        f"--config.num_train_steps={total}", f"--config.log_every_steps={total}",
    ]
    log = workdir.with_suffix(".log")
    proc = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return proc, log


# ----------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------


def _wait_with_peak(proc: subprocess.Popen, timeout: float | None) -> tuple[int, float, bool]:
    """(exit status, peak RSS in MiB, timed out) of a child, from wait4's rusage
    (kilobytes on Linux); a child still running after ``timeout`` seconds is killed."""
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if timer:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, killed.is_set()


def worker_environment(glibc_tunables: str | None) -> dict[str, str]:
    """The same allocator setting for every process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("GLIBC_TUNABLES", None)
    if glibc_tunables:
        env["GLIBC_TUNABLES"] = glibc_tunables
    return env


def _failure(name: str, status: int, timed_out: bool, args: argparse.Namespace, output: str) -> RuntimeError:
    reason = f"killed after --worker-timeout {args.worker_timeout:.0f} s" if timed_out else f"exit {status}"
    return RuntimeError(f"{name} failed ({reason}):\n{output[-3000:]}")


def run_worker(name: str, args: argparse.Namespace, env: dict[str, str] | None = None) -> dict:
    python = args.torch_python if name.startswith("torch") and args.torch_python else sys.executable
    command = [python, __file__, "--worker", name, "--model", args.model, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--steps", str(args.steps), "--device", args.device,
               "--dtype", args.dtype, "--depthwise-impl", args.depthwise_impl,
               "--torch-micro-batch", str(args.torch_micro_batch)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=env or worker_environment(args.glibc_tunables))
        status, peak, timed_out = _wait_with_peak(proc, args.worker_timeout)
        out.seek(0)
        text = out.read()
    if status != 0:
        raise _failure(name, status, timed_out, args, text)
    result = json.loads(text.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": peak}


def run_trainer(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    """``scratch``: one folder per repeat, whose compilation cache the repeat's two trainer
    runs share (``flax_trainer`` fills it, ``flax_trainer_cached`` hits it)."""
    scratch.mkdir(parents=True, exist_ok=True)
    cache = scratch / "jax_cache"
    workdir = scratch / name
    proc, log = flax_trainer_run(args.model, args.batch, args.image_size, args.steps, workdir, cache,
                                 worker_environment(args.glibc_tunables))
    status, peak, timed_out = _wait_with_peak(proc, args.worker_timeout)
    if status != 0:
        raise _failure(name, status, timed_out, args, log.read_text())
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rate = [m["images_per_sec"] for m in lines if "images_per_sec" in m][-1]
    compile_s = [m["train_step_compile_s"] for m in lines if "train_step_compile_s" in m][-1]
    return {"images_per_sec": rate, "compile_s": compile_s, "peak_rss_mib": peak}


def _peak_fraction(name: str, rate: float, madds: int | None, peak_tflops: float | None) -> str:
    """Model FLOP/s (2 FLOPs per MAdd; a training step ~3x the forward pass) over the
    measured matrix-product rate."""
    if not (madds and peak_tflops):
        return ""
    passes = 1 if "infer" in name else 3
    return f"{2 * madds * passes * rate / (peak_tflops * 1e12):.2%}"


def _spread(result: dict) -> str:
    """(max - min) / median of a measurement's runs, '-' for a single run."""
    rates = result.get("runs_images_per_sec", [])
    if len(rates) < 2:
        return "-"
    return f"{(max(rates) - min(rates)) / result['images_per_sec']:.0%}"


def _ratio_table(results: dict[str, dict], madds: int | None = None, peak_tflops: float | None = None) -> list[str]:
    """Text table; ratios are against the best PyTorch eager (train) or any (infer) config."""
    measured = {k: v for k, v in results.items() if "images_per_sec" in v}
    best = {}
    for kind in ("infer", "train"):
        torch_rates = {k: v["images_per_sec"] for k, v in measured.items()
                       if k.startswith(f"torch_{kind}") and k != MICROBATCH
                       and not (kind == "train" and k.endswith("compile"))}
        if torch_rates:
            best[kind] = max(torch_rates.items(), key=lambda kv: kv[1])
    device_memory = any("peak_device_mib" in r for r in measured.values())
    memory_header = f"{'device MiB':>11}" if device_memory else ""
    rows = [f"{'measurement':<32}{'img/s':>9}{'spread':>8}{'compile s':>11}{'peak MiB':>10}{memory_header}"
            + (f"{'of peak':>9}" if madds and peak_tflops else "") + "  ratio"]
    for name, r in results.items():
        if "images_per_sec" not in r:
            rows.append(f"{name:<32}  failed: {r.get('error', '?').splitlines()[0]}")
            continue
        kind = "infer" if "infer" in name else "train"
        ratio = ""
        if kind in best and name.startswith("flax"):
            ratio = f"{r['images_per_sec'] / best[kind][1]:.2f}x {best[kind][0]}"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        memory = f"{r['peak_device_mib']:>11.0f}" if "peak_device_mib" in r else f"{'-':>11}"
        memory = memory if device_memory else ""
        fraction = _peak_fraction(name, r["images_per_sec"], madds, peak_tflops)
        rows.append(f"{name:<32}{r['images_per_sec']:>9.2f}{_spread(r):>8}{compile_s:>11}{r['peak_rss_mib']:>10.0f}{memory}"
                    + (f"{fraction:>9}" if fraction else "") + f"  {ratio}")
    for name, r in measured.items():
        if r.get("executable_device_mib", float("inf")) < 0.95 * r.get("peak_device_mib", 0):
            rows.append(f"{name}: its executable needs {r['executable_device_mib']:.0f} of the {r['peak_device_mib']:.0f} "
                        "device MiB (XLA's memory analysis); the rest is cuDNN autotuning while compiling")
    if "images_per_sec" in results.get("flax_infer", {}) and "images_per_sec" in results.get(MICROBATCH, {}):
        ratio = results["flax_infer"]["images_per_sec"] / results[MICROBATCH]["images_per_sec"]
        rows.append(f"flax_infer against {MICROBATCH}: {ratio:.2f}x")
    if "images_per_sec" in results.get("flax_trainer", {}) and "images_per_sec" in results.get("flax_train_step", {}):
        loop = 1 - results["flax_trainer"]["images_per_sec"] / results["flax_train_step"]["images_per_sec"]
        rows.append(f"training loop overhead over the bare step: {loop:+.1%}")
    return rows


def median_result(runs: list[dict]) -> dict:
    """One measurement's runs as its median run (by images/s; the lower middle one for an
    even count), with every run's rate kept in ``runs_images_per_sec``. Failed runs are
    left out; all failed: the last error."""
    ok = sorted((r for r in runs if "images_per_sec" in r), key=lambda r: r["images_per_sec"])
    if not ok:
        return runs[-1]
    middle = dict(ok[(len(ok) - 1) // 2])
    middle["runs_images_per_sec"] = [r["images_per_sec"] for r in runs if "images_per_sec" in r]
    if len(ok) < len(runs):
        middle["failed_runs"] = len(runs) - len(ok)
    return middle


def _madds_and_peak(args: argparse.Namespace, report: dict) -> tuple[int | None, float | None]:
    """The model's MAdds and the machine's measured matrix-product rate (bfloat16 on a GPU,
    float32 on the CPU), for the table's fraction-of-peak column; None where they fail."""
    madds = peak = None
    kind = "gpu_matmul_peak" if args.device == "gpu" else "cpu_matmul_peak"
    try:
        # Counted on the CPU backend so that this process never holds the GPU.
        env = {**worker_environment(None), "JAX_PLATFORMS": "cpu"}
        report["madds"] = madds = run_worker("model_madds", args, env)["madds"]
        report[kind] = run_worker(kind, args)
        peak = report[kind]["tflops"]
        where = report[kind].get("device_name", _machine()["cpu"])
        rate = f"{peak:.0f} TFLOP/s" if peak >= 10 else f"{peak * 1e3:.0f} GFLOP/s"
        print(f"  {'bfloat16' if args.device == 'gpu' else 'float32'} matmul peak: {rate} on {where}; "
              f"{madds / 1e6:.1f}M MAdds per image", flush=True)
    except RuntimeError as e:
        print(f"  {kind}: {e}", flush=True)
    return madds, peak


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def _write_json(path: Path, report: dict) -> None:
    """Atomically: a reader never sees a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def _run_worker_mode(args: argparse.Namespace) -> None:
    if args.worker.startswith("torch"):
        result = torch_worker(args.worker, args.model, args.batch, args.image_size, args.steps, args.device,
                              args.dtype, args.torch_micro_batch)
    elif args.worker == "flax_train_step":
        result = flax_train_step_worker(args.model, args.batch, args.image_size, args.steps, args.dtype,
                                        args.depthwise_impl)
    elif args.worker.startswith("flax_infer"):
        result = flax_infer_worker(args.worker, args.model, args.batch, args.image_size, args.steps, args.device,
                                   args.dtype, args.depthwise_impl)
    elif args.worker == "gpu_matmul_peak":
        result = gpu_matmul_peak_worker()
    elif args.worker == "cpu_matmul_peak":
        result = cpu_matmul_peak_worker()
    else:
        result = model_madds_worker(args.model, args.image_size)
    print(json.dumps(result))


def _measurements(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    flax = FLAX_MEASUREMENTS if args.device == "cpu" else ["flax_infer", "flax_infer_jit", "flax_train_step"]
    torch_names = TORCH_MEASUREMENTS if args.device == "cpu" else [n for n in TORCH_MEASUREMENTS if n != MICROBATCH]
    names = torch_names + (["torch_train_compile"] if args.torch_compile_train else []) + flax
    if args.only:
        every = TORCH_MEASUREMENTS + ["torch_train_compile"] + flax
        unknown = set(args.only.split(",")) - set(every)
        if unknown:
            parser.error(f"unknown measurement(s) {sorted(unknown)} on {args.device}; choose from {every}")
        names = list(dict.fromkeys(args.only.split(",")))  # in the order given
    cached_first = "flax_trainer_cached" in names and (
        "flax_trainer" not in names or names.index("flax_trainer_cached") < names.index("flax_trainer"))
    if cached_first:
        parser.error("flax_trainer_cached reuses flax_trainer's compilation cache: measure flax_trainer first.")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2_ca",
                        help="the registered ca-flax model, timed against its PyTorch counterpart")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up ones")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every measurement (round robin); the table gives their median")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="computation dtype: bfloat16 is PyTorch AMP and ca-flax dtype=bfloat16")
    parser.add_argument("--depthwise-impl", default="auto", help="ca-flax depthwise implementation")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", default="", help="comma-separated subset of measurements, run in that order")
    parser.add_argument("--torch-compile-train", action="store_true", help="also time torch.compile training")
    parser.add_argument("--torch-micro-batch", type=int, default=4,
                        help=f"images per torch.compile call in {MICROBATCH} (default 4: fastest of 2, 4, 8 here)")
    parser.add_argument("--glibc-tunables", default=None,
                        help="GLIBC_TUNABLES for every process, e.g. glibc.malloc.hugetlb=1 (default: none)")
    parser.add_argument("--worker-timeout", type=float, default=None,
                        help="seconds before a measurement's process is killed (default: none)")
    parser.add_argument("--torch-python", default=None,
                        help="Python of another venv to run the PyTorch measurements in (e.g. one with the newest "
                             "torch); it needs torch and numpy only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _run_worker_mode(args)
        return
    names = _measurements(args, parser)

    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}.")

    print(f"{args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, {args.dtype} on {args.device}, "
          f"{args.steps} timed steps, median of {args.repeats} run(s); {_machine()['cpu']} ({os.cpu_count()} cores); "
          f"GLIBC_TUNABLES={args.glibc_tunables or '(unset)'}", flush=True)
    settings = {"model": args.model, "batch": args.batch, "image_size": args.image_size, "steps": args.steps,
                "repeats": args.repeats, "dtype": args.dtype, "device": args.device,
                "depthwise_impl": args.depthwise_impl, "glibc_tunables": args.glibc_tunables,
                "torch_python": args.torch_python}
    report = {"settings": settings, "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "results": {}}
    madds, peak_tflops = _madds_and_peak(args, report)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    scratch = Path(tempfile.mkdtemp(prefix="ca_flax_compare_"))
    failed = False
    try:
        for repeat in range(args.repeats):
            for name in names:
                try:
                    result = run_trainer(name, args, scratch / f"repeat{repeat}") if name.startswith("flax_trainer") \
                        else run_worker(name, args)
                    print(f"  [{repeat + 1}/{args.repeats}] {name}: {result['images_per_sec']:.2f} img/s", flush=True)
                except RuntimeError as e:
                    failed = True
                    result = {"error": str(e)}
                    print(f"  [{repeat + 1}/{args.repeats}] {e}", flush=True)
                runs[name].append(result)
                report["results"] = {n: median_result(r) for n, r in runs.items() if r}
                report["table"] = _ratio_table(report["results"], madds, peak_tflops)
                _write_json(args.out, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\n".join(report["table"]))
    print(f"Wrote {args.out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
