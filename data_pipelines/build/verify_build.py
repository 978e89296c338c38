"""`prepare --verify`: every record of every split of a finished build read with its checksums and decoded.

One task per shard file (from the build's own shard lengths, so a shard that no longer opens still accounts
for its records): its records are read in blocks, a block that fails is read again record by record to find
the damaged chunks (`damaged_records`), and every readable record is decoded feature by feature, frames
included. Shards run on threads, or as an Apache Beam pipeline for a large build (`runner`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Callable, Iterator

from data_pipelines.build.damaged_records import DamagedRange, byte_range_of, is_damage, merge_ranges

BLOCK = 64  # records read per call


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard file of a split and where its records sit in the split's numbering."""

    folder: str
    split: str
    path: str
    first_id: int
    num_records: int


@dataclasses.dataclass
class ShardReport:
    """What reading and decoding one shard found."""

    task: ShardTask
    read: int = 0  # records that passed their checksum
    damaged: list[DamagedRange] = dataclasses.field(default_factory=list)
    undecodable: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (record id, reason)


def shard_tasks(folder: str | os.PathLike) -> list[ShardTask]:
    """The shard files of every split of the build in `folder`, in split and file order."""
    from data_pipelines.build.built_splits import load_builder

    info = load_builder(folder).info
    tasks = []
    for split, split_info in sorted(info.splits.items()):
        first = 0
        for path, length in zip(split_info.filepaths, split_info.shard_lengths):
            tasks.append(ShardTask(str(folder), split, os.fspath(path), first, int(length)))
            first += int(length)
    return tasks


