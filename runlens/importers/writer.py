"""Write imported tables as a new run directory, all at once or not at all.

Everything is written into a staging folder next to RUN_DIR, each file under a ``.tmp-``
name renamed into place as the recorder does, and the staging folder is then renamed to
RUN_DIR. A reader therefore sees no run directory or a complete one, and an existing
RUN_DIR with anything in it is never touched: rename(2) fails on a non-empty target.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import runlens
from runlens import format as fmt
from runlens.importers import ImportInputError

# The recorder's settings, which an imported run does not have.
RECORDER_SETTINGS = ("param_stats_every", "task_probe_every", "trajectory_every",
                     "trajectory_seed", "trajectory_projection", "flush_every",
                     "flush_seconds")


def check_new_run_dir(run_dir: Path) -> None:
    """Raise ImportInputError unless `run_dir` is missing or an empty directory."""
    try:
        if not run_dir.exists():
            return
        if not run_dir.is_dir():
            raise ImportInputError(f"RUN_DIR {run_dir}: is a file; pass the path of a new "
                                   "directory for the imported run")
        has_entries = any(run_dir.iterdir())
    except OSError as error:
        raise ImportInputError(f"RUN_DIR {run_dir}: cannot be checked: {error.strerror or error}"
                               ) from None
    if has_entries:
        raise ImportInputError(f"RUN_DIR {run_dir}: exists and is not empty; an import writes "
                               "a new run directory, so pass a new path (nothing in "
                               f"{run_dir} was changed)")


def run_metadata(imported_from: dict[str, Any], first_step: int) -> dict[str, Any]:
    """Return the run.json of an imported run: one segment, no params and no optimizer."""
    created = datetime.now(timezone.utc).isoformat()
    return {
        "format_version": fmt.FORMAT_VERSION,
        "runlens_version": runlens.__version__,
        "torch_version": None,
        "python_version": platform.python_version(),
        "created": created,
        "imported_from": imported_from,
        "world_size": 1,
        "optimizer": None,
        "scheduler": None,
        "amp": {"scaler": None},
        "config": {},
        "settings": dict.fromkeys(RECORDER_SETTINGS),
        "segments": [{
            "segment": 0,
            "start_step": first_step,
            "started": created,
            "argv": list(sys.argv),
            "optimizer": None,
            "trajectory_projection": None,
        }],
    }


def write_run_dir(run_dir: Path, meta: dict[str, Any], tables: dict[str, pa.Table]) -> None:
    """Write run.json and one part per table (segment 0, rank 0) as the new `run_dir`.

    Raises:
        ImportInputError: `run_dir` exists and is not empty (checked again at the final
            rename), or a file cannot be written. The staging folder is removed then.
    """
    check_new_run_dir(run_dir)
    # An absolute path has a real parent and name, also for "." or "runs/new/..".
    target = Path(os.path.abspath(run_dir))
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f"{fmt.TEMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as error:
        raise ImportInputError(f"RUN_DIR {run_dir}: cannot create a folder in {parent}: "
                               f"{error.strerror or error}") from None
    try:
        _write_contents(staging, meta, tables)
        # rename(2) replaces an empty directory and fails on a non-empty one, so a RUN_DIR
        # that another process filled since the check keeps its contents.
        os.rename(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ImportInputError(f"RUN_DIR {run_dir}: the import could not be written: "
                               f"{error.strerror or error}; nothing was written into "
                               f"{run_dir}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_contents(folder: Path, meta: dict[str, Any], tables: dict[str, pa.Table]) -> None:
    for sequence, (table, data) in enumerate(tables.items()):
        table_folder = folder / table / fmt.rank_folder(0)
        table_folder.mkdir(parents=True)
        name = fmt.part_name(0, sequence)
        temporary = table_folder / f"{fmt.TEMP_PREFIX}{name}"
        pq.write_table(data, temporary)
        os.replace(temporary, table_folder / name)
    temporary = folder / f"{fmt.TEMP_PREFIX}{fmt.RUN_FILE}"
    temporary.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(temporary, folder / fmt.RUN_FILE)
