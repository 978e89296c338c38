"""Damaged dataset records: located to shard and byte range, one `error:` line from train and eval (exit 2),
skipped and counted with `data.skip_damaged_records`, and listed by `prepare --verify` (exit 1)."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from data_pipelines.build import built_splits
from data_pipelines.build.damaged_records import CheckedRecords, DamagedRecordsError, records_skipped

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARD = "clover_video_text-{split}.array_record-00000-of-00001"


def flip_bytes(path: pathlib.Path, offset: int, length: int = 64) -> None:
    """Inverts `length` bytes of `path` at `offset` (a disk or bucket that flips bits)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def damaged_ids(folder: pathlib.Path, split: str) -> list[int]:
    """Record ids that fail to read, one by one (the reference for what the checks report)."""
    source = built_splits.open_source(folder, split)
    bad = []
    for i in range(len(source)):
        try:
            source[i]
        except RuntimeError:
            bad.append(i)
    return bad


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, cli_env):
    """A copy of the `:tiny` synthetic dataset with bytes flipped inside one chunk of its training shard."""
    from clover_jax import run_inputs
    from configs import pretrain

    config = pretrain.get_config("tiny")
    config.data.cache_dir = cli_env["CLOVER_TEST_DATA_CACHE"]
    clean = pathlib.Path(run_inputs.resolve_dataset("synthetic", config.data))
    copy = tmp_path_factory.mktemp("damaged") / "1.0.0"
    shutil.copytree(clean, copy)
    shard = copy / SHARD.format(split="train")
    shutil.copy(shard, copy.parent.parent / "clean_train_shard")
    flip_bytes(shard, shard.stat().st_size // 4)
    bad = damaged_ids(copy, "train")
    assert bad, "the flipped bytes must land inside a record chunk"
    return copy, bad


def test_checked_records_name_the_shard_and_bytes_and_skip_only_when_asked(damaged):
    folder, bad = damaged
    source = built_splits.open_source(folder, "train")
    with pytest.raises(DamagedRecordsError) as err:
        CheckedRecords(source, str(folder), "train").read(list(range(len(source))))
    text = str(err.value)
    assert SHARD.format(split="train") in text and "bytes " in text and "split 'train'" in text
    assert f"--verify {folder}" in text and "skip_damaged_records=true" in text
    assert "\n" not in text

    before = records_skipped()
    skipping = CheckedRecords(source, str(folder), "train", skip=True, max_fraction=0.5)
    records = skipping.read(list(range(len(source))))
    assert [i for i, r in enumerate(records) if r is None] == bad
    assert records_skipped() - before == len(bad)
    with pytest.raises(DamagedRecordsError) as err:  # single reads (evaluation) never skip
        skipping[bad[0]]
    assert "skip_damaged_records" not in str(err.value)
    with pytest.raises(DamagedRecordsError, match="more than data.max_damaged_fraction=0.01"):
        CheckedRecords(source, str(folder), "train", skip=True, max_fraction=0.01).read(bad)


def test_prepare_verify_lists_every_damaged_record_and_exits_1(damaged, tmp_path, capsys):
    from clover_jax import prepare

    folder, bad = damaged
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean)
    (clean / SHARD.format(split="train")).unlink()
    shutil.copy(folder.parent.parent / "clean_train_shard", clean / SHARD.format(split="train"))
    assert prepare.main(["--verify", str(clean), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 24 records in 1 shard, all read and decoded" in out and f"{clean}: clean" in out

    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    (copy / SHARD.format(split="test")).unlink()  # a lost shard: every record of it
    assert prepare.main(["--verify", str(copy)]) == 1
    out = capsys.readouterr().out
    train_line = next(line for line in out.splitlines() if line.startswith("train:"))
    assert f"{len(bad)} lost in 1 damaged range" in train_line
    detail = next(line for line in out.splitlines() if line.startswith("  damaged: " + SHARD.format(split="train")))
    ids = ", ".join(map(str, bad)) if len(bad) == 1 else f"{bad[0]}-{bad[-1]}"
    assert "bytes " in detail and f"({'record' if len(bad) == 1 else 'records'} {ids})" in detail
    assert "  damaged: " + SHARD.format(split="test") + " the whole file (records 0-15)" in out
    assert "DAMAGED" in out
    # The same check as a Beam pipeline (one element per shard) finds the same.
    assert prepare.main(["--verify", str(copy), "--runner", "direct", "--workers", "2"]) == 1
    assert capsys.readouterr().out == out


def _train(cli_env, workdir, folder, *extra):
    args = [sys.executable, "-m", "clover_jax.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
            f"--config.data.sources.synthetic.dataset={folder}", f"--config.eval.dataset={folder}",
            "--config.log_every=1", *extra]
    return subprocess.run(args, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_train_stops_in_one_line_skips_when_asked_and_eval_never_skips(damaged, cli_env, tmp_path):
    folder, bad = damaged
    stopped = _train(cli_env, tmp_path / "stopped", folder)
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    errors = _error_lines(stopped.stderr)
    assert len(errors) == 1, stopped.stderr[-2000:]
    assert str(folder) in errors[0] and "split 'train'" in errors[0]
    assert SHARD.format(split="train") in errors[0] and "bytes " in errors[0] and "--verify" in errors[0]
    assert "Traceback" not in stopped.stderr

    workdir = tmp_path / "skipping"
    skipped = _train(cli_env, workdir, folder, "--config.data.skip_damaged_records=true",
                     "--config.data.max_damaged_fraction=0.2")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["damaged_records"] == len(bad)
    assert f"damaged_records={len(bad)}" in skipped.stdout

    test_shard = folder / SHARD.format(split="test")
    flip_bytes(test_shard, test_shard.stat().st_size // 4)
    assert damaged_ids(folder, "test")
    evaluated = subprocess.run([sys.executable, "-m", "clover_jax.eval", f"--workdir={workdir}"], cwd=REPO,
                               env=cli_env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 2, evaluated.stderr[-2000:]
    errors = _error_lines(evaluated.stderr)
    assert len(errors) == 1 and "split 'test'" in errors[0] and "skip_damaged_records" not in errors[0]
