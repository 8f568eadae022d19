"""The command line of ``train.py``: flags, config overrides, --help, checks, then the trainer.

``train.py`` only checks that the ``train`` extra is installed and calls :func:`run`; the
command line is here so that it can be imported, tested and reused like the rest of
the library. Flag parsing (:func:`parse_flags`, what ``app.run`` calls) imports neither
JAX nor TensorFlow, so that a bad flag, config field or workdir fails in a fraction of
a second; :func:`main` imports the trainer once the flags are parsed.

The configs are the checkout's ``configs/`` (:data:`DEFAULT_CONFIG`): ``python train.py``
imports the ``ca_flax`` next to it, so that is the directory ``train.py`` is in.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

# TensorFlow (the input pipeline, imported by main) logs C++ banners at import; keep the
# console for training.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The checkout: train.py and configs/ are next to ca_flax/.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")

# Fields that take keys the config file does not list: any create_model option (the
# trainer checks them against the model's options, ca_flax.training.trainer.model_kwargs).
OPEN_FIELDS = ("model_kwargs",)
# Flags of before issue #16 and where their fields went.
MOVED_FIELDS = {"width_mult": "model_kwargs.width_mult", "model_overrides": "model_kwargs"}
HELP = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
HELPFULL = ("--helpfull", "-helpfull")

# What --help prints first (it was train.py's docstring).
USAGE = """Train and evaluate a ca-flax model.

    python train.py                                            # configs/default.py, offline
    python train.py --config=configs/imagenet_mbv2_ca.py:se --workdir=/runs/se --config.data_dir=...
    python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
    python train.py [--config=...] --help                      # these flags and every --config.FIELD

Rerunning the same command resumes from the workdir's latest checkpoint. A bad flag,
config field, workdir or dataset ends the run with one `error: ...` line and exit code 2.
"""

FLAGS = flags.FLAGS


class LoadedConfigParser(ConfigFileFlagParser):
    """The config flag's parser: hands back the config :func:`parse_flags` already loaded
    (and checked the overrides against) for ``spec``, instead of loading it again."""

    def __init__(self, spec: str, config: ml_collections.ConfigDict) -> None:
        super().__init__("config", lock_config=False)
        self.spec, self.config = spec, config

    def parse(self, path: str) -> ml_collections.ConfigDict:
        return self.config if path == self.spec else super().parse(path)


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str],
                 loaded: tuple[str, ml_collections.ConfigDict] | None = None) -> None:
    """train.py's flags; the config flag reads its ``--config.FIELD`` overrides from
    ``argv``, and with ``loaded`` (``(spec, config)``) takes that config for ``spec``."""
    # Overrides may add keys (model_kwargs only: check_override_names has vetted every
    # name), so the config is locked after parsing, not by the flag.
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Training configuration file[:argument]; set its fields with "
        "--config.FIELD=VALUE (--help lists them).", flag_values=flag_values, lock_config=False,
        accept_new_attributes=True, sys_argv=list(argv))
    if loaded is not None:  # the flag has loaded nothing yet when argv names --config (parse_flags sees to it)
        flag_values["config"].parser = LoadedConfigParser(*loaded)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events (default: "
                        "./workdirs/<config>).", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run without a "
                        "cluster manager.", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", flag_values=flag_values)
    flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache (default: "
                        "WORKDIR/.jax_cache).", flag_values=flag_values)


def fail(error: BaseException | str, code: int = 2) -> NoReturn:
    """Exits with the message as one `error: ...` line: it says what to fix, a traceback would bury it."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# -- flags ------------------------------------------------------------------------------


def flag_args(argv: Sequence[str]) -> list[str]:
    """The arguments absl reads as flags: those before a bare '--'."""
    argv = list(argv[1:])
    return argv[:argv.index("--")] if "--" in argv else argv


