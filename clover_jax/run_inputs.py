"""A run's inputs from its config (`config.data`, `config.eval`): dataset folders, input configs, QA items.

A dataset entry is either "synthetic" (the built-in procedural dataset, generated and built on first
use under `config.data.cache_dir`) or the folder printed by `python -m clover_jax.prepare`.
"""
from __future__ import annotations

import itertools
import os
import pathlib
from typing import Any, Iterator

import numpy as np
from ml_collections import ConfigDict

from clover_jax.tasks import QA_TASKS
from data_pipelines.build import built_splits
from data_pipelines.input import qa_tasks
from data_pipelines.input.input_config import InputConfig, pixel_fields
from data_pipelines.input.mixtures import MixtureConfig, MixtureSource
from data_pipelines.input.qa_inputs import QAItems
from data_pipelines.input.text_masking import TextMaskingConfig
from data_pipelines.input.video_masking import BlockMaskConfig

SYNTHETIC = "synthetic"


def cache_dir(data_cfg: ConfigDict) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(data_cfg.cache_dir or "~/.cache/clover_jax")).absolute()


_barrier_ids = itertools.count()


def _wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Barrier of the distributed coordination service. Not a device collective
    (`multihost_utils.sync_global_devices`): on CPU that gives up when one process arrives 30 s after
    another (gloo's rendezvous deadline), and building a dataset takes longer."""
    import orbax.checkpoint as ocp

    # Every process calls this in the same order, so the counter gives each barrier one unique id.
    ocp.multihost.get_barrier_sync_fn()(key=f"clover_jax {name} {next(_barrier_ids)}", timeout_ms=timeout_s * 1000)


def resolve_dataset(name_or_folder: str, data_cfg: ConfigDict) -> str:
    """Dataset folder for a config entry; builds the synthetic dataset on first use."""
    if not name_or_folder:
        raise ValueError("no dataset given: set --config.data.dataset (a prepared folder or 'synthetic')")
    if name_or_folder == SYNTHETIC:
        from data_pipelines.build.synthetic import SyntheticConfig, build_synthetic

        syn = data_cfg.synthetic
        cfg = SyntheticConfig(seed=syn.seed, num_train=syn.num_train, num_test=syn.num_test,
                              num_frames=syn.num_frames, size=syn.size, captions_per_clip=syn.captions_per_clip)
        import jax

        # One process builds; multi-host runs need a shared cache_dir (the others wait at the barrier).
        folder = build_synthetic(cache_dir(data_cfg), cfg) if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            _wait_for_all_processes("synthetic dataset built")
            folder = build_synthetic(cache_dir(data_cfg), cfg)  # cached: only looks the folder up
        return str(folder)
    folder = pathlib.Path(os.path.expanduser(name_or_folder))
    if not folder.exists():
        raise FileNotFoundError(
            f"dataset folder {folder} does not exist: prepare it with `python -m clover_jax.prepare` "
            "and pass the folder it prints")
    return str(folder)


def _block_mask(data_cfg: ConfigDict) -> BlockMaskConfig:
    return BlockMaskConfig(grid=data_cfg.mask_grid, num_masked=data_cfg.mask_cells,
                           min_block=data_cfg.mask_min_block, fill=data_cfg.get("mask_fill", "exact"))


def _train_switches(data_cfg: ConfigDict) -> dict:
    """InputConfig fields of the issue-31 switches and the damaged-record policy (`.get`: configs saved before
    them keep the defaults)."""
    return dict(crop_sampler=data_cfg.get("crop_sampler", "tf_box"),
                train_crop=data_cfg.get("train_crop", "random_resized"),
                frame_sampling=data_cfg.get("frame_sampling", "segments"),
                epoch_unit=data_cfg.get("epoch_unit", "clip"), epoch_order=data_cfg.get("epoch_order", "reshuffle"),
                skip_damaged_records=data_cfg.get("skip_damaged_records", False),
                max_damaged_fraction=data_cfg.get("max_damaged_fraction", 0.01))


def pixel_stats_name(config: ConfigDict) -> str:
    """The concrete `config.pixel_stats` (entry points store it; "auto" is resolved from the config's
    resume / init_from here, see `clover_jax.pixel_stats`)."""
    from clover_jax import pixel_stats

    return pixel_stats.resolve(config)[0]


def train_input(data_cfg: ConfigDict, dataset: str, *, num_frames: int | None = None, seed_offset: int = 0,
                pixel_stats: str = "imagenet_rgb", resize_method: str = "bilinear") -> InputConfig:
    """InputConfig of the training stream of `dataset` (a resolved folder), normalised as `pixel_stats`."""
    text = TextMaskingConfig(max_length=data_cfg.text_length, mode=data_cfg.text_masking,
                             word_budget=data_cfg.get("word_budget", "words"),
                             random_ids=data_cfg.get("random_ids", "regular"))
    return InputConfig(
        dataset=dataset, split=data_cfg.split, batch_size=data_cfg.batch_size,
        num_frames=num_frames or data_cfg.num_frames, image_size=data_cfg.image_size,
        crop_area=tuple(data_cfg.crop_area), flip_prob=data_cfg.flip_prob, mask=_block_mask(data_cfg), text=text,
        seed=data_cfg.seed + seed_offset, prefetch=data_cfg.prefetch, resize_method=resize_method,
        **_train_switches(data_cfg), **pixel_fields(pixel_stats),
    )


def eval_input(eval_cfg: ConfigDict, data_cfg: ConfigDict, dataset: str,
               pixel_stats: str = "imagenet_rgb") -> InputConfig:
    """InputConfig of an evaluation pass (uniform frames, `eval_cfg.crop` "centre" or "squash", no masking),
    normalised as `pixel_stats`."""
    return InputConfig(
        dataset=dataset, split=eval_cfg.split, batch_size=eval_cfg.batch_size, num_frames=eval_cfg.num_frames,
        image_size=eval_cfg.image_size, eval_crop=eval_cfg.get("crop", "centre"), mask=_block_mask(data_cfg),
        text=TextMaskingConfig(max_length=eval_cfg.text_length, mode="none"), seed=data_cfg.seed, shuffle=False,
        **pixel_fields(pixel_stats),
    )


def train_mixture(data_cfg: ConfigDict, pixel_stats: str = "imagenet_rgb") -> MixtureConfig:
    """The training sources as a mixture (one source is a mixture of one). Each source entry of
    `config.data.sources` is {dataset, weight, num_frames (0 = data.num_frames)}; they take turns in the
    order `config.data.source_order` names (empty: sorted names). A source's stream (its seed) does not
    depend on the order."""
    names = sorted(data_cfg.sources)
    order = list(data_cfg.get("source_order", ())) or names
    if sorted(order) != names:
        raise ValueError(f"config.data.source_order={tuple(order)} must name each of config.data.sources "
                         f"{tuple(names)} once")
    sources = []
    for name in order:
        src = data_cfg.sources[name]
        folder = resolve_dataset(src.dataset, data_cfg)
        stream = train_input(data_cfg, folder, num_frames=src.num_frames or None, seed_offset=names.index(name),
                             pixel_stats=pixel_stats, resize_method=src.get("resize_method", "bilinear"))
        sources.append(MixtureSource(name, stream, src.weight))
    if not sources:
        raise ValueError("config.data.sources is empty: name at least one training dataset")
    return MixtureConfig(tuple(sources), mode=data_cfg.mixture_mode, seed=data_cfg.seed)


def captioned_clips(cfg: InputConfig) -> int:
    """What one training epoch of `cfg.split` visits: the clips that have a caption, or with
    `cfg.epoch_unit="caption"` every (clip, caption) pair."""
    from data_pipelines.build.built_splits import split_index
    from data_pipelines.input.input_pipeline import train_items

    return int(train_items(split_index(cfg.dataset, cfg.split).num_captions, cfg.epoch_unit)[0].size)


def qa_eval_input(config: ConfigDict) -> InputConfig:
    """InputConfig of a VideoQA evaluation pass: `eval_input` plus `config.eval.num_views` test views
    sampled as `config.eval.view_sampling`."""
    dataset = qa_clips_folder(config, config.eval.split)
    return eval_input(config.eval, config.data, dataset, pixel_stats_name(config)).replace(
        num_views=config.eval.get("num_views", 1), view_sampling=config.eval.get("view_sampling", "interleaved"))


def qa_clips_folder(config: ConfigDict, split: str) -> str:
    """The clips of a QA split: `config.qa.eval_dataset` for the eval split when set (a folder built by
    `prepare --format qa` holds one split), else `config.qa.dataset`."""
    name = (config.qa.get("eval_dataset", "") if split == config.eval.split else "") or config.qa.dataset
    if not name:
        raise ValueError("no QA clips given: set --config.qa.dataset to the folder printed by "
                         "`python -m clover_jax.prepare` (or 'synthetic')")
    return resolve_dataset(name, config.data)


def qa_items(config: ConfigDict, split: str, num_answers: int = 0) -> tuple[QAItems, dict[str, Any]]:
    """VideoQA items of `split` for `config.task` and facts for evaluation: info["answers"] and
    info["kinds"] per item (answer text, for multiple choice the true option; question kind),
    info["missing_kinds"] (questions whose clip is not in the split: scored wrong), and for open-ended
    tasks info["vocab"] and info["train_answers"] (for the majority baseline; may be empty).

    `config.qa.source` "synthetic" asks attribute questions about the synthetic clips; any other source
    of `data_pipelines.input.qa_tasks.SOURCE_TASKS` reads `config.qa.train_file` (for `config.data.split`) or
    `config.qa.eval_file` (for `config.eval.split`) and matches the questions to the clips of
    `qa_clips_folder` (prepared folders)."""
    if config.task not in QA_TASKS:
        raise ValueError(f"config.task={config.task!r} is not a QA task {QA_TASKS}")
    source = config.qa.get("source", SYNTHETIC)
    if source == SYNTHETIC:
        return _synthetic_qa_items(config, split, num_answers)
    return _annotated_qa_items(config, source, split, num_answers)


def _synthetic_qa_items(config: ConfigDict, split: str, num_answers: int) -> tuple[QAItems, dict[str, Any]]:
    from data_pipelines.build import synthetic_qa

    if config.task == "qa_fill_in_blank":
        raise ValueError("qa.source='synthetic' has no fill-in-the-blank questions; use qa_open_ended or "
                         "qa_multiple_choice, or qa.source='lsmdc_fib'")
    qa = config.qa
    folder = resolve_dataset(qa.dataset, config.data)
    attributes = synthetic_qa.clip_attributes(folder, split)
    if config.task == "qa_open_ended":
        if num_answers < 1:
            raise ValueError("open-ended QA needs model.overrides.num_answers >= 1 (the answer-vocabulary size)")
        train = synthetic_qa.open_ended_questions(synthetic_qa.clip_attributes(folder, config.data.split), qa.seed)
        vocab = qa_tasks.rank_answers([q.answer for q in train], num_answers)
        questions = synthetic_qa.open_ended_questions(attributes, qa.seed)
        ids, mask = synthetic_qa.encode_texts([q.question for q in questions], qa.text_length)
        answers = [q.answer for q in questions]
        items = QAItems(np.asarray([q.clip_index for q in questions], np.int32), ids, mask,
                        synthetic_qa.answer_indices(answers, vocab))
        return items, dict(answers=answers, kinds=[q.kind for q in questions], vocab=vocab,
                           train_answers=[q.answer for q in train], missing_kinds=[])
    per_clip = qa.get("mc_per_clip", 1) if split == config.data.split else 1
    questions = synthetic_qa.multiple_choice_questions(attributes, qa.seed, per_clip)
    k = synthetic_qa.NUM_OPTIONS
    texts = [synthetic_qa.mc_option_text(q.question, q.options, o, qa.mc_format) for q in questions for o in q.options]
    ids, mask = synthetic_qa.encode_texts(texts, qa.text_length)
    items = QAItems(np.asarray([q.clip_index for q in questions], np.int32), ids.reshape(len(questions), k, -1),
                    mask.reshape(len(questions), k, -1), np.asarray([q.answer_index for q in questions], np.int32))
    return items, dict(answers=[q.options[q.answer_index] for q in questions], kinds=["mc"] * len(questions),
                       missing_kinds=[])


def _qa_file(config: ConfigDict, split: str) -> str:
    key = "train_file" if split == config.data.split else "eval_file" if split == config.eval.split else None
    if key is None:
        raise ValueError(f"split {split!r} is neither config.data.split ({config.data.split!r}) nor "
                         f"config.eval.split ({config.eval.split!r}): no QA annotation file for it")
    path = config.qa.get(key, "")
    if not path:
        raise ValueError(f"set --config.qa.{key} to the {config.qa.source} annotation file of split {split!r}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.qa.{key}={path} does not exist")
    return path


def _annotated_qa_items(config: ConfigDict, source: str, split: str,
                        num_answers: int) -> tuple[QAItems, dict[str, Any]]:
    from data_pipelines.build import qa_sources

    if source not in qa_tasks.SOURCE_TASKS:
        raise ValueError(f"config.qa.source={source!r}; valid: 'synthetic', {sorted(qa_tasks.SOURCE_TASKS)}")
    if config.task != qa_tasks.SOURCE_TASKS[source]:
        raise ValueError(f"qa.source={source!r} is a {qa_tasks.SOURCE_TASKS[source]} task, but config.task="
                         f"{config.task!r}; set --config.task={qa_tasks.SOURCE_TASKS[source]}")
    qa = config.qa
    mapping = os.path.expanduser(qa.get("msvd_mapping", "")) or None

    def read(which_split: str) -> list:
        return list(qa_sources.read_qa_examples(source, _qa_file(config, which_split), which_split,
                                                 mapping_path=mapping))

    folder = qa_clips_folder(config, split)
    examples = read(split)
    clip_ids = built_splits.split_index(folder, split).video_id
    info: dict[str, Any] = {}
    if config.task == "qa_multiple_choice":
        is_train = split == config.data.split
        shuffle = qa_tasks.training_shuffle_seed(qa.get("option_order", "file"), qa.seed) if is_train else None
        result = qa_tasks.multiple_choice_items(examples, clip_ids, qa.text_length, qa.mc_format, source=source,
                                                split=split, shuffle_seed=shuffle)
        vocab = None
    else:
        if num_answers < 1:
            raise ValueError(f"{source} needs model.overrides.num_answers >= 1 (the answer-vocabulary size)")
        train = examples if split == config.data.split else (read(config.data.split) if qa.get("train_file") else [])
        if qa.get("answer_vocab"):
            vocab = qa_tasks.load_answer_vocab(os.path.expanduser(qa.answer_vocab))
        elif train:
            vocab = qa_tasks.rank_answers([ex.answer for ex in train], num_answers)
        else:
            raise ValueError(f"{source}: set config.qa.answer_vocab (a vocabulary file) or config.qa.train_file "
                             "(its most frequent answers) to fix the answer vocabulary")
        if len(vocab) != num_answers:
            raise ValueError(f"the answer vocabulary has {len(vocab)} answers but model.overrides.num_answers="
                             f"{num_answers}; set --config.model.overrides.num_answers={len(vocab)}")
        result = qa_tasks.open_ended_items(examples, clip_ids, vocab, qa.text_length, source=source, split=split,
                                           fill_in_blank=config.task == "qa_fill_in_blank")
        info.update(vocab=vocab, train_answers=[ex.answer for ex in train])
    import jax

    if jax.process_index() == 0:
        print(qa_tasks.coverage_line(result, source, split, vocab), flush=True)
    info.update(answers=result.answers, kinds=result.kinds, missing_kinds=result.missing_kinds)
    return result.items, info


def qa_train_batches(config: ConfigDict, items: QAItems, start_step: int, sharding: Any) -> Iterator[tuple[str, dict]]:
    """(name, global batch) per step from `start_step`, like `make_mixture_iterator` for one QA source."""
    from data_pipelines.input.device_transfer import device_iterator, numpy_batches
    from data_pipelines.input.qa_inputs import make_qa_train_dataset

    cfg = train_input(config.data, qa_clips_folder(config, config.data.split), pixel_stats=pixel_stats_name(config))
    for batch in device_iterator(numpy_batches(make_qa_train_dataset(cfg, items, start_step)), sharding, cfg.prefetch):
        yield "qa", batch
