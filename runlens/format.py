"""The run directory format, shared by the recorder and the analyzer.

A run directory contains ``run.json`` and one folder per table. Each table folder contains
immutable Parquet part files under ``rank-<r>/``, written to a temporary name and
renamed into place, so a reader never sees a half-written part. Part files may add
columns over time and readers union them by name. ``docs/format.md`` describes every
column for users; this module is the single place where names and versions are fixed.

This module must not import torch: the analyzer imports it.
"""

from __future__ import annotations

FORMAT_VERSION = 1
RUN_FILE = "run.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
# Part files are written under this prefix and renamed when complete. Readers skip them.
TEMP_PREFIX = ".tmp-"

# Columns that every table carries. `step` is the optimizer step, counted from 0 across
# all segments of the run. `segment` counts openings of the run directory: 0 for the
# first, 1 for the first resume, and so on.
KEY_COLUMNS = ("step", "segment", "rank")

# Table name -> (column name -> Arrow type name) for the columns the recorder writes.
# User scalars add float64 columns to `scalars` under the names the user gives.
TABLES: dict[str, dict[str, str]] = {
    "scalars": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "time": "float64",
        "loss": "float64",
        "grad_norm": "float64",
        "clip_total_norm": "float64",
        "clip_max_norm": "float64",
        "amp_scale": "float64",
        "step_skipped": "bool",
        "nonfinite_loss": "int64",
        "nonfinite_grad_tensors": "int64",
        "optimizer_state_tensors": "int64",
        "batch_size": "int64",
        "micro_batches": "int64",
        "batch_groups": "int64",
        "batch_largest_group": "int64",
        # Host timings, recorded under torch.distributed or with a `timer=`, so that a
        # rank that loads or computes slowly shows although DDP makes steps end together.
        "step_time": "float64",
        "data_time": "float64",
        "compute_time": "float64",
    },
    "param_groups": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "group": "int32",
        "lr": "float64",
        "weight_decay": "float64",
    },
    "losses": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "task": "string",
        "loss": "float64",
        "weight": "float64",
        "weighted_loss": "float64",
    },
    "params": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "param": "string",
        "grad_norm": "float64",
        "param_norm": "float64",
        "update_norm": "float64",
        "state_step": "float64",
        "exp_avg_norm": "float64",
        "exp_avg_sq_norm": "float64",
        "momentum_buffer_norm": "float64",
        "state_matches_param": "bool",
        "requires_grad": "bool",
        "numel": "int64",
        "grad_zero_fraction": "float64",
        # True for a parameter split across ranks (FSDP2), whose norms are of this rank's
        # shard; null for a parameter that every rank keeps whole.
        "sharded": "bool",
    },
    "tasks": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "task": "string",
        "grad_norm": "float64",
    },
    "task_pairs": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "task": "string",
        "other_task": "string",
        "cosine": "float64",
    },
    "evals": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "split": "string",
        "metric": "string",
        "value": "float64",
    },
    "classes": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "split": "string",
        "class_id": "int64",
        "recall": "float64",
        "precision": "float64",
        "support": "int64",
        "predicted": "int64",
    },
    "activations": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "module": "string",
        "module_type": "string",
        "dtype": "string",
        "numel": "int64",
        "mean": "float64",
        "std": "float64",
        "max_abs": "float64",
        "zero_fraction": "float64",
        "saturated_fraction": "float64",
    },
    "batchnorm": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "module": "string",
        "batch_size": "int64",
        "training": "bool",
        "running_mean_norm": "float64",
        "running_var_mean": "float64",
        "running_var_max": "float64",
    },
    "split_groups": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "split": "string",
        "group": "string",
        "examples": "int64",
    },
    "trajectory": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "x": "float64",
        "y": "float64",
    },
    "events": {
        "step": "int64",
        "segment": "int32",
        "rank": "int32",
        "time": "float64",
        "kind": "string",
        "detail": "string",
    },
}

# Event kinds that the recorder writes. Users may add their own through `Recorder.event`.
EVENT_SEGMENT_START = "segment_start"
EVENT_CHECKPOINT_LOAD = "checkpoint_load"
EVENT_CHECKPOINT_SAVE = "checkpoint_save"
EVENT_RECORDER_ERROR = "recorder_error"
EVENT_FREEZE = "freeze"
EVENT_UNFREEZE = "unfreeze"
EVENT_PARAM_GROUPS_CHANGE = "param_groups_change"
EVENT_LOSS_WEIGHT_CHANGE = "loss_weight_change"
EVENT_DATASET = "dataset"
EVENT_DATASET_CHANGE = "dataset_change"

# Parameter kinds in run.json, used by rules about weight decay and initialization.
PARAM_KINDS = ("weight", "bias", "norm", "embedding")

# Columns of `scalars` that user scalars may not take, because the recorder writes them.
RESERVED_SCALARS = frozenset(TABLES["scalars"])


def part_name(segment: int, sequence: int) -> str:
    """Return the file name of a part: sortable by segment, then by write order."""
    return f"{PART_PREFIX}{segment:04d}-{sequence:06d}{PART_SUFFIX}"


def rank_folder(rank: int) -> str:
    return f"rank-{rank}"
