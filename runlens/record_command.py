"""`runlens record -- python train.py`: run a training program with the recorder loaded.

The program runs as a child process with the same stdin, stdout, stderr and environment,
with two additions. PYTHONPATH starts with the bootstrap folder `runlens/recorder/bootstrap`,
whose sitecustomize.py starts `runlens.recorder.auto` in the program. RUNLENS_RECORD_*
variables carry the settings. When the program ends, one line per run directory goes to
stderr, and the program's exit code becomes this command's.

This module runs in the analyzer's process and must not import torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from runlens import format as run_format
from runlens.analyze.errors import RunlensError
from runlens.recorder.auto import Settings

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "recorder" / "bootstrap"
DEFAULT_RUNS_DIR = Path("runs")

# Signals sent to this process that are passed on to the program. SIGINT is not among
# them: Ctrl-C at a terminal reaches the program directly, because it runs in the same
# process group, so this process only waits for it to end.
FORWARDED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")

# Interpreter options that take a value in the next argument.
_PYTHON_OPTIONS_WITH_VALUE = {"-X", "-W", "--check-hash-based-pycs"}


@dataclass(frozen=True)
class RecordOptions:
    """The `Recorder` options that `runlens record` passes to the program."""

    param_stats_every: int = 100
    trajectory_every: int | None = None
    trajectory_seed: int = 0
    flush_every: int = 500
    flush_seconds: float = 10.0
    watch_activations: bool = True

    def check(self) -> None:
        """Raise RunlensError for a value that the Recorder would reject."""
        if not (self.flush_seconds > 0 and math.isfinite(self.flush_seconds)):
            raise RunlensError(f"--flush-seconds {self.flush_seconds:g}: must be a positive, "
                               "finite number of seconds, such as 10")


def run_record(command: list[str], run_dir: Path | None, options: RecordOptions) -> int:
    """Run `command` with recording on and return the exit code to exit with.

    Raises RunlensError, before anything runs, when the command is missing or not found,
    or when `run_dir` is a file.
    """
    if not command:
        raise RunlensError("no program to run: put the command after --, as in "
                           "runlens record -- python train.py")
    if shutil.which(command[0]) is None:
        raise RunlensError(f"command {command[0]!r} not found: pass a program on PATH or "
                           "the path of an executable file, as in runlens record -- python "
                           "train.py")
    options.check()
    if run_dir is None:
        run_dir = default_run_dir(command)
    elif run_dir.exists() and not run_dir.is_dir():
        raise RunlensError(f"--run-dir {run_dir}: is a file; pass a new or existing run "
                           "directory")
    with tempfile.TemporaryDirectory(prefix="runlens-record-") as status_dir:
        status_file = Path(status_dir) / "status.json"
        settings = Settings(run_dir.absolute(), asdict(options), status_file)
        exit_code = run_program(command, program_environment(os.environ, settings))
        for line in summary_lines(run_dir, _read_status(status_file)):
            print(line, file=sys.stderr, flush=True)
    return exit_code


def program_environment(environ: Any, settings: Settings) -> dict[str, str]:
    """Return the program's environment: `environ` with the bootstrap and the settings."""
    environment = dict(environ)
    environment.update(settings.environment())
    old_path = environ.get("PYTHONPATH")
    bootstrap = str(BOOTSTRAP_DIR)
    # sitecustomize.py restores the old value: unset when there is no separator.
    environment["PYTHONPATH"] = bootstrap if old_path is None else bootstrap + os.pathsep + old_path
    return environment


def run_program(command: list[str], environment: dict[str, str]) -> int:
    """Run the program, pass forwarded signals on, and return its exit code.

    A program killed by signal N gives 128 + N, as in a shell.
    """
    # close_fds=False: the program also gets the file descriptors that were passed to
    # this process as inheritable. The program's own stdio are this process's.
    try:
        process = subprocess.Popen(command, env=environment, close_fds=False)
    except OSError as error:
        reason = error.strerror or error
        raise RunlensError(f"failed to start {command[0]!r}: {reason}; check that it is an "
                           "executable program") from None
    previous = {}

    def forward(signal_number, frame):
        try:
            process.send_signal(signal_number)
        except ProcessLookupError:
            pass

    for name in FORWARDED_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, forward)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signal_number, frame: None)
    try:
        return_code = process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - return_code if return_code < 0 else return_code


def default_run_dir(command: list[str], now: datetime | None = None) -> Path:
    """Return `runs/<program name>-<UTC time>`, with a counter when that exists already."""
    now = now or datetime.now(timezone.utc)
    stem = f"{program_name(command)}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    candidate = DEFAULT_RUNS_DIR / stem
    counter = 1
    while candidate.exists():
        counter += 1
        candidate = DEFAULT_RUNS_DIR / f"{stem}-{counter}"
    return candidate


def program_name(command: list[str]) -> str:
    """Return the name of the program: the script's or module's name for a Python command."""
    executable = Path(command[0]).name
    name = Path(command[0]).stem
    if re.fullmatch(r"python[0-9.]*", executable):
        name = _python_program(command[1:]) or executable
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _python_program(arguments: list[str]) -> str | None:
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument == "-m" and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith("-m") and len(argument) > 2:
            return argument[2:]
        if argument == "-c":
            return "python-c"
        if argument == "--" and index + 1 < len(arguments):
            return Path(arguments[index + 1]).stem
        if argument in _PYTHON_OPTIONS_WITH_VALUE:
            index += 2
            continue
        if argument.startswith("-"):
            index += 1
            continue
        return Path(argument).stem
    return None


def summary_lines(run_dir: Path, status: dict[str, Any] | None) -> list[str]:
    """Return the lines that tell what the program recorded, one per run directory."""
    if status is None:
        return [f"runlens: recorded no steps to {run_dir}: the recorder did not start in "
                "the program (python -S, -E and -I do not load it, and it records Python "
                "programs only)"]
    lines = []
    for run in status.get("runs", []):
        path = Path(run["run_dir"])
        segment = int(run["segment"])
        steps = count_steps(path, segment)
        where = _shown_path(path) + (f" (segment {segment})" if segment else "")
        lines.append(f"runlens: recorded {steps} step{'' if steps == 1 else 's'} to {where}")
    for failed in status.get("failed", []):
        lines.append(f"runlens: recorded no steps to {_shown_path(Path(failed))}: the "
                     "recorder did not open it (see the warning above)")
    if not lines:
        lines.append(f"runlens: recorded no steps to {run_dir}: the program's own process "
                     "made no optimizer step, so nothing was written (training in child "
                     "processes, as under torchrun, is not recorded)")
    return lines


def count_steps(run_dir: Path, segment: int) -> int:
    """Count the rows of rank 0's `scalars` parts of `segment`: one per recorded step."""
    folder = run_dir / "scalars" / run_format.rank_folder(0)
    prefix = f"{run_format.PART_PREFIX}{segment:04d}-"
    rows = 0
    for part in folder.glob(f"{prefix}*{run_format.PART_SUFFIX}"):
        try:
            rows += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # noqa: BLE001 - a damaged part counts as no rows here
            continue
    return rows


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _shown_path(path: Path) -> str:
    """Return `path` relative to the current directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
