"""The main job, as a newcomer runs it: ``python train.py`` over several seeds.

Each run is ``train.py`` with the default config in a process of its own, in a fresh
workdir and with a fresh compilation cache (as on a fresh clone), so wall times include
compiling. Seeds 0-4 run with the native CPU kernels, and seed 0 once more with
``CA_FLAX_NATIVE=0`` (XLA only: the other numerics path). Per run it prints held-out
top-1, the final train loss, the wall time and training steps per second.

    python benchmarks/default_run.py                        # seeds 0-4, and 0 without native
    python benchmarks/default_run.py --seeds 0 1 --json out.json -- --config.learning_rate=0.2

Arguments after ``--`` go to every ``train.py`` run. Not a test: the suite runs one
seed of the default config end to end (tests/test_default_run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_metrics(workdir: Path) -> dict[str, float]:
    """Held-out top-1 at the last evaluation, the last logged train loss, the total step
    count and the steady training rate (images/s, mean of the logged rates)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_top1" in r]
    trains = [r for r in rows if "train_loss" in r]
    rates = [r["images_per_sec"] for r in trains if "images_per_sec" in r]
    return {
        "eval_top1": evals[-1]["eval_top1"] if evals else float("nan"),
        "train_loss": trains[-1]["train_loss"] if trains else float("nan"),
        "steps": trains[-1]["step"] if trains else 0,
        "images_per_sec": sum(rates) / len(rates) if rates else float("nan"),
        "compile_s": next((r["train_step_compile_s"] for r in rows if "train_step_compile_s" in r), float("nan")),
    }


def run_once(seed: int, native: bool, extra: list[str], root: Path) -> dict[str, object]:
    """One ``python train.py`` in a fresh workdir; its metrics, exit code and wall time."""
    workdir = root / f"seed{seed}{'' if native else '_xla'}"
    env = dict(os.environ)
    if not native:
        env["CA_FLAX_NATIVE"] = "0"
    command = [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", f"--config.seed={seed}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result: dict[str, object] = {"seed": seed, "native": native, "exit_code": proc.returncode, "wall_s": wall}
    if (workdir / "metrics.jsonl").exists():
        metrics = read_metrics(workdir)
        result.update(metrics)
        result["steps_per_s"] = metrics["steps"] / wall if wall else float("nan")
    if proc.returncode:
        result["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return result


def format_row(r: dict[str, object]) -> str:
    path = "native" if r["native"] else "xla"
    if "eval_top1" not in r:
        return f"{r['seed']:>4} {path:>6}  failed (exit {r['exit_code']}): {r.get('error', '')}"
    line = (f"{r['seed']:>4} {path:>6} {r['eval_top1']:>8.4f} {r['train_loss']:>10.4f} {r['wall_s']:>7.1f} "
            f"{r['steps_per_s']:>7.2f} {r['images_per_sec']:>8.1f} {r['compile_s']:>9.1f}")
    return line + (f"  exit {r['exit_code']}: {r.get('error', '')}" if r["exit_code"] else "")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--xla-seeds", type=int, nargs="*", default=[0], help="seeds also run with CA_FLAX_NATIVE=0")
    parser.add_argument("--json", help="write the rows here as well")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    print(f"{'seed':>4} {'path':>6} {'top1':>8} {'loss':>10} {'wall_s':>7} {'steps/s':>7} {'img/s':>8} "
          f"{'compile_s':>9}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ca_flax_default_run_") as tmp:
        plan = [(s, True) for s in args.seeds] + [(s, False) for s in args.xla_seeds]
        for seed, native in plan:
            rows.append(run_once(seed, native, extra, Path(tmp)))
            print(format_row(rows[-1]), flush=True)
    learned = [r for r in rows if r.get("eval_top1", 0) >= 0.97 and r["exit_code"] == 0]
    print(f"{len(learned)}/{len(rows)} runs reached held-out top-1 >= 0.97; "
          f"slowest {max(r['wall_s'] for r in rows):.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps({"extra_args": extra, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
