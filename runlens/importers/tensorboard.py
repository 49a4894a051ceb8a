"""Read scalar summaries from TensorBoard event files, without TensorFlow or TensorBoard.

An event file is a sequence of TFRecords. Each record is a little-endian uint64 length,
the masked CRC-32C of those 8 bytes (uint32), the data, and the masked CRC-32C of the
data (uint32). The data is a serialized `tensorflow.Event` protobuf message. This module
decodes only the protobuf fields that scalars need:

    Event:         wall_time = 1 (double), step = 2 (int64), summary = 5 (Summary)
    Summary:       value = 1 (repeated Value)
    Summary.Value: tag = 1, simple_value = 2 (float), tensor = 8 (TensorProto),
                   metadata = 9 (SummaryMetadata), and 3 to 6 for histograms, images, audio
    TensorProto:   dtype = 1, tensor_shape = 2, tensor_content = 4, float_val = 5,
                   double_val = 6, int_val = 7, int64_val = 10, half_val = 13

(field numbers from tensorflow/core/util/event.proto, framework/summary.proto and
framework/tensor.proto). `torch.utils.tensorboard` and tensorboardX write a scalar as
`simple_value`, or as a one-element tensor with `new_style=True`; TensorFlow 2's
`tf.summary.scalar` writes a one-element tensor whose metadata names the ``scalars``
plugin.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from runlens.importers import SPLIT_WORDS, ImportInputError, SeriesSet

EVENT_FILE_PREFIX = "events.out.tfevents."
ProgressCallback = Callable[[int], None]

# -- CRC-32C -----------------------------------------------------------------------------

_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed
_CRC_MASK_DELTA = 0xA282EAD8
# Data of at least this many bytes is checksummed in parallel lanes of _LANE_BYTES with
# numpy, which is far faster in Python than one table lookup per byte.
_LANES_FROM_BYTES = 64 * 1024
_LANE_BYTES = 1024


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        register = byte
        for _ in range(8):
            register = (register >> 1) ^ _CRC32C_POLYNOMIAL if register & 1 else register >> 1
        table.append(register)
    return table


_TABLE = _byte_table()
_NUMPY_TABLE = np.array(_TABLE, dtype=np.uint32)


def _crc_update(register: int, data: bytes | memoryview) -> int:
    table = _TABLE
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


@functools.cache
def _lane_shift_tables() -> tuple[list[int], ...]:
    """Return 4 byte tables of the linear map that advances a register over _LANE_BYTES zeros.

    A register update is linear: register' = A(register) ^ T[byte], with A(r) =
    T[r & 0xFF] ^ (r >> 8). Running a lane from register R therefore ends at
    A^L(R) ^ (the lane run from 0), which is how the lanes are joined.
    """
    images = []
    for bit in range(32):
        register = 1 << bit
        for _ in range(_LANE_BYTES):
            register = _TABLE[register & 0xFF] ^ (register >> 8)
        images.append(register)
    tables = []
    for position in range(4):
        table = [0] * 256
        for byte in range(1, 256):
            lowest = byte & -byte
            table[byte] = table[byte ^ lowest] ^ images[8 * position + lowest.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def crc32c(data: bytes | memoryview) -> int:
    """Return the CRC-32C (Castagnoli) of `data`, as TFRecord framing uses it."""
    if len(data) < _LANES_FROM_BYTES:
        return _crc_update(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    lanes = len(data) // _LANE_BYTES
    body = np.frombuffer(data, dtype=np.uint8, count=lanes * _LANE_BYTES)
    columns = np.ascontiguousarray(body.reshape(lanes, _LANE_BYTES).T)
    registers = np.zeros(lanes, dtype=np.uint32)
    registers[0] = 0xFFFFFFFF
    for column in columns:
        registers = _NUMPY_TABLE[(registers ^ column) & 0xFF] ^ (registers >> 8)
    shift0, shift1, shift2, shift3 = _lane_shift_tables()
    lane_registers = registers.tolist()
    register = lane_registers[0]
    for lane_register in lane_registers[1:]:
        register = (shift0[register & 0xFF] ^ shift1[(register >> 8) & 0xFF]
                    ^ shift2[(register >> 16) & 0xFF] ^ shift3[register >> 24] ^ lane_register)
    register = _crc_update(register, memoryview(data)[lanes * _LANE_BYTES:])
    return register ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """Return the masked CRC-32C that TFRecord stores: rotated right by 15, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# -- finding the event files ---------------------------------------------------------------


