"""TensorBoard event files → kit runs (used by ``rlhfkit import tensorboard`` and ``rlhfkit import openrlhf``).

Event files are read record by record here (TFRecord framing, both checksums verified, ``Event`` protos parsed
with TensorBoard's own ``event_pb2``), not through ``EventAccumulator``, because that one stops silently at
the first bad record and cannot tell a foreign file from an empty one. So: a file whose first record fails its
checksum is "not a TensorBoard event file" (random bytes, zeros, ``/etc/passwd``); a record that fails later is
skipped and counted, and reading goes on from the next valid record; a truncated last record is counted once
the source is final (while following it is the writer's half-written record). Scalars are read from
``simple_value`` (TF1, ``torch.utils.tensorboard``) and from single-value tensors whose summary metadata names
the ``scalars`` plugin (TF2 / Keras ``tf.summary.scalar``, ``tensorboard.summary.Writer``); every value is
kept (no reservoir sampling) and grouped by step. While following a run that is still being written, the
newest step is held back until a later step appears (its tags may still be arriving); the rest is written
once. A value that shows up for a step already written is kept as a ``late_values`` event rather than dropped.
"""
from __future__ import annotations

import functools
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core.runformat.run_reader import file_problem, summarize

from .convert import Mapper, SourceError, StepSink, drive_import, nothing_imported, open_writer

EVENT_GLOB = "events.out.tfevents.*"
MAX_RECORD_BYTES = 256 << 20  # a length field above this is corruption, never a record to allocate
RESYNC_BYTES = 4 << 20  # after a corrupt header, how far to look for the next valid record


def _tensorboard() -> Any:
    """TensorBoard's protos and helpers (the ``[tensorboard]`` extra); missing is a one-line SourceError."""
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
        from tensorboard.util import tensor_util
    except ImportError as err:
        raise SourceError(f"reading TensorBoard files needs the tensorboard package (pip install -e .[tensorboard]): "
                          f"{err}") from None
    return event_pb2, masked_crc32c, tensor_util


def _masked_crc(data: bytes) -> int:
    return _tensorboard()[1](data)


@functools.lru_cache(maxsize=4096)  # 8-byte length fields repeat (and a run of zeros is one value): cache those only
def _length_crc(length_field: bytes) -> int:
    return _masked_crc(length_field)


def _header_ok(header: bytes) -> bool:
    return _length_crc(header[:8]) == struct.unpack("<I", header[8:12])[0]


def find_event_dir(path: str | os.PathLike) -> Path | None:
    """The one folder under ``path`` holding event files (``path`` itself may be one file); None if none yet."""
    path = Path(path)
    why = file_problem(path)
    if why == "missing":
        return None
    if why is None:
        return path
    if why != "a directory":
        raise SourceError(f"{path}: is {why}, not a TensorBoard folder or event file")
    try:
        dirs = sorted({p.parent for p in path.rglob(EVENT_GLOB)})
    except OSError as err:
        raise SourceError(f"{path}: cannot list ({err.strerror or err})") from None
    if len(dirs) > 1:
        names = ", ".join(str(d.relative_to(path)) or "." for d in dirs[:5])
        raise SourceError(f"{path} holds {len(dirs)} TensorBoard runs ({names}); pass the folder of one of them")
    return dirs[0] if dirs else None