def _records(task: ShardTask, report: ShardReport) -> Iterator[tuple[int, bytes]]:
    """(record id, bytes) of every record of the shard that reads; damage goes into `report`."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(task.path, options="readahead_buffer_size:0")
        if reader.num_records() != task.num_records:
            raise RuntimeError(f"Truncated shard: it holds {reader.num_records()} records, the build wrote "
                               f"{task.num_records}")
    except Exception as err:  # noqa: BLE001 - a missing or unopenable shard loses all its records
        if not (is_damage(err) or isinstance(err, (OSError, ValueError))):
            raise
        ids = tuple(range(task.first_id, task.first_id + task.num_records))
        report.damaged.append(DamagedRange(task.path, None, ids, " ".join(str(err).split())))
        return
    try:
        for start in range(0, task.num_records, BLOCK):
            positions = list(range(start, min(start + BLOCK, task.num_records)))
            try:
                block = list(zip(positions, reader.read(positions)))
            except Exception as err:  # noqa: BLE001
                if not is_damage(err):
                    raise
                block = []
                for position in positions:
                    try:
                        block.append((position, reader.read([position])[0]))
                    except Exception as one:  # noqa: BLE001
                        if not is_damage(one):
                            raise
                        reason = " ".join(str(one).split())
                        report.damaged.append(DamagedRange(task.path, byte_range_of(reason),
                                                           (task.first_id + position,), reason))
            for position, record in block:
                report.read += 1
                yield task.first_id + position, record
    finally:
        reader.close()


def verify_shard(task: ShardTask, decode: bool = True, progress: Callable[[int], None] | None = None) -> ShardReport:
    """Reads (and, with `decode`, decodes every feature of) every record of one shard."""
    report = ShardReport(task)
    features = None
    if decode:
        from data_pipelines.build.built_splits import load_builder

        features = load_builder(task.folder).info.features
    done = 0
    for record_id, record in _records(task, report):
        if features is not None:
            try:
                features.deserialize_example_np(record)  # parses every feature and decodes every JPEG frame
            except Exception as err:  # noqa: BLE001 - any parse or decode failure of a record that passed its checksum
                report.undecodable.append((record_id, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"))
        done += 1
        if progress is not None and done % BLOCK == 0:
            progress(BLOCK)
    if progress is not None:
        progress(task.num_records - done // BLOCK * BLOCK)
    report.damaged = merge_ranges(report.damaged)
    return report


def verify_build(folder: str | os.PathLike, workers: int = 1, decode: bool = True, show_progress: bool = True,
                 beam=None) -> list[ShardReport]:
    """Every shard of the build in `folder` verified, on `workers` threads or on Beam (`beam`: a
    `builder.BeamConfig`)."""
    tasks = shard_tasks(folder)
    if beam is not None:
        return _verify_on_beam(tasks, decode, beam)
    from tqdm import tqdm

    with tqdm(total=sum(t.num_records for t in tasks), desc="verify", unit="record", disable=not show_progress) as bar:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(lambda t: verify_shard(t, decode, bar.update), tasks))


def _to_json(report: ShardReport) -> str:
    return json.dumps({"task": dataclasses.asdict(report.task), "read": report.read,
                       "damaged": [dataclasses.asdict(d) for d in report.damaged],
                       "undecodable": report.undecodable})


def _from_json(line: str) -> ShardReport:
    d = json.loads(line)
    damaged = [DamagedRange(x["shard"], tuple(x["byte_range"]) if x["byte_range"] else None, tuple(x["records"]),
                            x["reason"]) for x in d["damaged"]]
    return ShardReport(ShardTask(**d["task"]), d["read"], damaged, [tuple(u) for u in d["undecodable"]])


def _verify_on_beam(tasks: list[ShardTask], decode: bool, beam_cfg) -> list[ShardReport]:
    """One Beam element per shard; the reports come back through JSON lines in a temporary folder."""
    import apache_beam as beam

    from data_pipelines.build import beam_build

    beam_build.let_local_workers_import_this_repo()
    with tempfile.TemporaryDirectory(prefix="clover_verify_") as tmp:
        out = pathlib.Path(tmp) / "reports"
        worker_log = pathlib.Path(tempfile.gettempdir()) / "clover_jax" / "logs" / "verify_beam_workers.log"
        with beam_build.stderr_to(worker_log), beam.Pipeline(options=beam_build.pipeline_options(beam_cfg)) as pipeline:
            _ = (pipeline | beam.Create(tasks) | beam.Reshuffle()
                 | beam.Map(lambda t: _to_json(verify_shard(t, decode))) | beam.io.WriteToText(str(out)))
        lines = [line for f in sorted(pathlib.Path(tmp).glob("reports*")) for line in f.read_text().splitlines()]
    order = {(t.split, t.path): i for i, t in enumerate(tasks)}
    return sorted((_from_json(line) for line in lines), key=lambda r: order[(r.task.split, r.task.path)])


def summary_lines(reports: list[ShardReport]) -> list[str]:
    """Per split: its record count and every damaged range and undecodable record."""
    lines = []
    for split in dict.fromkeys(r.task.split for r in reports):
        mine = [r for r in reports if r.task.split == split]
        total = sum(r.task.num_records for r in mine)
        damaged = [d for r in mine for d in r.damaged]
        undecodable = [u for r in mine for u in r.undecodable]
        lost = sum(len(d.records) for d in damaged)
        if not damaged and not undecodable:
            lines.append(f"{split}: {total} records in {_shards(len(mine))}, all read and decoded")
            continue
        lines.append(f"{split}: {total} records in {_shards(len(mine))}; {lost} lost in {len(damaged)} damaged "
                     f"range{'s' * (len(damaged) != 1)}, {len(undecodable)} undecodable")
        lines += [f"  damaged: {d.describe()}: {d.reason}" for d in damaged]
        lines += [f"  undecodable: record {i}: {why}" for i, why in undecodable]
    return lines


def _shards(n: int) -> str:
    return f"{n} shard{'s' * (n != 1)}"


def is_clean(reports: list[ShardReport]) -> bool:
    return not any(r.damaged or r.undecodable for r in reports)