@dataclass
class EventSource:
    """The event files of one run: `files` lists (path, folder relative to `root`)."""

    logdir: Path
    root: Path
    run: str | None
    files: list[tuple[Path, str]]

    @property
    def total_bytes(self) -> int:
        return sum(_file_size(path) for path, _ in self.files)

    @property
    def label(self) -> str:
        """The source as the summary and errors name it."""
        count = len(self.files)
        return f"{count} event file{'s' if count != 1 else ''} from {self.root}"


def find_event_files(logdir: Path, run: str | None = None) -> EventSource:
    """Find the event files of the run to import under `logdir`.

    A folder with event files is a run, as in TensorBoard, together with the subfolders
    below it: `SummaryWriter.add_scalars` writes one subfolder per series. `logdir`, or
    the folder `run` below it, must contain one run, or several runs whose names are
    split words in one folder (Keras writes ``train/`` and ``validation/``), which are
    imported as one.

    Raises:
        ImportInputError: `logdir` is missing or contains no event files, `run` names no
            folder with event files, or the folder contains several runs.
    """
    if not logdir.is_dir():
        what = "is not a directory" if logdir.exists() else "not found"
        raise ImportInputError(f"LOGDIR {logdir}: {what}; pass the folder that the "
                               "SummaryWriter wrote (its log_dir)")
    folders = _event_folders(logdir)
    if not folders:
        raise ImportInputError(f"LOGDIR {logdir}: no TensorBoard event files "
                               f"({EVENT_FILE_PREFIX}*) in it or its subfolders")
    base = "" if run is None else _normalize_run(run, logdir)
    below = {}
    for folder, names in folders.items():
        relative = _relative_folder(folder, base)
        if relative is not None:
            below[relative] = names
    if not below:
        raise ImportInputError(f"--run {run}: no event files in {logdir / base}; the runs "
                               f"in {logdir} are {_list_runs(_run_folders(folders), '')}")
    runs = _run_folders(below)
    selected = runs[0] if len(runs) == 1 else _split_parent(runs)
    if selected is None:
        where = f"--run {run}: {logdir / base}" if base else f"LOGDIR {logdir}"
        raise ImportInputError(f"{where} contains {len(runs)} runs "
                               f"({_list_runs(runs, base)}); pass --run NAME with one of "
                               "them, relative to LOGDIR")
    root = _join_folders(base, selected)
    files = []
    for folder in sorted(folders):
        relative = _relative_folder(folder, root)
        if relative is not None:
            files += [(logdir / folder / name, relative) for name in folders[folder]]
    return EventSource(logdir=logdir, root=logdir / root, run=root or None, files=files)


def _join_folders(parent: str, child: str) -> str:
    return "/".join(part for part in (parent, child) if part)


def _list_runs(runs: list[str], base: str) -> str:
    names = ", ".join(_join_folders(base, run) or "." for run in runs[:10])
    return names + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")


def _event_folders(logdir: Path) -> dict[str, list[str]]:
    """Return folder (relative, POSIX, "" for logdir) -> sorted event file names in it."""
    def raise_error(error: OSError) -> None:
        raise ImportInputError(f"LOGDIR {logdir}: cannot list {error.filename}: "
                               f"{error.strerror or error}") from None

    folders: dict[str, list[str]] = {}
    for directory, subdirectories, names in os.walk(logdir, onerror=raise_error):
        subdirectories.sort()
        events = sorted(name for name in names if name.startswith(EVENT_FILE_PREFIX)
                        and os.path.isfile(os.path.join(directory, name)))
        if events:
            relative = PurePosixPath(Path(directory).relative_to(logdir)).as_posix()
            folders["" if relative == "." else relative] = events
    return folders


def _run_folders(folders: dict[str, list[str]]) -> list[str]:
    """Return the folders with event files that no folder above them (up to LOGDIR) has."""
    runs = []
    for folder in sorted(folders):
        parts = folder.split("/") if folder else []
        above = ["/".join(parts[:length]) for length in range(len(parts))]
        if not any(parent in folders for parent in above):
            runs.append(folder)
    return runs


def _split_parent(runs: list[str]) -> str | None:
    """Return the common folder of runs named by split words (``train``, ``validation``)."""
    parents = {str(PurePosixPath(run).parent) for run in runs}
    if len(parents) != 1 or not all(PurePosixPath(run).name in SPLIT_WORDS for run in runs):
        return None
    parent = parents.pop()
    return "" if parent == "." else parent


