"""Measure the full built-in rule pack on a synthetic run of one million steps.

The run is written with pyarrow in the recorder's format: a noisy decaying loss, a
warmup-then-cosine schedule with a warm restart, a resume halfway with fresh optimizer
state, clipping, 20 user scalars, per-parameter statistics every 100 steps for 50
parameters, two task probes every 100 steps and per-class metrics every 1,000 steps.
The analysis runs in a child process, `runlens analyze RUN --format json`, so its wall
time and peak resident memory are measured alone; each rule is also timed by itself.

    python benchmarks/analyzer_speed.py [--steps 1000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from runlens import format as run_format
from runlens.analyze import Run, evaluate, load_rules

PARAMS = 50
ROWS_PER_PART = 100_000


def write_table(run_dir: Path, table: str, columns: dict[str, np.ndarray], segment: int) -> None:
    """Write `columns` as parts of ROWS_PER_PART rows, as the recorder's flushes would."""
    folder = run_dir / table / run_format.rank_folder(0)
    folder.mkdir(parents=True, exist_ok=True)
    whole = pa.table(columns)
    for sequence, start in enumerate(range(0, whole.num_rows, ROWS_PER_PART)):
        part = whole.slice(start, ROWS_PER_PART)
        pq.write_table(part, folder / run_format.part_name(segment, sequence))


def learning_rate(steps: np.ndarray, total: int) -> np.ndarray:
    warmup, peak = 2_000, 3e-4
    restart = total // 4 * 3
    progress = np.where(steps < restart, steps / restart, (steps - restart) / (total - restart))
    cosine = 0.5 * peak * (1 + np.cos(math.pi * progress))
    return np.where(steps < warmup, peak * (steps + 1) / warmup, cosine)


