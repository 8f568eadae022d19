"""The training loop: resume, train, evaluate, checkpoint, stop cleanly.

``train_and_evaluate(config, workdir)`` is everything ``train.py`` runs. Invariants:

- The batch at step k and the dropout randomness at step k are functions of
  ``(config.seed, k)`` alone, and the state is checkpointed with its step, so a run
  killed at any moment and rerun ends bit-identical to an uninterrupted one (on CPU).
- No checkpoint is written from a state whose loss went non-finite: losses are checked
  before every save, and the run stops with an error naming the first bad step.
- SIGTERM (a preemption notice) and SIGINT (Ctrl-C) save the current step and return
  normally (train.py exits 0); a second Ctrl-C stops at once (exit 130) without saving.
- A workdir is only changed by the run that holds its lock, and a rerun that cannot
  continue it (another model or optimizer, every checkpoint unreadable) changes nothing
  (ca_flax/training/workdir.py, docs/workdir.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import functools
import gc
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ca_flax import data
from ca_flax.data import synthetic
from ca_flax.inference import predict_fn
from ca_flax.checkpoints import METADATA_FILE, abstract_variables, model_metadata, read_metadata, restore
from ca_flax.models import create_model
from ca_flax.models.registry import model_options
from ca_flax.training import parallel, workdir as workdir_guard
from ca_flax.training.checkpointing import BEST_METRIC, CheckpointManager, remove_unfinished
from ca_flax.training.metrics import MetricWriter, Throughput, console, format_eta
from ca_flax.training.optim import create_optimizer, learning_rate_schedule
from ca_flax.training.state import TrainState, create_train_state
from ca_flax.training.steps import eval_step, train_steps
from ca_flax.viz.training import TrainingPictures

# float64 is for exactness checks (tests compare device and process counts in it); it
# needs JAX_ENABLE_X64=1.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the step."""


# create_model arguments the trainer sets itself, and from what.
MODEL_ARGS_FROM_CONFIG = {"num_classes": "config.dataset (its number of classes)", "dtype": "config.dtype",
                          "param_dtype": "config.param_dtype"}
# Top-level fields of configs written before issue #16, now keys of config.model_kwargs.
MOVED_TO_MODEL_KWARGS = ("width_mult", "model_overrides")


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.model_kwargs`` as a plain dict, every key checked to be an option of
    ``config.model``: the one place they are validated (ValueError naming the options)."""
    kwargs = config.get("model_kwargs")
    kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs or {})
    options = [name for name in model_options(config.model) if name not in MODEL_ARGS_FROM_CONFIG]
    for key in kwargs:
        if key in MODEL_ARGS_FROM_CONFIG:
            raise ValueError(f"config.model_kwargs.{key}: set by {MODEL_ARGS_FROM_CONFIG[key]}, not here.")
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"config.model_kwargs.{key}: {config.model} has no option {key!r}{hint}; "
                             f"its options: {', '.join(options)}.")
    return kwargs


def check_moved_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses a config of before issue #16 (top-level ``width_mult`` or
    ``model_overrides``), saying what to write instead."""
    moved = [name for name in MOVED_TO_MODEL_KWARGS if name in config]
    if not moved:
        return
    settings = {"width_mult": config.width_mult} if "width_mult" in config else {}
    overrides = config.get("model_overrides")
    settings.update(overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides or {}))
    names = " and ".join(f"config.{name}" for name in moved)
    if not settings:
        raise ValueError(f"{names} {'was' if len(moved) == 1 else 'were'} moved: delete it; the model's settings "
                         "are config.model_kwargs (command line: --config.model_kwargs.KEY=VALUE).")
    write = "; ".join(f"config.model_kwargs.{key} = {value!r}" for key, value in settings.items())
    flags = " ".join(f"--config.model_kwargs.{key}={_flag_value(value)}" for key, value in settings.items())
    raise ValueError(f"{names} {'was' if len(moved) == 1 else 'were'} moved: write {write} (command line: {flags}).")