@dataclass
class EventFile:
    """One event file read incrementally: complete, checksum-verified records only; the rest is counted."""

    path: Path
    offset: int = 0
    records: int = 0
    bad_records: int = 0  # failed a checksum or did not parse: skipped
    tail_bytes: int = 0  # an incomplete record at the end (the writer's, while it still writes)
    foreign: bool = False  # the first record fails its checksum: not an event file at all
    unreadable: str | None = None

    def read(self) -> Iterator[Any]:
        """The Event protos appended since the last read."""
        event_pb2 = _tensorboard()[0]
        if self.foreign:
            return
        why = file_problem(self.path)
        self.unreadable = None if why is None else why
        if why is not None:
            return
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(self.offset)
                pos = self.offset
                while pos + 12 <= size:
                    at_start = pos == 0
                    header = fh.read(12)
                    if len(header) < 12:
                        break
                    length = struct.unpack("<Q", header[:8])[0]
                    if length > MAX_RECORD_BYTES or not _header_ok(header):
                        if at_start:  # the very first record: this is not TensorBoard data
                            self.foreign = True
                            return
                        self.bad_records += 1
                        pos = self._resync(fh, pos + 1, size)
                        fh.seek(pos)
                        continue
                    if pos + 12 + length + 4 > size:
                        break  # incomplete: the writer is mid-record, or the file was cut
                    body = fh.read(length + 4)
                    pos += 12 + length + 4
                    data = body[:length]
                    if _masked_crc(data) != struct.unpack("<I", body[length:])[0]:
                        if at_start:
                            self.foreign = True
                            return
                        self.bad_records += 1
                        continue
                    try:
                        event = event_pb2.Event.FromString(data)
                    except Exception:  # noqa: BLE001 - protobuf's DecodeError; a bad record is counted, not fatal
                        self.bad_records += 1
                        continue
                    self.records += 1
                    self.offset = pos
                    yield event
                self.offset = pos
                self.tail_bytes = size - pos
        except OSError as err:
            self.unreadable = f"not readable ({err.strerror or err})"

    def _resync(self, fh: Any, start: int, size: int) -> int:
        """The offset of the next plausible record header after ``start`` (or the end of the file)."""
        fh.seek(start)
        window = fh.read(min(RESYNC_BYTES, size - start))
        for i in range(len(window) - 11):
            length = struct.unpack_from("<Q", window, i)[0]
            if length <= MAX_RECORD_BYTES and start + i + 16 + length <= size and _header_ok(window[i:i + 12]):
                return start + i
        return start + len(window) if start + len(window) < size else size