def config_spec(argv: Sequence[str]) -> str:
    """The last ``--config=PATH[:ARG]`` (or ``--config PATH[:ARG]``) of ``argv``, as absl
    takes it; DEFAULT_CONFIG without one."""
    args = flag_args(argv)
    specs = [arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
             for i, arg in enumerate(args) if re.match(r"--?config(=|$)", arg)]
    return specs[-1] if specs else DEFAULT_CONFIG


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config ``--config=spec`` names, loaded as the config flag loads it; one-line errors."""
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        names = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))
        raise FileNotFoundError(f"--config={spec}: no such config file {os.path.abspath(path)} "
                                f"(the repository's: {', '.join(names)}).")
    try:
        return ConfigFileFlagParser("config", lock_config=False).parse(spec)
    except (TypeError, ValueError) as error:  # get_config's own, with a traceback ml_collections added
        last = str(error).strip().splitlines()[-1]  # "ValueError: Unknown variant ..."
        raise ValueError(f"--config={spec}: {last.split(': ', 1)[-1]}") from None


def config_fields(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every field, nested ConfigDicts' fields included (not the dicts)."""
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from config_fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def override_names(argv: Sequence[str]) -> list[str]:
    """FIELD of every ``--config.FIELD[=VALUE]`` and ``--noconfig.FIELD`` in ``argv``."""
    return [m.group(1) for arg in flag_args(argv) if (m := re.match(r"--?(?:no)?config\.([^=]+)", arg))]


def check_override_names(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Refuses a ``--config.FIELD`` the config does not have (a typo), with the closest
    name; new keys are accepted under OPEN_FIELDS only."""
    names = [name for name, _ in config_fields(config)]
    known = set(names) | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    for arg in flag_args(argv):
        moved = re.match(r"(--?(?:no)?config\.)(%s)\b(.*)" % "|".join(MOVED_FIELDS), arg)
        if moved and moved.group(2) not in known:
            raise ValueError(f"{arg} was moved: write {moved.group(1)}{MOVED_FIELDS[moved.group(2)]}{moved.group(3)} "
                             "instead (every model option is a --config.model_kwargs.KEY=VALUE).")
    for name in override_names(argv):
        parent, _, key = name.rpartition(".")
        if name in known or (parent in OPEN_FIELDS and parent in known and "." not in key):
            continue
        raise ValueError(f"--config.{name}: no such config field{did_you_mean(name, names, '--config.')}; "
                         "`python train.py --help` lists them.")


def did_you_mean(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def help_text(flag_values: flags.FlagValues, full: bool, program: str) -> str:
    """Usage, ``program``'s flags (every module's with ``full``) and the config's fields with their values."""
    config, spec = flag_values.config, flag_values["config"].config_filename
    spec = os.path.relpath(spec) if spec == DEFAULT_CONFIG else spec
    flag_help = flag_values.get_help() if full else flag_values.module_help(program)
    fields = [f"  --config.{name}={command_line_value(value)}" for name, value in config_fields(config)]
    open_fields = [f"  --config.{name}.KEY=VALUE   (any other option of config.model: stage_repeats=1,1,2,3,2,2,1, "
                   f"attention_kwargs=\"{{'reduction': 16}}\", ...)" for name in OPEN_FIELDS if name in config]
    return "\n".join([
        USAGE.strip(), "", "flags:", flag_help, "",
        f"config fields of {spec} (overrides applied); set any with --config.FIELD=VALUE",
        "(tuples as 0.5,1.0; booleans as =true or =false; an empty value for unset):",
        *fields, *open_fields, "",
    ])


