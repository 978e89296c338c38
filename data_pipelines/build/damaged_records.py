"""Damaged records of a built split: which shard file, byte range and records a failed checksum loses.

ArrayRecord (Riegeli) stores records in checksummed chunks; a flipped bit makes every read of that chunk
fail with `RuntimeError: Corrupted Riegeli/records file: chunk data hash mismatch …, chunk at X with length
Y`. `CheckedRecords` wraps a split's random-access source: a failed batch read is retried record by
record, so only the records of the damaged chunk are lost, and each loss is located (shard file, byte
range, record ids). Training may skip them (`skip=True`, up to `max_fraction` of the split); evaluation and
`prepare --verify` never do. `DamagedRecordsError` is the one-line report.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from typing import Any, Sequence

# The repair advice every report ends with (`python -m clover_jax.prepare --verify` lists every damaged record).
REPAIR = ("list every damaged record with `python -m clover_jax.prepare --verify {folder}`; rebuild it with the "
          "`python -m clover_jax.prepare` command that made it plus --overwrite")
SKIP_ADVICE = ", or let training skip damaged chunks with --config.data.skip_damaged_records=true"


@dataclasses.dataclass(frozen=True)
class DamagedRange:
    """Records lost to one damaged chunk (or a whole unreadable shard: byte_range None)."""

    shard: str  # the shard file's path
    byte_range: tuple[int, int] | None  # [start, end) of the damaged chunk in that file
    records: tuple[int, ...]  # split-wide record ids
    reason: str  # the reader's message, one line

    def describe(self) -> str:
        where = f"bytes {self.byte_range[0]}-{self.byte_range[1]}" if self.byte_range else "the whole file"
        return f"{os.path.basename(self.shard)} {where} ({_id_ranges(self.records)})"


class DamagedRecordsError(RuntimeError):
    """Records of a built split failed their checksum (one line: folder, split, shard, bytes, advice, and the
    step training saved before stopping)."""

    def __str__(self) -> str:
        saved = f"; step {self.saved_step} is saved and the same command resumes there" if self.saved_step else ""
        return super().__str__() + saved

    def __init__(self, folder: str, split: str, damaged: Sequence[DamagedRange], *, skippable: bool = True,
                 limit: str = ""):
        self.folder, self.split, self.damaged = str(folder), split, tuple(damaged)
        self.saved_step: int | None = None  # set by training once it has saved the steps done before the damage
        ranges = "; ".join(d.describe() for d in self.damaged[:3])
        more = f"; and {len(self.damaged) - 3} more damaged ranges" if len(self.damaged) > 3 else ""
        lead = limit or "damaged records"
        super().__init__(f"{lead} in {self.folder} split {split!r}: {ranges}{more}: "
                         f"{REPAIR.format(folder=self.folder)}{SKIP_ADVICE if skippable else ''}")


def is_damage(err: BaseException) -> bool:
    """Whether a reader error means damaged bytes (a checksum, framing or truncation failure)."""
    text = str(err)
    return isinstance(err, (RuntimeError, OSError)) and any(
        marker in text for marker in ("Corrupted", "Riegeli", "hash mismatch", "DATA_LOSS", "Truncated", "truncated",
                                      "Failed to read", "ArrayRecord"))


def read_or_reason(source: Any, key: int) -> tuple[bytes | None, str]:
    """(record `key`, "") or, when its chunk is damaged, (None, the reader's message on one line)."""
    try:
        return source[key], ""
    except Exception as err:  # noqa: BLE001 - only reader damage is answered; anything else re-raises
        if not is_damage(err):
            raise
        return None, " ".join(str(err).split())


def byte_range_of(message: str) -> tuple[int, int] | None:
    """[start, end) of the damaged chunk named in a Riegeli error message, or the one byte it names."""
    chunk = re.search(r"chunk at (\d+) with length (\d+)", message)
    if chunk:
        start = int(chunk.group(1))
        return start, start + int(chunk.group(2))
    at = re.search(r"at (?:byte|position) (\d+)", message)
    return (int(at.group(1)), int(at.group(1)) + 1) if at else None


def _id_ranges(ids: Sequence[int]) -> str:
    """'records 4-7, 12' for sorted ids."""
    ids = sorted(ids)
    parts, start = [], None
    for i, r in enumerate(ids):
        if start is None:
            start = r
        if i + 1 == len(ids) or ids[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ("record " if len(ids) == 1 else "records ") + ", ".join(parts) if ids else "no record"


def _shard_and_position(source: Any, key: int) -> tuple[str, int]:
    """(shard file, position in it) of split-wide record `key` of an ArrayRecordDataSource."""
    locate = getattr(source, "_reader_idx_and_position", None)
    if locate is None:
        return "?", key
    reader, position = locate(key)
    return str(source._read_instructions[reader].filename), position  # noqa: SLF001 - no public mapping


# Damage located in this process, per (folder, split), and the records training skipped (its count, summed
# over the sources it reads).
_lost: dict[tuple[str, str], dict[int, DamagedRange]] = {}
_skipped: dict[tuple[str, str], set[int]] = {}
# The last damage that stopped a read: tf.data re-raises a generator's error as text, so the pipeline's
# consumer finds the structured error here (`failure_behind`).
_failures: list[DamagedRecordsError] = []
_lock = threading.Lock()


def records_skipped() -> int:
    """Records this process has skipped as damaged, over every split it trains on."""
    with _lock:
        return sum(len(v) for v in _skipped.values())


def failure_behind(err: BaseException) -> DamagedRecordsError | None:
    """The `DamagedRecordsError` behind `err` (itself, or the one a tf.data generator raised), else None."""
    if isinstance(err, DamagedRecordsError):
        return err
    with _lock:
        if _failures and "DamagedRecordsError" in str(err):
            return _failures[-1]
    return None


class CheckedRecords:
    """A split's random-access records whose damaged chunks are located and reported (or skipped)."""

    def __init__(self, source: Any, folder: str, split: str, skip: bool = False, max_fraction: float = 0.0):
        self.source, self.folder, self.split = source, str(folder), split
        self.skip, self.max_fraction = skip, max_fraction
        with _lock:
            self.lost = _lost.setdefault((self.folder, split), {})
            self.skipped = _skipped.setdefault((self.folder, split), set())

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> bytes:
        """One record; a damaged one always raises (evaluation needs the whole set)."""
        record = self._read_one(int(key))
        if record is None:
            self._raise([self.lost[int(key)]], skippable=False)
        return record

    def read(self, keys: Sequence[int]) -> list[bytes | None]:
        """Records `keys`; a damaged one raises, or with `skip` reads None (and is counted)."""
        try:
            return list(self.source.__getitems__([int(k) for k in keys]))
        except Exception as err:  # noqa: BLE001 - only reader damage is handled; the rest re-raises below
            if not is_damage(err):
                raise
        records = [self._read_one(int(k)) for k in keys]
        damaged = [self.lost[int(k)] for k, r in zip(keys, records) if r is None]
        if damaged and not self.skip:
            self._raise(damaged)
        with _lock:
            self.skipped.update(int(k) for k, r in zip(keys, records) if r is None)
        if len(self.skipped) > self.max_fraction * len(self):
            self._raise([self.lost[k] for k in sorted(self.skipped)],
                        limit=f"{len(self.skipped)} damaged records (more than "
                              f"data.max_damaged_fraction={self.max_fraction:g} of {len(self)})")
        return records

    def _read_one(self, key: int) -> bytes | None:
        if key in self.lost:
            return None
        record, reason = read_or_reason(self.source, key)
        if record is None:
            shard, _ = _shard_and_position(self.source, key)
            with _lock:
                self.lost[key] = DamagedRange(shard, byte_range_of(reason), (key,), reason)
        return record

    def _raise(self, damaged: list[DamagedRange], skippable: bool = True, limit: str = "") -> None:
        error = DamagedRecordsError(self.folder, self.split, merge_ranges(damaged), skippable=skippable, limit=limit)
        with _lock:
            _failures.append(error)
        raise error


def merge_ranges(damaged: Sequence[DamagedRange]) -> list[DamagedRange]:
    """One DamagedRange per (shard, byte range), its records merged, in file order."""
    merged: dict[tuple[str, tuple[int, int] | None], DamagedRange] = {}
    for d in damaged:
        key = (d.shard, d.byte_range)
        old = merged.get(key)
        merged[key] = d if old is None else dataclasses.replace(old, records=tuple(sorted({*old.records, *d.records})))
    return sorted(merged.values(), key=lambda d: (d.shard, d.byte_range or (-1, -1), d.records))