def _flag_value(value: Any) -> str:
    """``value`` as typed after ``--config.model_kwargs.KEY=`` in a shell."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, (int, float, str)):
        return shlex.quote(str(value))
    return shlex.quote(repr(value))


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """``create_model(config.model, **config.model_kwargs)`` with the dataset's number of
    classes and the config's dtypes (raises ValueError for an unknown name or bad option)."""
    param_dtype = config.get("param_dtype", "float32")
    for name, value in (("dtype", config.dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}.")
        if value == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(f"{name}='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment.")
    kwargs = model_kwargs(config)
    try:
        return create_model(config.model, num_classes=num_classes, dtype=DTYPES[config.dtype],
                            param_dtype=DTYPES[param_dtype], **kwargs)
    except (TypeError, ValueError) as error:  # the module's own checks of its settings
        raise ValueError(f"config.model_kwargs={kwargs!r}: {error}") from None


def plan_steps(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; ``num_train_steps > 0`` overrides epochs."""
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {num_train} training examples; use a smaller batch."
        )
    total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * steps_per_epoch)
    if total < 1:
        raise ValueError("Nothing to train: set num_epochs > 0 or num_train_steps > 0.")
    return steps_per_epoch, total


# steps_per_call=0 ('auto'): at most this many train steps per compiled call, by backend.
# CPU: several steps per call are faster, mostly by reusing XLA's temporary buffers
# (far fewer page faults per step; docs/performance.md). Accelerators keep one step per
# call (not measured there).
_AUTO_STEPS_PER_CALL = {"cpu": 8}


def steps_per_call(config: ml_collections.ConfigDict, total_steps: int, start_step: int = 0,
                   backend: str | None = None) -> int:
    """How many train steps one compiled call runs (:func:`~ca_flax.training.steps.train_steps`).

    Logging, evaluation and checkpoints happen between calls, so the count must divide
    ``log_every_steps``, ``eval_every_steps``, ``checkpoint_every_steps``, the total
    step count and the step a run resumes from. ``config.steps_per_call = 0`` (the
    default) picks the largest count that does, up to 8 on CPU and 1 elsewhere.
    """
    requested = int(config.get("steps_per_call", 0))
    if requested < 0:
        raise ValueError(f"steps_per_call must be 0 (automatic) or positive, got {requested}.")
    must_divide = {"log_every_steps": int(config.log_every_steps), "eval_every_steps": int(config.eval_every_steps),
                   "checkpoint_every_steps": int(config.checkpoint_every_steps), "the total step count": total_steps}
    if start_step:
        must_divide["the step resumed from"] = start_step
    if requested == 0:
        cap = _AUTO_STEPS_PER_CALL.get(backend or jax.default_backend(), 1)
        return max(k for k in range(1, cap + 1) if all(v % k == 0 for v in must_divide.values()))
    bad = {name: value for name, value in must_divide.items() if value % requested}
    if bad:
        raise ValueError(
            f"steps_per_call={requested} must divide " + ", ".join(f"{n} ({v})" for n, v in bad.items())
            + "; choose a common divisor, or 0 to let the trainer pick one."
        )
    return requested


_INT, _REAL, _BOOL, _TEXT = (int,), (int, float), (bool,), (str,)
_positive = (_INT, lambda v: v >= 1, "a positive integer")
# The type, test and allowed values (in words) of every field of configs/default.py but
# dtype, param_dtype and model_kwargs (build_model checks those) and augment (its class
# checks it). Fields read with config.get may be absent.
_FIELDS: dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]] = {
    "model": (_TEXT, bool, "a model name"),
    "dataset": (_TEXT, bool, "a dataset name"),
    "data_dir": ((str, type(None)), lambda v: True, "a directory or None"),
    "image_size": _positive,
    "optimizer": (_TEXT, bool, "an optimizer name"),
    "batch_size": _positive,
    "eval_batch_size": _positive,
    "num_epochs": (_REAL, lambda v: v >= 0, "a number >= 0"),
    "num_train_steps": (_INT, lambda v: True, "an integer (> 0 overrides num_epochs)"),
    "learning_rate": (_REAL, lambda v: v > 0, "a number > 0"),
    "momentum": (_REAL, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "nesterov": (_BOOL, lambda v: True, "True or False"),
    "weight_decay": (_REAL, lambda v: v >= 0, "a number >= 0"),
    "weight_decay_exclude_norm_and_bias": (_BOOL, lambda v: True, "True or False"),
    "warmup_epochs": (_REAL, lambda v: v >= 0, "a number >= 0"),
    "label_smoothing": (_REAL, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "grad_clip_norm": (_REAL, lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "seed": (_INT, lambda v: -2**63 <= v < 2**63, "an integer in [-2**63, 2**63)"),
    "log_every_steps": _positive,
    "eval_every_steps": _positive,
    "checkpoint_every_steps": _positive,
    "steps_per_call": (_INT, lambda v: v >= 0, "0 (automatic) or positive"),
    "keep_checkpoints": _positive,
    "async_checkpoints": (_BOOL, lambda v: True, "True or False"),
    "init_from": ((str, type(None)), lambda v: True, "a checkpoint directory, or '' for none"),
}
_OPTIONAL_FIELDS = {"nesterov", "weight_decay_exclude_norm_and_bias", "grad_clip_norm", "steps_per_call",
                    "async_checkpoints"}
# The settings that shape the optimizer state, saved with every checkpoint so that a
# resume the state does not fit can name what changed.
_OPTIMIZER_FIELDS = ("optimizer", "momentum", "nesterov", "weight_decay", "weight_decay_exclude_norm_and_bias",
                     "grad_clip_norm")


def check_fields(config: ml_collections.ConfigDict) -> None:
    """The type and range of every field (:data:`_FIELDS`); the error names the field,
    the value and what is allowed."""
    for name, (types, ok, allowed) in _FIELDS.items():
        if name not in config:
            if name in _OPTIONAL_FIELDS:
                continue
            raise ValueError(f"The config has no {name} ({allowed}); see configs/default.py.")
        value = config[name]
        numeric = types in (_INT, _REAL)
        if (not isinstance(value, types) or (numeric and isinstance(value, bool))
                or (isinstance(value, float) and not math.isfinite(value)) or not ok(value)):
            raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def validate_config(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """Every check that can fail before anything compiles: returns (dataset info, model)."""
    check_moved_fields(config)
    check_fields(config)
    parallel.check_batch_divisible(config.batch_size)
    parallel.check_batch_divisible(config.eval_batch_size, "eval_batch_size")
    try:
        _augment(config)
    except TypeError as error:  # an unknown augment key
        raise ValueError(f"augment={dict(config.augment)!r}: {error}") from None
    info = synthetic.info() if config.dataset == synthetic.NAME else data.validate_dataset(config.dataset, config.data_dir)
    model = build_model(config, info.num_classes)
    steps_per_epoch, total_steps = plan_steps(config, info.num_train)
    steps_per_call(config, total_steps)
    create_optimizer(config, learning_rate_schedule(config, steps_per_epoch, total_steps))
    if config.init_from:
        read_metadata(config.init_from)  # a model checkpoint or a training workdir
    return info, model


def initial_variables(model: Any, config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
    """Fresh variables, or ``init_from``'s with the head re-initialized when the
    number of classes differs (fine-tuning converted PyTorch weights)."""
    shape = (1, config.image_size, config.image_size, 3)
    fresh = jax.jit(functools.partial(model.init, train=False))(rng, jnp.zeros(shape, jnp.float32))
    if not config.init_from:
        return fresh
    source_model, source, _ = restore(config.init_from)
    merged = dict(fresh)
    kept, reinitialized = 0, []
    for collection in ("params", "batch_stats"):
        flat_fresh = traverse_util.flatten_dict(dict(fresh.get(collection, {})), sep="/")
        flat_source = traverse_util.flatten_dict(dict(source.get(collection, {})), sep="/")
        out = {}
        for key, value in flat_fresh.items():
            src = flat_source.get(key)
            if src is not None and src.shape == value.shape:
                out[key] = jnp.asarray(src, value.dtype)
                kept += 1
            else:
                out[key] = value
                reinitialized.append(f"{collection}/{key}")
        merged[collection] = traverse_util.unflatten_dict(out, sep="/")
    if any(not k.startswith(("params/classifier", "batch_stats/classifier")) for k in reinitialized):
        raise ValueError(
            f"init_from={config.init_from!r} does not fit model {config.model!r} with model_kwargs "
            f"{model_kwargs(config)}: {len(reinitialized)} variables differ (first: {reinitialized[:3]}). Use the "
            "same model and settings."
        )
    note = f" (classifier re-initialized: {source_model.num_classes} -> {model.num_classes} classes)" if reinitialized else ""
    console(f"Initialized {kept} variables from {config.init_from}{note}.")
    return merged


def _state_shapes(model: Any, tx: Any, rng: jax.Array, sharding: Any) -> TrainState:
    """The train state's structure, shapes, dtypes and ``sharding``, computed abstractly
    (no compile): what a resume restores into before anything else is done."""
    shapes = jax.eval_shape(lambda v, r: create_train_state(model, v, tx, r), abstract_variables(model), rng)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def write_model_json(workdir: Path, model: Any, config: ml_collections.ConfigDict) -> None:
    """``WORKDIR/model.json``: the model checkpoint format's metadata, so a training
    workdir loads like a converted checkpoint (``ca_flax.checkpoints.restore``)."""
    if jax.process_index() != 0:
        return
    metadata = model_metadata(model, {"trained_by": "ca_flax train.py", "model": config.model,
                                      "dataset": config.dataset, "image_size": config.image_size})
    tmp = workdir / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    tmp.replace(workdir / METADATA_FILE)


def _say(line: str) -> None:
    """A console line from a signal handler: one unbuffered write, since the handler may
    run while the main thread is inside ``print`` (a reentrant print raises)."""
    if jax.process_index() == 0:
        os.write(sys.stdout.fileno(), (line + "\n").encode())


class _Preemption:
    """Turns SIGTERM (a preemption notice) and SIGINT (Ctrl-C) into a flag the loop checks
    between steps. A second Ctrl-C exits at once with 130 (the shell's code for Ctrl-C),
    saving nothing: the rerun resumes from the last finished checkpoint and removes the
    unfinished one; the kernel releases the workdir's lock."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.name = "A stop signal to another process"  # what the message names
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Preemption":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: no signal handling
            self._previous = {}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            _say("Second Ctrl-C: stopping now without saving; rerun to resume from the last checkpoint.")
            os._exit(128 + signal.SIGINT)
        if signum == signal.SIGINT and not self.requested:
            _say("Ctrl-C: saving after the current step; Ctrl-C again stops without saving.")
        if not self.requested:
            self.requested, self.name = True, signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def agreed(self) -> bool:
        """True when any process was asked to stop (all processes then stop together)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def evaluate(
    state: TrainState, eval_fn: Any, batches: Iterator[dict[str, np.ndarray]], sharding: Any
) -> dict[str, float]:
    """Exact evaluation: sums over every (unmasked) example, then one division."""
    totals = None
    for local in batches:
        sums = eval_fn(state, parallel.global_batch(local, sharding))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("The evaluation split is empty.")
    totals = parallel.fetch(totals)
    count = float(totals["count"])
    return {
        "eval_loss": float(totals["loss_sum"]) / count,
        "eval_top1": float(totals["top1_sum"]) / count,
        "eval_top5": float(totals["top5_sum"]) / count,
        "eval_examples": int(count),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Returns the last evaluation's metrics. Raises ValueError, before compiling and
    without changing the workdir, for invalid configs and for workdirs it must not
    continue (another model's or optimizer's, held by another run, every checkpoint
    unreadable), and :class:`NonFiniteLossError` when the loss diverges. A workdir that
    already holds the last step is left as it is (its last evaluation is returned).
    """
    workdir = Path(workdir)
    info, model = validate_config(config)
    workdir_guard.check_model(workdir, model, config)
    # Process 0 writes the workdir's files (the others only their share of each checkpoint).
    with workdir_guard.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_in_held_workdir(config, workdir, info, model)


def _train_in_held_workdir(config: ml_collections.ConfigDict, workdir: Path, info: Any, model: Any) -> dict[str, float]:
    """The rest of :func:`train_and_evaluate`, once this process holds the workdir (or is not process 0)."""
    steps_per_epoch, total_steps = plan_steps(config, info.num_train)
    mesh = parallel.make_mesh()
    batch_sharding, replicated = parallel.data_sharding(mesh), parallel.replicated(mesh)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = create_optimizer(config, schedule)

    rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))
    settings = {name: config[name] for name in _OPTIMIZER_FIELDS if name in config}
    checkpoints = CheckpointManager(workdir, keep=config.keep_checkpoints, async_save=config.get("async_checkpoints", True))
    try:
        resumed = checkpoints.restore_latest_intact(_state_shapes(model, tx, rng_train, replicated), settings)
    except BaseException:
        checkpoints.close()
        raise
    start_step = 0
    last_eval: dict[str, float] = {}
    if resumed is not None:
        state, meta, set_aside = resumed
        for step, reason, path in set_aside:
            console(f"warning: checkpoint step {step} is unreadable ({reason}); moved it to {path}.")
        start_step = int(meta["step"])
        last_eval = dict(meta.get("metrics", {}))
        if start_step >= total_steps:
            checkpoints.close()
            console(
                f"{workdir} already holds step {start_step}, "
                + ("this run's last" if start_step == total_steps else f"past this run's {total_steps} steps")
                + ": nothing to train. Use another --workdir or raise num_train_steps (or num_epochs)."
            )
            return last_eval
        console(f"Resumed from {checkpoints.directory / str(start_step)} (step {start_step} of {total_steps}).")
    # The run continues this workdir: from here on it changes it.
    if jax.process_index() == 0:
        for name in remove_unfinished(checkpoints.directory):
            console(f"Removed {name}: a checkpoint an earlier run did not finish saving.")
    write_model_json(workdir, model, config)
    if resumed is None:
        variables = initial_variables(model, config, rng_init)
        state = jax.device_put(create_train_state(model, variables, tx, rng_train), replicated)
    writer = MetricWriter(workdir, resume_step=start_step)
    pictures = TrainingPictures(config, model, workdir, writer, steps_per_epoch)  # never raises (ca_flax/viz)

    per_call = steps_per_call(config, total_steps, start_step)
    stacked_sharding = parallel.stacked_data_sharding(mesh)
    train_fn = jax.jit(
        functools.partial(train_steps, num_classes=info.num_classes, label_smoothing=config.label_smoothing),
        in_shardings=(replicated, stacked_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, num_classes=info.num_classes, predict=predict_fn(model, mesh=mesh)),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )
    train_batches = _train_batches(config, start_step)
    eval_batches = functools.partial(_eval_batches, config)

    def meta_for(step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "data_position": step, "epoch": step / steps_per_epoch, "metrics": metrics,
                "settings": settings}

    pending_losses: list[tuple[int, jax.Array]] = []  # (first step, its call's losses)

    def check_losses() -> None:
        """Fetches the losses since the last check (one transfer) and stops at the first
        non-finite one, before anything from that state reaches a checkpoint."""
        if not pending_losses:
            return
        values = parallel.fetch(jnp.concatenate([losses for _, losses in pending_losses]))
        steps = [first + i for first, losses in pending_losses for i in range(losses.shape[0])]
        for step, value in zip(steps, values):
            if not np.isfinite(value):
                checkpoints.wait()
                raise NonFiniteLossError(
                    f"Loss became {value} at step {step}; stopping. "
                    + (f"The last good checkpoint (step {checkpoints.latest_step()}) is kept in {checkpoints.directory}; "
                       if checkpoints.latest_step() is not None else "No checkpoint had been saved yet; ")
                    + "lower the learning rate or check the input data, then rerun."
                )
        pending_losses.clear()

    console(
        f"Training {config.model} ({_describe_kwargs(config)}) on {config.dataset}: {info.num_train} examples, "
        f"{info.num_classes} classes, global batch {config.batch_size} over {jax.device_count()} devices in "
        f"{jax.process_count()} process(es), {total_steps} steps ({total_steps / steps_per_epoch:.1f} epochs), "
        f"{per_call} per compiled call."
    )
    throughput = Throughput(config.batch_size)
    train_metrics: list[dict[str, jax.Array]] = []
    run_start, steady_start, steady_steps = time.perf_counter(), None, 0
    step = start_step
    compiled_train_fn = None
    with _Preemption() as preemption:
        while step < total_steps:
            batches = parallel.global_batch(_next_batches(train_batches, per_call), stacked_sharding)
            if compiled_train_fn is None:
                compiled_train_fn, compile_s = _compile(train_fn, state, batches)
                writer.write(step, {"train_step_compile_s": compile_s})
                console(f"Compiled the train step in {compile_s:.1f} s.")
            state, metrics = compiled_train_fn(state, batches)
            pending_losses.append((step + 1, metrics["loss"]))
            step += per_call
            train_metrics.append(metrics)
            throughput.step(per_call)
            if steady_start is None:
                jax.block_until_ready(metrics["loss"])  # compile and first call done
                steady_start, steady_steps = time.perf_counter(), 0
                throughput.start()
            else:
                steady_steps += per_call

            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last:
                check_losses()
                means = {k: float(np.mean(v)) for k, v in parallel.fetch(
                    jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *train_metrics)).items()}
                train_metrics.clear()
                rate = throughput.report()
                values = {"train_loss": means["loss"], "train_top1": means["top1"],
                          "train_grad_norm": means["grad_norm"], "learning_rate": float(schedule(step - 1))}
                if rate is not None:
                    values["images_per_sec"] = rate
                writer.write(step, values)
                elapsed = time.perf_counter() - (steady_start or run_start)
                eta = elapsed / max(steady_steps, 1) * (total_steps - step) if steady_steps else float("nan")
                console(
                    f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss {means['loss']:.4f} "
                    f"top1 {means['top1']:.3f} lr {values['learning_rate']:.5f} "
                    + (f"{rate:.1f} img/s " if rate else "") + (f"eta {format_eta(eta)}" if steady_steps else "")
                )

            evaluated = False
            if step % config.eval_every_steps == 0 or is_last:
                check_losses()
                last_eval = evaluate(state, eval_fn, eval_batches(), batch_sharding)
                writer.write(step, {k: v for k, v in last_eval.items() if k != "eval_examples"})
                console(
                    f"eval at step {step}: top1 {last_eval['eval_top1']:.4f} top5 {last_eval['eval_top5']:.4f} "
                    f"loss {last_eval['eval_loss']:.4f} ({last_eval['eval_examples']} examples)"
                )
                pictures.on_evaluation(step, state)
                evaluated = True
                throughput.start()  # evaluation time is not training throughput

            preempted = preemption.agreed()
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                check_losses()
                metrics_for_ranking = {BEST_METRIC: last_eval[BEST_METRIC]} if evaluated else None
                checkpoints.save(state, meta_for(step, last_eval if evaluated else {}), metrics_for_ranking)
            if preempted:
                checkpoints.wait()
                console(f"{preemption.name} received: saved step {step} to {checkpoints.directory}; rerun to resume.")
                break
        checkpoints.wait()  # still under the handlers: a Ctrl-C now does not cut the last save short

    checkpoints.close()
    pictures.on_end()
    writer.close()
    if step >= total_steps:
        console(f"Done: {total_steps} steps in {time.perf_counter() - run_start:.0f} s; workdir {workdir.absolute()}")
    return last_eval