def command_line_value(value: Any) -> str:
    """``value`` as it is typed after ``--config.FIELD=``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """``app.run``'s flags parser: the flags of ``argv`` into ``flag_values``.

    A bad flag, config file or config field exits with one `error: ...` line and code 2;
    ``--help``/``--helpfull`` print the flags and the config's fields (the given config,
    overrides applied) and exit 0.
    """
    try:
        argv = flag_values.read_flags_from_files(list(argv), force_gnu=False)  # --flagfile's flags are vetted too
    except flags.Error as error:
        fail(error)
    asked = [arg for arg in flag_args(argv) if arg in HELP + HELPFULL]
    argv = [arg for arg in argv if arg not in asked]
    spec = config_spec(argv)
    if not any(re.match(r"--?config(=|$)", arg) for arg in flag_args(argv)):
        # Named explicitly, so that the flag does not load its default at definition.
        argv = [argv[0], f"--config={spec}", *argv[1:]]
    try:
        config = load_config(spec)  # the only time the config file is loaded
        check_override_names(config, argv)
        define_flags(flag_values, argv, loaded=(spec, config))
        rest = flag_values(argv)
    except (flags.Error, OSError, ValueError) as error:
        fail(error)
    credit_flags(flag_values, argv[0])
    flag_values.config.lock()  # No new fields from here on, as with lock_config=True.
    if asked:
        try:
            print(help_text(flag_values, any(arg in HELPFULL for arg in asked), argv[0]), flush=True)
        except BrokenPipeError:  # `train.py --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)
    if len(rest) > 1:
        fail(f"unexpected argument(s) {rest[1:]}: flags are --NAME=VALUE, the config --config=PATH.")
    return rest


def credit_flags(flag_values: flags.FlagValues, program: str) -> None:
    """Lists the flags defined here (train.py's and the ``--config.FIELD`` overrides) as
    ``program``'s, as absl lists a script's own flags: --help shows them under ``train.py:``
    and --helpfull first, not under this module's name."""
    for flag in flag_values.flags_by_module_dict().pop(__name__, []):
        flag_values.register_flag_by_module(program, flag)


def default_workdir(spec: str) -> str:
    """./workdirs/<config file name> for ``--config=spec``."""
    return os.path.join("workdirs", os.path.splitext(os.path.basename(spec.split(":")[0]))[0])


# -- checks before training -------------------------------------------------------------


def check_workdir(workdir: str) -> None:
    """Fails now, not after compiling, where ``workdir`` cannot be a writable directory.

    Writing is probed by creating and removing a directory: permission bits do not tell
    (root ignores them, a read-only mount does not show in them). Remote paths (gs://)
    are left to their filesystem.
    """
    if "://" in workdir:
        return
    path = Path(workdir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is under {existing}, a file"
        raise ValueError(f"--workdir={workdir} {what}, not a directory; give a directory (created if missing).")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_probe_", dir=existing))
    except OSError as error:
        raise ValueError(f"--workdir={workdir} is not writable: cannot create anything in {existing} "
                         f"({error.strerror}).") from None


def main(argv: list[str]) -> None:
    """Trains with the parsed flags: ``app.run``'s main, after :func:`parse_flags`.

    Checks the workdir, sets up the compilation cache and ``jax.distributed``, then runs
    ``train_and_evaluate``; a bad config, workdir or dataset exits with one `error: ...`
    line and code 2, a non-finite loss with code 3. ``argv`` is what the flags left: the
    program name only.
    """
    del argv  # parse_flags refused arguments that are not flags.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    try:
        check_workdir(workdir)
    except ValueError as error:
        fail(error)
    # Imported after flag parsing: JAX must see XLA_FLAGS and the distributed setup first.
    import jax

    from ca_flax.training import parallel
    from ca_flax.training.trainer import NonFiniteLossError, train_and_evaluate

    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir or os.path.join(workdir, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        train_and_evaluate(FLAGS.config, workdir)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    except NonFiniteLossError as error:
        fail(error, 3)
    print(f"Workdir: {os.path.abspath(workdir)} (metrics.jsonl, tensorboard/, checkpoints/)")


def run(argv: Sequence[str] | None = None) -> None:
    """train.py's command line on ``argv`` (default ``sys.argv``): parses the flags and trains.

    Exits as :func:`parse_flags` and :func:`main` say (0 after --help or a finished run).
    """
    app.run(main, argv=None if argv is None else list(argv), flags_parser=parse_flags)