def synthesize(run_dir: Path, total: int) -> None:
    random = np.random.default_rng(0)
    steps = np.arange(total, dtype=np.int64)
    segment = (steps >= total // 2).astype(np.int32)
    for part_segment in (0, 1):
        mask = segment == part_segment
        count = int(mask.sum())
        loss = 2.0 * np.exp(-steps[mask] / (total / 5)) + 0.3 + random.gamma(2, 0.05, count)
        grad_norm = random.lognormal(0, 0.4, count)
        scalars = {
            "step": steps[mask], "segment": segment[mask], "rank": np.zeros(count, np.int32),
            "time": 1.7e9 + steps[mask] * 0.1, "loss": loss, "grad_norm": grad_norm,
            "clip_total_norm": grad_norm * 1.1, "clip_max_norm": np.full(count, 1.0),
            "step_skipped": np.zeros(count, bool),
            "nonfinite_loss": np.zeros(count, np.int64),
            "nonfinite_grad_tensors": np.zeros(count, np.int64),
            "optimizer_state_tensors": np.where(steps[mask] % 100 == 0, 150, -1),
        }
        scalars["optimizer_state_tensors"] = pa.array(
            scalars["optimizer_state_tensors"], mask=scalars["optimizer_state_tensors"] < 0)
        if part_segment == 1:
            scalars["optimizer_state_tensors"] = pa.array(
                np.where(steps[mask] == total // 2, 0, 150),
                mask=(steps[mask] % 100 != 0) & (steps[mask] != total // 2))
        for index in range(20):
            scalars[f"user_metric_{index}"] = random.normal(0, 1, count)
        write_table(run_dir, "scalars", scalars, part_segment)
        write_table(run_dir, "param_groups", {
            "step": steps[mask], "segment": segment[mask], "rank": np.zeros(count, np.int32),
            "group": np.zeros(count, np.int32), "lr": learning_rate(steps[mask], total),
            "weight_decay": np.full(count, 0.01)}, part_segment)
    stats_steps = steps[::100]
    write_table(run_dir, "params", synthesize_params(stats_steps, total, random), 0)
    write_table(run_dir, "tasks", synthesize_tasks(stats_steps, random), 0)
    write_table(run_dir, "task_pairs", synthesize_task_pairs(stats_steps, random), 0)
    write_table(run_dir, "classes", synthesize_classes(steps[999::1000], random), 0)
    meta = {"format_version": run_format.FORMAT_VERSION, "runlens_version": "benchmark",
            "params": [{"name": f"layer{i}.weight", "kind": "weight"} for i in range(PARAMS)],
            "segments": [{"segment": 0, "start_step": 0},
                         {"segment": 1, "start_step": total // 2}]}
    (run_dir / run_format.RUN_FILE).write_text(json.dumps(meta))


def synthesize_params(stats_steps: np.ndarray, total: int, random) -> dict[str, np.ndarray]:
    step = np.repeat(stats_steps, PARAMS)
    count = len(step)
    state_step = np.where(step < total // 2, step + 1, step - total // 2 + 1).astype(float)
    return {"step": step, "segment": (step >= total // 2).astype(np.int32),
            "rank": np.zeros(count, np.int32),
            "param": np.tile([f"layer{i}.weight" for i in range(PARAMS)], len(stats_steps)),
            "grad_norm": random.lognormal(-2, 0.3, count),
            "param_norm": random.lognormal(2, 0.1, count),
            "update_norm": random.lognormal(-5, 0.3, count), "state_step": state_step,
            "exp_avg_norm": random.lognormal(-3, 0.3, count),
            "exp_avg_sq_norm": random.lognormal(-6, 0.3, count),
            "state_matches_param": np.ones(count, bool)}


def synthesize_tasks(stats_steps: np.ndarray, random) -> dict[str, np.ndarray]:
    step = np.repeat(stats_steps, 2)
    count = len(step)
    return {"step": step, "segment": np.zeros(count, np.int32),
            "rank": np.zeros(count, np.int32),
            "task": np.tile(["detection", "depth"], len(stats_steps)),
            "grad_norm": random.lognormal(0, 0.3, count)}


def synthesize_task_pairs(stats_steps: np.ndarray, random) -> dict[str, np.ndarray]:
    step = np.repeat(stats_steps, 2)
    count = len(step)
    cosine = np.repeat(random.normal(0.05, 0.05, len(stats_steps)), 2)
    return {"step": step, "segment": np.zeros(count, np.int32),
            "rank": np.zeros(count, np.int32),
            "task": np.tile(["detection", "depth"], len(stats_steps)),
            "other_task": np.tile(["depth", "detection"], len(stats_steps)), "cosine": cosine}


def synthesize_classes(eval_steps: np.ndarray, random) -> dict[str, np.ndarray]:
    classes, splits = 10, ["train", "val"]
    step = np.repeat(eval_steps, classes * len(splits))
    count = len(step)
    return {"step": step, "segment": np.zeros(count, np.int32),
            "rank": np.zeros(count, np.int32),
            "split": np.tile(np.repeat(splits, classes), len(eval_steps)),
            "class_id": np.tile(np.arange(classes), len(eval_steps) * len(splits)),
            "recall": random.uniform(0.7, 0.9, count),
            "precision": random.uniform(0.7, 0.9, count),
            "support": random.integers(400, 600, count), "predicted": random.integers(400, 600, count)}


def time_analysis(run_dir: Path) -> tuple[float, float, int]:
    """Return wall seconds, peak RSS in MiB and the exit code of `runlens analyze`."""
    command = [sys.executable, "-m", "runlens", "analyze", str(run_dir), "--format", "json",
               "--fail-on", "never"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"runlens analyze failed with exit code {result.returncode}:\n{result.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, peak_kib / 1024, result.returncode


def time_each_rule(run_dir: Path) -> list[tuple[str, float, int]]:
    timings = []
    with Run.open(run_dir) as run:
        for rule in load_rules():
            start = time.perf_counter()
            report = evaluate(run, [rule])
            timings.append((rule.id, time.perf_counter() - start, len(report.findings)))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the synthetic run here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        run_dir = args.keep or Path(temporary) / "run"
        if not (run_dir / run_format.RUN_FILE).exists():
            synthesize(run_dir, args.steps)
        size = sum(file.stat().st_size for file in run_dir.rglob("*.parquet"))
        elapsed, peak_mib, _ = time_analysis(run_dir)
        print(f"machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
              f"cores, Python {platform.python_version()}")
        print(f"run: {args.steps:,} steps, {size / 2**20:.0f} MiB of Parquet")
        print(f"runlens analyze (all built-in rules): {elapsed:.1f} s wall, "
              f"{peak_mib:.0f} MiB peak RSS")
        print("| rule | seconds | findings |")
        print("| --- | --- | --- |")
        for rule_id, seconds, findings in time_each_rule(run_dir):
            print(f"| {rule_id} | {seconds:.2f} | {findings} |")


if __name__ == "__main__":
    main()