def _describe_kwargs(config: ml_collections.ConfigDict) -> str:
    """"width_mult=0.35, dropout_rate=0.1" for the console."""
    return ", ".join(f"{key}={value}" for key, value in model_kwargs(config).items()) or "its defaults"


def _compile(jitted: Any, *args: Any) -> tuple[Any, float]:
    """Ahead-of-time compiles ``jitted`` for ``args``; returns it and the seconds taken
    (a hit in the persistent compilation cache makes this fast).

    Python's cyclic garbage collector is paused meanwhile: tracing a train step makes
    millions of short-lived objects, and the collections they trigger took a fifth of
    MobileNetV2+CA's trace time (1.7 -> 1.3 s)."""
    start = time.perf_counter()
    collecting = gc.isenabled()
    gc.disable()
    try:
        compiled = jitted.lower(*args).compile()
    finally:
        if collecting:
            gc.enable()
    _release_free_heap()
    return compiled, time.perf_counter() - start


def _release_free_heap() -> None:
    """Hands the heap memory that compiling freed back to the operating system.

    XLA's compiler allocates hundreds of MB in small pieces; freed, they stay in glibc's
    heap, where the train step's large buffers (separate mappings) cannot reuse them, so
    they added to the run's peak resident memory. ``malloc_trim`` returns them; it
    changes no allocator setting. A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
    """``np.empty`` on an ``alignment``-byte boundary: JAX's CPU backend then uses the
    array's memory as the device buffer instead of copying it (numpy's own large
    allocations sit 16 bytes past a page boundary)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset:offset + size].view(dtype).reshape(shape)