def _normalize_run(run: str, logdir: Path) -> str:
    parts = [part for part in PurePosixPath(run.replace(os.sep, "/")).parts if part != "."]
    if ".." in parts or PurePosixPath(run).is_absolute():
        raise ImportInputError(f"--run {run}: must be a folder inside LOGDIR {logdir}, "
                               "given relative to it, such as --run version_0")
    return "/".join(parts)


def _relative_folder(folder: str, run: str) -> str | None:
    """Return `folder` relative to `run`, or None when it is not `run` or below it."""
    if not run:
        return folder
    if folder == run:
        return ""
    if folder.startswith(run + "/"):
        return folder[len(run) + 1:]
    return None


def effective_tag(folder: str, tag: str) -> str:
    """Return the name under which a tag of a file in a run's subfolder is imported.

    `SummaryWriter.add_scalars(main_tag, {key: value})` writes tag `main_tag` into the
    subfolder ``<main_tag with / as _>_<key>``, which becomes ``<main_tag>/<key>``, such
    as ``loss/train``. A tag in any other subfolder gets the folder as a prefix.
    """
    if not folder:
        return tag
    stem = tag.replace("/", "_") + "_"
    if "/" not in folder and folder.startswith(stem) and len(folder) > len(stem):
        return f"{tag}/{folder[len(stem):]}"
    return f"{folder}/{tag}"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as error:
        raise ImportInputError(f"{path}: cannot read: {error.strerror or error}") from None


# -- reading records -----------------------------------------------------------------------

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
# Progress is reported in steps of this many bytes, so that a file of small records does
# not update the progress bar once per record.
_PROGRESS_STEP = 1 << 20


def read_event_files(source: EventSource, on_progress: ProgressCallback | None = None
                     ) -> tuple[SeriesSet, list[str]]:
    """Read the scalar values of every event file of `source`.

    Returns the series by effective tag (see `effective_tag`) and the warnings: skipped
    truncated records and negative steps.

    Raises:
        ImportInputError: a file cannot be read, a record's checksum does not match, or a
            record with a valid checksum is not an Event message.
    """
    series = SeriesSet()
    warnings: list[str] = []
    negative_steps = 0
    for path, folder in source.files:
        plugins: dict[str, str] = {}
        for offset, record in _records(path, source.logdir, warnings, on_progress):
            try:
                negative_steps += _read_event(record, folder, plugins, series)
            except _WireError as error:
                raise ImportInputError(
                    f"{path}: the record at byte offset {offset} is not a TensorBoard Event "
                    f"({error}), although its checksum matches; the file may not be an "
                    f"event file: move it out of {source.logdir}") from None
    if negative_steps:
        warnings.append(f"{source.root}: {negative_steps} values with a negative step were "
                        "skipped; runlens steps start at 0")
    return series, warnings


def _records(path: Path, logdir: Path, warnings: list[str],
             on_progress: ProgressCallback | None) -> Iterator[tuple[int, memoryview]]:
    """Yield (byte offset, data) of each record, after checking both checksums.

    A last record that the file ends inside of, as a writer that is still running or was
    killed leaves, is skipped with a warning.
    """
    size = _file_size(path)
    pending = 0
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise ImportInputError(f"{path}: cannot read: {error.strerror or error}") from None
    with handle:
        offset = 0
        while offset < size:
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size:
                _warn_truncated(path, offset, size, warnings)
                break
            length, stored = _HEADER.unpack(header)
            computed = masked_crc32c(header[:8])
            if computed != stored:
                raise _corrupt(path, offset, "length", stored, computed, logdir)
            end = offset + _HEADER.size + length + _FOOTER.size
            if end > size:
                _warn_truncated(path, offset, size, warnings)
                break
            body = memoryview(handle.read(length + _FOOTER.size))
            if len(body) < length + _FOOTER.size:
                _warn_truncated(path, offset, size, warnings)
                break
            data = body[:length]
            (stored,) = _FOOTER.unpack(body[length:])
            computed = masked_crc32c(data)
            if computed != stored:
                raise _corrupt(path, offset, "data", stored, computed, logdir)
            yield offset, data
            pending += end - offset
            if on_progress is not None and pending >= _PROGRESS_STEP:
                on_progress(pending)
                pending = 0
            offset = end
    if on_progress is not None:
        on_progress(pending + size - offset)


