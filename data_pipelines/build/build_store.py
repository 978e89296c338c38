"""Where finished builds live and how they are replaced: build keys, staging folders, publishing.

A build is written into a staging folder `<data_dir>/.staging/<name>.<pid>.<random>/` and moved to its
place only after it succeeded; the old build (if any) is removed only after that move. A finished
build holds `build_key.json`, written last, before the move: a folder without it (a build killed
before the move can leave none, but an older version of this code could) is never taken as finished.
Staging folders of processes that are gone are removed when the next build of that name starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Iterable, Mapping, Sequence

from data_pipelines.build.annotation_rows import VideoText

KEY_FILE = "build_key.json"
STAGING = ".staging"


def file_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the names' order and the bytes of the files (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(b"\0file\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def media_listing_digest(media_dir: str | os.PathLike) -> str:
    """sha256 over the sorted (relative path, size) of every file under `media_dir`."""
    root = os.fspath(media_dir)
    entries = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                size = os.path.getsize(path)
            except OSError:
                size = -1
            entries.append(f"{os.path.relpath(path, root)}\t{size}")
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    return f"{digest.hexdigest()} ({len(entries)} files)"


def records_digest(records: Mapping[str, Sequence[VideoText]]) -> str:
    """sha256 of the records of every split (for builds whose records are not read from files)."""
    digest = hashlib.sha256()
    for split in sorted(records):
        for r in records[split]:
            row = [split, r.video, list(r.captions), r.extra]
            digest.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def build_key(annotations: str, media_dir: str | os.PathLike, settings: Mapping[str, str],
              splits: Iterable[str]) -> dict[str, str]:
    """What determines a build: its annotations (file or record digest), media listing, splits, settings."""
    return {"annotations": annotations, "media": media_listing_digest(media_dir), "splits": ",".join(sorted(splits)),
            **settings}


def key_difference(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """The components two build keys differ in, as 'component: old -> new; ...'."""
    names = sorted(set(old) | set(new))
    return "; ".join(f"{n}: {old.get(n, '(none)')} -> {new.get(n, '(none)')}" for n in names
                     if old.get(n) != new.get(n))


def finished_key(version_dir: str | os.PathLike) -> dict | None:
    """The build key of a finished build in `version_dir`, or None when it holds none."""
    folder = pathlib.Path(version_dir)
    try:
        key = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return key if (folder / "dataset_info.json").is_file() and isinstance(key, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(data_dir: str | os.PathLike, name: str) -> list[pathlib.Path]:
    """Removes staging folders of builds of `name` whose process is gone; returns what it removed."""
    removed = []
    for folder in sorted((pathlib.Path(data_dir) / STAGING).glob(f"{name}.*.*")):
        pid = folder.name[len(name) + 1:].split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def new_staging(data_dir: str | os.PathLike, name: str) -> pathlib.Path:
    """A fresh staging folder for a build of `name` by this process."""
    folder = pathlib.Path(data_dir) / STAGING / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def publish(staged: pathlib.Path, target: pathlib.Path, key: Mapping[str, str]) -> None:
    """Writes the key into the staged build, then moves it to `target`, replacing an older build there.

    The older build is moved aside first and deleted only after the new one is in place.
    """
    (staged / KEY_FILE).write_text(json.dumps(dict(key), indent=1, sort_keys=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if target.exists():
        aside = target.with_name(f"{target.name}.replaced.{uuid.uuid4().hex[:8]}")
        os.rename(target, aside)
    os.rename(staged, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