class ScalarReader:
    """All scalars of one event folder (or file) by step; re-reading picks up what was appended since."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[Path, EventFile] = {}
        self.by_step: dict[int, dict[str, float]] = {}
        self.plugin: dict[str, str] = {}  # tag -> plugin named in its first summary metadata (TF2 writes it once)
        self.final = False

    def _paths(self) -> list[Path]:
        if file_problem(self.path) is None:
            return [self.path]
        try:
            return sorted(self.path.glob(EVENT_GLOB))
        except OSError:
            return []

    def read(self, final: bool = False) -> dict[int, dict[str, float]]:
        """Every scalar read so far, by step; ``final``: the source is done, an incomplete tail is lost."""
        tensor_util = _tensorboard()[2]
        self.final = self.final or final
        for p in self._paths():
            ef = self.files.setdefault(p, EventFile(p))
            for event in ef.read():
                if not event.HasField("summary"):
                    continue
                step = int(event.step)
                for v in event.summary.value:
                    if v.HasField("metadata") and v.metadata.plugin_data.plugin_name:
                        self.plugin.setdefault(v.tag, v.metadata.plugin_data.plugin_name)
                    kind = v.WhichOneof("value")
                    if kind == "simple_value":
                        value = float(v.simple_value)
                    elif kind == "tensor" and self.plugin.get(v.tag) == "scalars":
                        try:
                            arr = tensor_util.make_ndarray(v.tensor)
                        except Exception:  # noqa: BLE001 - a malformed tensor is one bad value
                            ef.bad_records += 1
                            continue
                        if arr.size != 1 or arr.dtype.kind not in "fiub":
                            continue
                        value = float(arr.reshape(-1)[0])
                    else:
                        continue
                    self.by_step.setdefault(step, {})[v.tag] = value
        return self.by_step

    @property
    def unreadable_records(self) -> int:
        """Records that could not be read: failed checksums, unparsable, and a truncated last one when final."""
        return sum(f.bad_records + (1 if self.final and f.tail_bytes else 0) for f in self.files.values())

    def problems(self) -> list[str]:
        """One line per file that could not be read in full."""
        out = []
        for f in self.files.values():
            if f.foreign:
                out.append(f"{f.path}: not a TensorBoard event file (its first record fails the TFRecord checksum)")
            elif self.final and not f.records and not f.bad_records and f.tail_bytes and not f.offset:
                out.append(f"{f.path}: not a TensorBoard event file ({f.tail_bytes} bytes, not one complete record)")
            elif f.unreadable:
                out.append(f"{f.path}: is {f.unreadable}; not read")
            else:
                lost = f.bad_records + (1 if self.final and f.tail_bytes else 0)
                if lost:
                    tail = (f" (a truncated record of {f.tail_bytes} bytes at the end)"
                            if self.final and f.tail_bytes else "")
                    out.append(f"{f.path}: {lost} record(s) could not be read{tail}; {f.records} read")
        return out

    def why_empty(self) -> str:
        """Why nothing was imported, in one line: the first file problem, else what was read."""
        problems = self.problems()
        if problems and len(problems) == 1:
            return problems[0]
        if problems:
            return f"{problems[0]} (and {len(problems) - 1} more file problem(s))"
        records = sum(f.records for f in self.files.values())
        return (f"{self.path}: no scalar values in {records} TensorBoard record(s) of {len(self.files)} file(s) "
                "(only text, images, histograms or nothing yet)")


class _TensorBoardPoll:
    def __init__(self, src: Path, sink: StepSink, reader: ScalarReader | None = None):
        self.src, self.sink = src, sink
        self.reader = reader
        self.seen_tags: dict[int, set[str]] = {}
        self.late = 0

    def __call__(self, final: bool) -> int:
        if self.reader is None:
            event_dir = find_event_dir(self.src)
            if event_dir is None:
                return 0
            self.reader = ScalarReader(event_dir)
        by_step = self.reader.read(final)
        if not by_step:
            return 0
        newest = max(by_step)
        last = self.sink.last_step
        ready = {s: v for s, v in by_step.items() if (last is None or s > last) and (final or s < newest)}
        wrote = 0
        for step in sorted(ready):
            if self.sink.write(step, ready[step]):
                self.seen_tags[step] = set(ready[step])
                wrote += 1
        wrote += self._late_values(by_step)
        return wrote

    def _late_values(self, by_step: Mapping[int, Mapping[str, float]]) -> int:
        count = 0
        for step, tags in self.seen_tags.items():
            extra = {t: v for t, v in by_step.get(step, {}).items() if t not in tags}
            if extra:
                self.sink.writer.event(step, "late_values", message=f"{len(extra)} value(s) arrived after step "
                                       f"{step} was written", data=self.sink.mapper(extra))
                tags.update(extra)
                self.late += len(extra)
                count += 1
        return count


def import_tensorboard(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mapper: Mapper,
    source: str = "tensorboard",
    config: Mapping[str, Any] | None = None,
    follow_run: bool = False,
    interval_s: float = 2.0,
    max_idle_s: float = 60.0,
    overwrite: bool = False,
    resume: bool = False,
    alerts: bool = True,
) -> dict[str, Any]:
    """Convert (or keep converting, with ``follow_run``) the scalars under ``src`` into the run ``out``.

    Without ``follow_run`` the source is read before anything is written: no event file, or no scalar in
    them, is a :class:`SourceError` and no run is created. With it, the import waits for data and fails the
    same way only when none arrived before ``max_idle_s``. Records that could not be read are a warning and
    ``unreadable_records`` in the summary."""
    src = Path(src)
    event_dir = find_event_dir(src)
    reader = None
    if not follow_run:
        if event_dir is None:
            raise SourceError(f"{src}: no TensorBoard event files ({EVENT_GLOB}) found")
        reader = ScalarReader(event_dir)
        if not reader.read(final=True):
            raise SourceError(reader.why_empty())
    cfg = {"imported_from": os.path.realpath(src), **dict(config or {})}
    writer, start_after = open_writer(out, source=source, config=cfg, overwrite=overwrite, resume=resume)
    sink = StepSink(writer, mapper, alerts=alerts, start_after=start_after)
    poll = _TensorBoardPoll(src, sink, reader)
    summary = drive_import(writer, sink, poll, follow_run=follow_run, interval_s=interval_s, max_idle_s=max_idle_s,
                           extra=lambda: {"late_values": poll.late, "unreadable_records":
                                          poll.reader.unreadable_records if poll.reader else 0})
    if poll.reader is not None:
        for problem in summarize(poll.reader.problems()):
            print(f"rlhfkit import: warning: {problem}", file=sys.stderr)
    if nothing_imported(summary):
        why = poll.reader.why_empty() if poll.reader else f"{src}: no TensorBoard event files ({EVENT_GLOB})"
        raise SourceError(f"no steps arrived before --max-idle ({why}); {out} holds none")
    return summary