def _next_batches(batches: Iterator[dict[str, np.ndarray]], count: int) -> dict[str, np.ndarray]:
    """The next ``count`` host batches stacked on a new leading axis (one compiled call's
    worth), each copied into place as it comes, so only one extra batch is ever held."""
    first = next(batches)
    stacked = {key: _aligned_empty((count, *value.shape), value.dtype) for key, value in first.items()}
    for i in range(count):
        batch = first if i == 0 else next(batches)
        for key, value in batch.items():
            stacked[key][i] = value
        first = batch = None
    return stacked


def _augment(config: ml_collections.ConfigDict) -> Any:
    """The config's augmentation, or the dataset's default (``data.default_augment``)."""
    aug = config.get("augment", None)
    return data.AugmentConfig(**dict(aug)) if aug else None


def _train_batches(config: ml_collections.ConfigDict, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if config.dataset == synthetic.NAME:
        return synthetic.batches(image_size=config.image_size, global_batch_size=config.batch_size, seed=config.seed,
                                 **where)
    return data.train_batches(
        config.dataset, data_dir=config.data_dir, image_size=config.image_size, global_batch_size=config.batch_size,
        seed=config.seed, start_step=start_step, augment=_augment(config), **where,
    )


def _eval_batches(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if config.dataset == synthetic.NAME:  # one batch: a speed benchmark has nothing to measure here
        return iter([next(synthetic.batches(image_size=config.image_size, global_batch_size=config.eval_batch_size,
                                            seed=config.seed, mask=True, **where))])
    return data.eval_batches(
        config.dataset, data_dir=config.data_dir, image_size=config.image_size,
        global_batch_size=config.eval_batch_size, **where,
    )