def _warn_truncated(path: Path, offset: int, size: int, warnings: list[str]) -> None:
    warnings.append(f"{path}: the last record, at byte offset {offset}, is incomplete "
                    f"(the file ends at {size}), as a writer that is still running or was "
                    "killed leaves it; it was skipped")


def _corrupt(path: Path, offset: int, part: str, stored: int, computed: int,
             logdir: Path) -> ImportInputError:
    return ImportInputError(
        f"{path}: corrupt record at byte offset {offset}: the {part} checksum does not match "
        f"(stored masked CRC-32C 0x{stored:08x}, computed 0x{computed:08x}); copy the file "
        f"again from the training machine, or move it out of {logdir} to import the others")


# -- decoding protobuf -----------------------------------------------------------------------


class _WireError(ValueError):
    """Data that is not a valid protobuf message."""


_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    if position < len(data) and data[position] < 0x80:  # one byte: most keys and lengths
        return data[position], position + 1
    result = shift = 0
    while True:
        if position >= len(data):
            raise _WireError("a varint runs past the end of the message")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise _WireError("a varint is longer than 10 bytes")


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) of a message; a value is an int or bytes."""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = _varint(data, position)
        elif wire_type == _FIXED64:
            value, position = data[position:position + 8], position + 8
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
            value, position = data[position:position + length], position + length
        elif wire_type == _FIXED32:
            value, position = data[position:position + 4], position + 4
        else:
            raise _WireError(f"field {number} has the unsupported wire type {wire_type}")
        if position > end:
            raise _WireError(f"field {number} runs past the end of the message")
        yield number, wire_type, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _read_event(data: memoryview, folder: str, plugins: dict[str, str],
                series: SeriesSet) -> int:
    """Add the scalar values of one Event to `series`; return the count of negative steps.

    `plugins` maps the tags of this file to the plugin that their metadata names, which
    a writer stores only with a tag's first value.
    """
    wall_time, step, summaries = 0.0, 0, []
    for number, wire_type, value in _fields(data):
        if number == 1 and wire_type == _FIXED64:
            (wall_time,) = struct.unpack("<d", value)
        elif number == 2 and wire_type == _VARINT:
            step = _signed64(value)
        elif number == 5 and wire_type == _LENGTH_DELIMITED:
            summaries.append(value)
    negative = 0
    for summary in summaries:
        for number, wire_type, value in _fields(summary):
            if number != 1 or wire_type != _LENGTH_DELIMITED:
                continue
            tag, scalar, reason = _read_value(value, plugins)
            if tag is None:
                continue
            name = effective_tag(folder, tag)
            if scalar is None:
                series.mark_not_imported(name, reason)
            elif step < 0:
                negative += 1
            else:
                series.add(name, step, scalar, wall_time)
    return negative


_OTHER_KINDS = {3: "an old-style histogram", 4: "an image", 5: "a histogram", 6: "audio"}


def _read_value(data: memoryview, plugins: dict[str, str]) -> tuple[str | None, float | None, str]:
    """Return (tag, scalar or None, why it is no scalar) of one Summary.Value."""
    tag = None
    simple_value = tensor = None
    plugin = ""
    other = ""
    for number, wire_type, value in _fields(data):
        if number == 1 and wire_type == _LENGTH_DELIMITED:
            tag = bytes(value).decode("utf-8", errors="replace")
        elif number == 2 and wire_type == _FIXED32:
            (simple_value,) = struct.unpack("<f", value)
        elif number == 8 and wire_type == _LENGTH_DELIMITED:
            tensor = value
        elif number == 9 and wire_type == _LENGTH_DELIMITED:
            plugin = _plugin_name(value)
        elif number in _OTHER_KINDS:
            other = _OTHER_KINDS[number]
    if tag is None:
        return None, None, ""
    if plugin:
        plugins[tag] = plugin
    plugin = plugins.get(tag, "")
    if simple_value is not None:
        return tag, float(simple_value), ""
    if other:
        return tag, None, f"{other} summary"
    if plugin and plugin != "scalars":
        return tag, None, f"a summary of the {plugin} plugin"
    if tensor is None:
        return tag, None, "a summary without a value"
    scalar, reason = _tensor_scalar(tensor)
    return tag, scalar, reason


def _plugin_name(metadata: memoryview) -> str:
    for number, wire_type, value in _fields(metadata):
        if number == 1 and wire_type == _LENGTH_DELIMITED:  # SummaryMetadata.plugin_data
            for inner, inner_type, name in _fields(value):
                if inner == 1 and inner_type == _LENGTH_DELIMITED:  # PluginData.plugin_name
                    return bytes(name).decode("utf-8", errors="replace")
    return ""


# tensorflow.DataType -> (name, struct format of one element, TensorProto field of its
# repeated values). bfloat16 has no struct format: it is the upper half of a float32.
_DTYPES = {
    1: ("float", "<f", 5),
    2: ("double", "<d", 6),
    3: ("int32", "<i", 7),
    4: ("uint8", "<B", 7),
    5: ("int16", "<h", 7),
    6: ("int8", "<b", 7),
    9: ("int64", "<q", 10),
    14: ("bfloat16", None, 13),
    19: ("half", "<e", 13),
}


def _tensor_scalar(data: memoryview) -> tuple[float | None, str]:
    """Return (the value of a one-element numeric TensorProto, "") or (None, the reason)."""
    dtype = 0
    dims: list[int] = []
    content = None
    repeated: list[tuple[int, int, int | memoryview]] = []
    for number, wire_type, value in _fields(data):
        if number == 1 and wire_type == _VARINT:
            dtype = value
        elif number == 2 and wire_type == _LENGTH_DELIMITED:
            dims = _shape(value)
        elif number == 4 and wire_type == _LENGTH_DELIMITED:
            content = value
        elif number in (5, 6, 7, 10, 13):
            repeated.append((number, wire_type, value))
    if dtype not in _DTYPES:
        return None, f"a tensor of data type {dtype}, not a number"
    elements = math.prod(dims)
    if elements != 1:
        return None, f"a tensor of {elements} elements, not a scalar"
    name, element_format, field_number = _DTYPES[dtype]
    if content:
        element_size = 2 if element_format is None else struct.calcsize(element_format)
        if len(content) != element_size:
            return None, f"a {name} tensor whose content has {len(content)} bytes"
        if element_format is None:
            return _bfloat16(int.from_bytes(content, "little")), ""
        return float(struct.unpack(element_format, content)[0]), ""
    values = [value for number, wire_type, packed in repeated if number == field_number
              for value in _repeated(wire_type, packed, field_number)]
    if len(values) != 1:
        return None, f"a {name} tensor with {len(values)} values"
    value = values[0]
    if dtype == 19:
        return float(struct.unpack("<e", (value & 0xFFFF).to_bytes(2, "little"))[0]), ""
    if dtype == 14:
        return _bfloat16(value & 0xFFFF), ""
    if field_number in (7, 10):
        value = _signed64(value)
    return float(value), ""


def _repeated(wire_type: int, value: int | memoryview, field_number: int) -> list:
    """Decode a repeated numeric field, packed (one length-delimited run) or not."""
    unpacked_type = {5: _FIXED32, 6: _FIXED64}.get(field_number, _VARINT)
    if wire_type not in (_LENGTH_DELIMITED, unpacked_type):
        raise _WireError(f"TensorProto field {field_number} has the wire type {wire_type}")
    if field_number in (5, 6):
        element = "<f" if field_number == 5 else "<d"
        if wire_type == _LENGTH_DELIMITED:
            if len(value) % struct.calcsize(element):
                raise _WireError(f"packed field {field_number} has a partial element")
            return [item for (item,) in struct.iter_unpack(element, value)]
        return [struct.unpack(element, value)[0]]
    if wire_type == _LENGTH_DELIMITED:
        items, position = [], 0
        while position < len(value):
            item, position = _varint(value, position)
            items.append(item)
        return items
    return [value]


def _shape(data: memoryview) -> list[int]:
    """Return the dimension sizes of a TensorShapeProto (field 2: repeated Dim, size = 1)."""
    dims = []
    for number, wire_type, value in _fields(data):
        if number == 2 and wire_type == _LENGTH_DELIMITED:
            size = 0
            for inner, inner_type, inner_value in _fields(value):
                if inner == 1 and inner_type == _VARINT:
                    size = _signed64(inner_value)
            dims.append(size)
    return dims


def _bfloat16(bits: int) -> float:
    return struct.unpack("<f", (bits << 16).to_bytes(4, "little"))[0]
