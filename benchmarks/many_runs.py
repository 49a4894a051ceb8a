"""Measure `runlens analyze DIR` on a folder of many small runs.

The script writes N synthetic runs with pyarrow in the recorder's format, as
benchmarks/analyzer_speed.py does, but smaller: 2,000 steps each by default. Each run
has a noisy decaying loss, clipping, a warmup-then-cosine schedule, per-parameter
statistics for 10 parameters every 100 steps and per-class metrics every 500 steps.
Every 5th run has a loss spike and every 7th clips on every step, so the runs differ
in findings.

It then measures, on the same runs:

1. `runlens analyze DIR --format json` in a child process, with its default of one job
   per CPU core: wall time and peak memory;
2. in this process, three ways to serve the runs from DuckDB, all with every built-in
   rule: one connection per run (`Run.open`, what the command does), the same with
   one thread per CPU core each analyzing a run, and one shared connection with each
   run's views in its own schema, switched with SET search_path;
3. `runlens analyze RUN` in a child process per run, on the first --single-runs runs,
   which is what a shell loop over the runs costs.

    python benchmarks/many_runs.py [--runs 300] [--steps 2000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np

from runlens import format as run_format
from runlens.analyze import Run, evaluate, load_rules
from runlens.analyze.run import (
    RUN_PARAMS_VIEW,
    SEGMENTS_VIEW,
    _check_has_steps,
    _find_parts,
    _resolve_run_dir,
    build_run_params,
    build_segments,
    create_table_views,
)
from runlens.analyze.run_json import read_run_json

sys.path.insert(0, str(Path(__file__).parent))
from analyzer_speed import learning_rate, synthesize_classes, write_table  # noqa: E402

PARAMS = 10


def synthesize_small_run(run_dir: Path, total: int, seed: int) -> None:
    """Write one run of `total` steps; the seed picks its noise and injected failures."""
    random = np.random.default_rng(seed)
    steps = np.arange(total, dtype=np.int64)
    zeros = np.zeros(total, np.int32)
    loss = 2.0 * np.exp(-steps / (total / 5)) + 0.3 + random.gamma(2, 0.05, total)
    if seed % 5 == 0:
        loss[total // 2: total // 2 + 5] *= 8
    grad_norm = random.lognormal(0, 0.4, total)
    max_norm = 0.01 if seed % 7 == 0 else 10.0

    scalars = {
        "step": steps, "segment": zeros, "rank": zeros, "time": 1.7e9 + steps * 0.1,
        "loss": loss, "grad_norm": grad_norm, "clip_total_norm": grad_norm,
        "clip_max_norm": np.full(total, max_norm), "step_skipped": np.zeros(total, bool),
        "nonfinite_loss": np.zeros(total, np.int64),
        "nonfinite_grad_tensors": np.zeros(total, np.int64),
    }
    write_table(run_dir, "scalars", scalars, 0)

    write_table(run_dir, "param_groups", {
        "step": steps, "segment": zeros, "rank": zeros, "group": zeros,
        "lr": learning_rate(steps, total), "weight_decay": np.full(total, 0.01)}, 0)
    stats_steps = steps[::100]
    step = np.repeat(stats_steps, PARAMS)
    count = len(step)
    write_table(run_dir, "params", {
        "step": step, "segment": np.zeros(count, np.int32), "rank": np.zeros(count, np.int32),
        "param": np.tile([f"layer{i}.weight" for i in range(PARAMS)], len(stats_steps)),
        "grad_norm": random.lognormal(-2, 0.3, count),
        "param_norm": random.lognormal(2, 0.1, count),
        "update_norm": random.lognormal(-5, 0.3, count),
        "state_step": (step + 1).astype(float),
        "exp_avg_norm": random.lognormal(-3, 0.3, count),
        "exp_avg_sq_norm": random.lognormal(-6, 0.3, count),
        "state_matches_param": np.ones(count, bool)}, 0)
    write_table(run_dir, "classes", synthesize_classes(steps[499::500], random), 0)

    meta = {"format_version": run_format.FORMAT_VERSION, "runlens_version": "benchmark",
            "params": [{"name": f"layer{i}.weight", "kind": "weight"} for i in range(PARAMS)],
            "optimizer": {"class": "AdamW", "param_groups": [
                {"index": 0, "params": [f"layer{i}.weight" for i in range(PARAMS)],
                 "hyperparameters": {"lr": 3e-4, "weight_decay": 0.01}}]},
            "segments": [{"segment": 0, "start_step": 0}]}
    (run_dir / run_format.RUN_FILE).write_text(json.dumps(meta))


def synthesize_runs(folder: Path, runs: int, steps: int) -> list[Path]:
    """Write `runs` runs under `folder`, in groups of 50 to nest them one level."""
    run_dirs = []
    for index in range(runs):
        run_dir = folder / f"group-{index // 50:02d}" / f"run-{index:04d}"
        if not (run_dir / run_format.RUN_FILE).exists():
            synthesize_small_run(run_dir, steps, index)
        run_dirs.append(run_dir)
    return run_dirs


def time_command(arguments: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Return wall seconds, the peak RSS in MiB of the largest child so far, and the result."""
    command = [sys.executable, "-m", "runlens", *arguments]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "CI": "1"})
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1):
        sys.exit(f"runlens {' '.join(arguments)} failed with exit code {result.returncode}:\n"
                 f"{result.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, peak_kib / 1024, result


def time_connection_per_run(run_dirs: list[Path]) -> tuple[float, int]:
    """Open, evaluate and close each run on its own connection; return seconds, findings."""
    rules = load_rules()
    findings = 0
    start = time.perf_counter()
    for run_dir in run_dirs:
        with Run.open(run_dir) as run:
            findings += len(evaluate(run, rules).findings)
    return time.perf_counter() - start, findings


def time_thread_pool(run_dirs: list[Path], workers: int) -> tuple[float, int]:
    """Analyze the runs as `time_connection_per_run` does, `workers` runs at a time.

    The threads gain only where DuckDB runs a query without holding the GIL, which this
    measurement tests.
    """
    rules = load_rules()

    def count_findings(run_dir: Path) -> int:
        with Run.open(run_dir) as run:
            return len(evaluate(run, rules).findings)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        findings = sum(pool.map(count_findings, run_dirs))
    return time.perf_counter() - start, findings


def time_shared_connection(run_dirs: list[Path]) -> tuple[float, int]:
    """Evaluate every run on one connection, each run's views in its own schema.

    This design cannot keep runs apart: DuckDB's allowed_paths is a setting of the
    whole database, so it has to list every run's parts, and a rule on one run can read
    another run's parts. It is measured here only to compare its speed.
    """
    rules = load_rules()
    findings = 0
    start = time.perf_counter()
    connection = duckdb.connect(":memory:")
    runs = []
    for index, run_dir in enumerate(run_dirs):
        # Run.open's checks, without the connection that it would open.
        path = _resolve_run_dir(run_dir)
        meta = read_run_json(path)
        parts = _find_parts(path, False, [])
        _check_has_steps(path, parts)
        schema = f"run_{index}"
        connection.execute(f"CREATE SCHEMA {schema}")
        connection.execute(f"SET schema = '{schema}'")
        create_table_views(connection, parts)
        for name, table in ((RUN_PARAMS_VIEW, build_run_params(meta)),
                            (SEGMENTS_VIEW, build_segments(meta))):
            connection.register("metadata", table)
            connection.execute(f"CREATE TABLE {name} AS SELECT * FROM metadata")
            connection.unregister("metadata")
        runs.append((schema, Run(path, meta, parts, [], connection)))
    allowed = ", ".join(f"'{file}'" for _, run in runs for files in run.parts.values()
                        for file in files)
    connection.execute(f"SET allowed_paths = [{allowed}]")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    for schema, run in runs:
        # DuckDB 2.0.1 still allows SET search_path after lock_configuration.
        connection.execute(f"SET search_path = '{schema}'")
        findings += len(evaluate(run, rules).findings)
    connection.close()
    return time.perf_counter() - start, findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--single-runs", type=int, default=20,
                        help="runs to analyze with one child process each (default 20)")
    parser.add_argument("--keep", type=Path, help="write the synthetic runs here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary) / "runs"
        run_dirs = synthesize_runs(folder, args.runs, args.steps)
        size = sum(file.stat().st_size for file in folder.rglob("*.parquet"))
        print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
              f"Python {platform.python_version()}, DuckDB {duckdb.__version__}")
        print(f"runs: {args.runs} of {args.steps:,} steps, {size / 2**20:.0f} MiB of Parquet")

        elapsed, peak_mib, result = time_command(
            ["analyze", str(folder), "--format", "json", "--fail-on", "never"])
        totals = json.loads(result.stdout)["totals"]
        print(f"runlens analyze DIR (all built-in rules): {elapsed:.1f} s wall, "
              f"{elapsed / args.runs * 1000:.0f} ms per run, {peak_mib:.0f} MiB peak RSS, "
              f"findings {totals['findings']}")

        per_run, per_run_findings = time_connection_per_run(run_dirs)
        workers = len(os.sched_getaffinity(0))
        pooled, pooled_findings = time_thread_pool(run_dirs, workers)
        shared, shared_findings = time_shared_connection(run_dirs)
        print(f"in process, one connection per run: {per_run:.1f} s "
              f"({per_run_findings} findings)")
        print(f"in process, one connection per run, {workers} threads: {pooled:.1f} s "
              f"({pooled_findings} findings)")
        print(f"in process, one shared connection: {shared:.1f} s "
              f"({shared_findings} findings)")

        single = run_dirs[: args.single_runs]
        start = time.perf_counter()
        for run_dir in single:
            time_command(["analyze", str(run_dir), "--format", "json", "--fail-on", "never"])
        loop = time.perf_counter() - start
        print(f"runlens analyze RUN, one process per run, {len(single)} runs: {loop:.1f} s, "
              f"{loop / len(single) * 1000:.0f} ms per run")


if __name__ == "__main__":
    main()
