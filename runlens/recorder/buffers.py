"""Row buffers that keep per-step values on the training device until a flush.

A row mixes host values (Python numbers and strings, known without touching the device)
and device values (0-d tensors such as the loss or a norm). Device values are never read
on the step path: at a flush each column's tensors are stacked into one tensor and
copied to the host in one transfer, and the background writer waits for that copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from runlens import format as run_format


@dataclass
class PendingPart:
    """One table's rows, handed to the writer thread. `materialize` may block on the device."""

    table: str
    row_count: int
    host_columns: dict[str, list[Any]]
    # column -> (row indices, stacked host tensor, CUDA event or None)
    device_columns: dict[str, tuple[list[int], torch.Tensor, Any]]

    def materialize(self) -> pa.Table:
        arrays: dict[str, pa.Array] = {}
        known_types = run_format.TABLES.get(self.table, {})
        for name, values in self.host_columns.items():
            arrow_type = _arrow_type(known_types.get(name), values)
            arrays[name] = pa.array(values, type=arrow_type)
        for name, (rows, tensor, event) in self.device_columns.items():
            if event is not None:
                event.synchronize()
            values = np.full(self.row_count, math.nan, dtype=np.float64)
            mask = np.ones(self.row_count, dtype=bool)
            # A column may mix host numbers and tensors (a float loss on one step and a
            # tensor on the next, or metrics of both kinds in one `log_eval`), so the host
            # values fill the rows that no tensor covers.
            for row, value in enumerate(self.host_columns.get(name, ())):
                if value is not None:
                    values[row] = float(value)
                    mask[row] = False
            values[rows] = tensor.numpy().astype(np.float64)
            mask[rows] = False
            arrow_type = _arrow_type(known_types.get(name), None)
            if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
                column = pa.array(values, mask=mask).cast(arrow_type, safe=False)
            else:
                column = pa.array(values, mask=mask, type=arrow_type)
            arrays[name] = column
        ordered = _order_columns(arrays, known_types)
        return pa.table(ordered)


def _arrow_type(type_name: str | None, values: list[Any] | None) -> pa.DataType:
    if type_name is not None:
        return pa.type_for_alias(type_name)
    if values is not None and any(isinstance(v, str) for v in values):
        return pa.string()
    return pa.float64()


def _order_columns(arrays: dict[str, pa.Array], known: dict[str, str]) -> dict[str, pa.Array]:
    ordered = {name: arrays[name] for name in known if name in arrays}
    for name in sorted(arrays):
        ordered.setdefault(name, arrays[name])
    return ordered


_HOST_CONVERTERS = {
    "int32": int,
    "int64": int,
    "float64": float,
    "bool": bool,
    "string": str,
}


@dataclass
class TableBuffer:
    """Rows of one table since the last flush."""

    table: str
    row_count: int = 0
    host_columns: dict[str, list[Any]] = field(default_factory=dict)
    device_values: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)

    def add_row(self, values: dict[str, Any]) -> None:
        """Append one row, where None stands for a null.

        Every value is converted before the first column changes, so a value that the
        column cannot store raises ValueError and leaves the buffer as it was.
        """
        known_types = run_format.TABLES.get(self.table, {})
        device_values: list[tuple[str, torch.Tensor]] = []
        host_values: list[tuple[str, Any]] = []
        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                device_values.append((name, self._device_value(name, value)))
            else:
                host_values.append((name, self._host_value(name, known_types.get(name), value)))

        row = self.row_count
        for name, tensor in device_values:
            self.device_values.setdefault(name, []).append((row, tensor))
        for name, value in host_values:
            self.host_columns.setdefault(name, [None] * row).append(value)
        self.row_count += 1
        for column in self.host_columns.values():
            if len(column) < self.row_count:
                column.append(None)

    def _device_value(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Only metadata is read here, so the check does not synchronize with the device.
        if tensor.numel() != 1 or tensor.dtype.is_complex or tensor.layout != torch.strided:
            raise ValueError(f"{self.table} column {name!r} takes a real one-element dense "
                             f"tensor, got shape {tuple(tensor.shape)}, dtype {tensor.dtype} "
                             f"and layout {tensor.layout}")
        return tensor.detach().reshape(())

    def _host_value(self, name: str, type_name: str | None, value: Any) -> Any:
        # A value that does not fit its Arrow type would fail the whole part at the write,
        # so it is converted (or rejected) here. Unknown columns are user scalars (float64).
        if type_name is None and isinstance(value, str):
            convert = str
        else:
            convert = _HOST_CONVERTERS.get(type_name, float)
        try:
            return convert(value)
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"{self.table} column {name!r} cannot store {value!r}: "
                             f"{error}") from error

    def take(self) -> PendingPart | None:
        """Start the device-to-host copies and return the rows, leaving the buffer empty."""
        if self.row_count == 0:
            return None
        device_columns = {
            name: _copy_to_host(entries) for name, entries in self.device_values.items()
        }
        part = PendingPart(self.table, self.row_count, self.host_columns, device_columns)
        self.row_count = 0
        self.host_columns = {}
        self.device_values = {}
        return part


def _copy_to_host(entries: list[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor, Any]:
    rows = [row for row, _ in entries]
    tensors = [tensor.float() for _, tensor in entries]
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        # NOTE: tensors of one column on several devices are rare (a loss on the CPU beside
        # gradients on a GPU). Moving each one to the CPU synchronizes, but only at a flush.
        tensors = [tensor.cpu() for tensor in tensors]
    stacked = torch.stack(tensors)
    if stacked.device.type != "cuda":
        return rows, stacked.cpu(), None
    # A copy into pinned memory with non_blocking=True returns at once. The writer thread
    # waits on the event, so the training thread does not wait for the transfer.
    # NOTE: no GPU was available where this was written, so this CUDA path has not been
    # run. The tests cover the CPU path above.
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return rows, host, event
