"""Evaluators as config entries: `config.evals.<name> = dict(type=..., every_steps=..., ...)`, one class per type.

An entry's input settings are `config.eval`'s (split, dataset, batch_size, num_frames, image_size,
text_length, report_queries, num_views, crop, view_sampling) with the entry's own keys on top.
`every_steps` schedules it during training: N > 0 every N steps and after the last step, 0 only after
the last step, -1 never (on demand: `python -m clover_jax.eval --evaluator=NAME`); `every_epochs`
(> 0) instead counts in epochs of the training data, resolved to steps when training starts. Each
evaluator builds its inputs and jitted passes once; `run(params, step)` prints its table, writes
`<out_dir>/<name>_step{N}.json` (and the retrieval HTML report) on process 0, and returns the metrics.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from clover_jax import run_inputs
from clover_jax.evaluators import qa_metrics
from clover_jax.evaluators.mesh_retrieval import retrieval_metrics_of_galleries, top_k
from clover_jax.evaluators.report import videos_for_report, write_retrieval_report
from clover_jax.evaluators.retrieval import multiple_choice_accuracy
from clover_jax.evaluators.split_passes import SplitPasses
from clover_jax.models.clover import CloverConfig

SCHEDULE_KEYS = ("type", "every_steps", "every_epochs")
EXTRA_KEYS = {"multiple_choice": ("file",)}  # keys only some types take


def settings_of(config: ml_collections.ConfigDict, name: str,
                steps_per_epoch: float = 0.0) -> ml_collections.ConfigDict:
    """`config.eval` with the keys of `config.evals[name]` on top, `every_epochs` turned into `every_steps`
    with `steps_per_epoch`; ValueError on keys the type does not take."""
    entry = dict(config.evals[name])
    kind = entry.get("type", "")
    if kind not in EVALUATORS:
        raise ValueError(f"config.evals.{name}.type={kind!r}; valid: {', '.join(map(repr, EVALUATORS))}")
    allowed = set(config.eval) | set(SCHEDULE_KEYS) | set(EXTRA_KEYS.get(kind, ()))
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"config.evals.{name} has unknown keys {unknown}; valid: {sorted(allowed)}")
    merged = ml_collections.ConfigDict(config.eval.to_dict())
    merged.update({k: v for k, v in entry.items() if k in config.eval})
    merged.every_steps = entry.get("every_steps", 0)
    if entry.get("every_epochs", 0) > 0 and steps_per_epoch > 0:  # 0 outside training: no schedule to resolve
        merged.every_steps = max(1, round(entry["every_epochs"] * steps_per_epoch))
    for key in EXTRA_KEYS.get(kind, ()):
        merged[key] = entry.get(key, "")
    return merged


def evaluator_names(config: ml_collections.ConfigDict, *, scheduled_only: bool = False) -> list[str]:
    """The names of `config.evals` (in config order); `scheduled_only` leaves out every_steps < 0."""
    evals = config.get("evals", {})
    return [n for n in evals if not scheduled_only or evals[n].get("every_steps", 0) >= 0
            or evals[n].get("every_epochs", 0) > 0]


def make_evaluators(config: ml_collections.ConfigDict, model_config: CloverConfig, batch_sharding: Any,
                    out_dir: pathlib.Path | None, names: list[str], steps_per_epoch: float = 0.0) -> dict[str, Any]:
    """{name: evaluator} of the named `config.evals` entries."""
    out = {}
    for name in names:
        settings = settings_of(config, name, steps_per_epoch)
        out[name] = EVALUATORS[config.evals[name].type](name, settings, config, model_config, batch_sharding,
                                                        out_dir)
    return out


def is_due(evaluator: Any, step: int, total_steps: int) -> bool:
    """Whether the schedule of `evaluator` runs it after `step` of a `total_steps` run."""
    every = evaluator.settings.every_steps
    return every >= 0 and (step == total_steps or (every > 0 and step % every == 0))


def scalars(name: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one evaluation as `{name}/{metric}` scalars (for TensorBoard and metrics.jsonl)."""
    return {f"{name}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and k != "step"}


def _write_json(out_dir: pathlib.Path | None, file: str, metrics: dict[str, Any]) -> None:
    if out_dir is not None and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / file).write_text(json.dumps(metrics, indent=1, sort_keys=True))


def format_retrieval_table(metrics: dict[str, Any], title: str) -> str:
    lines = [title, f"{'direction':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MdR':>8}{'MnR':>9}"]
    for d, name in (("t2v", "text->video"), ("v2t", "video->text")):
        lines.append(f"{name:<10}{metrics[f'{d}_r1']:8.2f}{metrics[f'{d}_r5']:8.2f}{metrics[f'{d}_r10']:8.2f}"
                     f"{metrics[f'{d}_median_rank']:8.1f}{metrics[f'{d}_mean_rank']:9.2f}")
    lines.append(f"chance R@10 (text->video): {100 * min(10, metrics['num_videos']) / metrics['num_videos']:.2f}")
    return "\n".join(lines)


class _Evaluator:
    def __init__(self, name: str, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 model_config: CloverConfig, batch_sharding: Any, out_dir: pathlib.Path | None):
        self.name, self.settings, self.out_dir = name, settings, out_dir
        self.passes = SplitPasses(model_config, batch_sharding,
                                  config.task if config.task in run_inputs.QA_TASKS else "")


class RetrievalEvaluator(_Evaluator):
    """Dual-encoder text<->video retrieval over a whole split: R@1/5/10, median and mean rank both ways
    (multiple captions per clip), and an HTML report of the top-5 clips of sampled queries."""

    def __init__(self, name, settings, config, model_config, batch_sharding, out_dir):
        super().__init__(name, settings, config, model_config, batch_sharding, out_dir)
        dataset = run_inputs.resolve_dataset(settings.dataset, config.data)
        self.cfg = run_inputs.eval_input(settings, config.data, dataset, run_inputs.pixel_stats_name(config))

    def run(self, params: Any, step: int = 0) -> dict[str, Any]:
        cfg = self.cfg
        # Each process keeps only the embeddings of its own devices: no process holds a whole gallery.
        emb = self.passes.embed_split_on_mesh(params, cfg, with_thumbnails=self.out_dir is not None)
        metrics = retrieval_metrics_of_galleries(emb["videos"], emb["texts"], emb["text_to_video"])
        metrics.update(step=step, split=cfg.split, dataset=cfg.dataset)
        title = (f"retrieval on {pathlib.Path(cfg.dataset).name}/{cfg.split}: {metrics['num_videos']} clips, "
                 f"{metrics['num_texts']} captions, step {step}")
        print(format_retrieval_table(metrics, title), flush=True)
        _write_json(self.out_dir, f"{self.name}_step{step}.json", metrics)
        if self.out_dir is not None:
            # On every process: the top-5 search runs on the whole mesh; process 0 writes the page.
            ranked = top_k(emb["videos"], emb["texts"], min(5, emb["videos"].num_valid))[1]
            if jax.process_index() == 0:
                self._report(emb, ranked, metrics, title, step)
        return metrics

    def _report(self, emb: dict[str, Any], ranked: np.ndarray, metrics: dict[str, Any], title: str,
                step: int) -> None:
        from data_pipelines.input.text_masking import load_tokenizer

        queries = self.settings.report_queries
        captions = [load_tokenizer().decode(ids) for ids in emb["text_ids"]]
        thumbs = {i: emb["thumbnails"][i] for i in videos_for_report(ranked, queries, 0) if i in emb["thumbnails"]}
        shown = {k: metrics[k] for k in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_median_rank")}
        write_retrieval_report(self.out_dir / f"{self.name}_step{step}.html", captions, emb["text_to_video"],
                               ranked, thumbs, metrics=shown, num_queries=queries, seed=0,
                               video_names=[f"clip {c}" for c in emb["clip_ids"]], title=title)


class MultipleChoiceEvaluator(_Evaluator):
    """MSR-VTT multiple choice with the dual encoder (reference §5.2, `acc_for_msrvtt_mc`): per item, the
    option caption with the highest cosine to its clip's v wins. `file` is the MSR-VTT MC JSONL; items
    whose clip is not in the split count wrong."""

    def __init__(self, name, settings, config, model_config, batch_sharding, out_dir):
        super().__init__(name, settings, config, model_config, batch_sharding, out_dir)
        from data_pipelines.build.built_splits import split_index
        from data_pipelines.build.qa_readers import read_msrvtt_mc_jsonl

        if not settings.file:
            raise ValueError(f"evaluator {name!r} needs its MSR-VTT multiple-choice file: "
                             f"--config.evals.{name}.file=msrvtt_mc_test.jsonl")
        self.examples = list(read_msrvtt_mc_jsonl(settings.file))
        if not self.examples:
            raise ValueError(f"{settings.file}: no multiple-choice items to evaluate")
        dataset = run_inputs.resolve_dataset(settings.dataset, config.data)
        self.cfg = run_inputs.eval_input(settings, config.data, dataset, run_inputs.pixel_stats_name(config))
        self.video_ids = split_index(self.cfg.dataset, self.cfg.split).video_id

    def run(self, params: Any, step: int = 0) -> dict[str, Any]:
        from data_pipelines.build.synthetic_qa import encode_texts

        cfg, examples = self.cfg, self.examples
        emb = self.passes.embed_split(params, cfg, captions=False)
        row_of = {self.video_ids[c]: n for n, c in enumerate(emb["clip_ids"])}
        present = [ex for ex in examples if ex.video in row_of]
        k = len(present[0].options) if present else 0
        if any(len(ex.options) != k for ex in present):
            raise ValueError("multiple-choice items have different option counts")
        accuracy_present = 0.0
        if present:
            ids, mask = encode_texts([o for ex in present for o in ex.options], cfg.text.max_length, truncate=True)
            option_emb = self.passes.embed_texts(params, ids, mask, cfg.batch_size).reshape(len(present), k, -1)
            video_emb = emb["video_emb"][[row_of[ex.video] for ex in present]]
            answers = np.asarray([ex.answer_index for ex in present])
            accuracy_present = multiple_choice_accuracy(video_emb, option_emb, answers)
        metrics = dict(mc_accuracy=accuracy_present * len(present) / len(examples), num_items=len(examples),
                       num_missing_clip=len(examples) - len(present), step=step, split=cfg.split,
                       dataset=cfg.dataset)
        print(f"multiple choice (dual encoder) on {pathlib.Path(cfg.dataset).name}/{cfg.split}: "
              f"{metrics['mc_accuracy']:.2f}% of {len(examples)} items ({metrics['num_missing_clip']} clips "
              f"missing, counted wrong; chance {100 / max(k, 1):.1f}%), step {step}", flush=True)
        _write_json(self.out_dir, f"{self.name}_step{step}.json", metrics)
        return metrics


QA_TASK_NAMES = {"qa_open_ended": "open-ended", "qa_multiple_choice": "multiple-choice",
                 "qa_fill_in_blank": "fill-in-the-blank"}


class QAEvaluator(_Evaluator):
    """VideoQA accuracy of `config.task` on the entry's split, overall and per question kind, next to its
    baseline (majority training answer, or 1/K). Every question counts: an answer outside the vocabulary
    and a question whose clip is missing from the split are both wrong; `accuracy_on_clips` is the
    accuracy over the questions that have a clip. `num_views` > 1 averages the Swin features of that many
    views per clip, sampled as `view_sampling` says (TGIF multi-view testing)."""

    def __init__(self, name, settings, config, model_config, batch_sharding, out_dir):
        super().__init__(name, settings, config, model_config, batch_sharding, out_dir)
        if config.task not in run_inputs.QA_TASKS:
            raise ValueError(f"evaluator {name!r} (type 'qa') needs a QA task, not config.task={config.task!r}")
        qa_config = ml_collections.ConfigDict(config.to_dict())
        qa_config.eval = settings  # the data glue reads the eval split's settings from config.eval
        self.task, self.source = config.task, config.qa.get("source", run_inputs.SYNTHETIC)
        self.items, self.info = run_inputs.qa_items(qa_config, settings.split, model_config.num_answers)
        self.cfg = run_inputs.qa_eval_input(qa_config)

    def run(self, params: Any, step: int = 0) -> dict[str, Any]:
        items, info, cfg = self.items, self.info, self.cfg
        scores = self.passes.qa_scores(params, cfg, items)
        correct = np.argmax(scores, axis=1) == items.answer_index  # -1 (out of vocabulary) never matches
        missing = list(info.get("missing_kinds", []))
        total = len(items) + len(missing)
        metrics: dict[str, Any] = dict(task=self.task, source=self.source, step=step, split=cfg.split, num=total,
                                       num_missing_clip=len(missing), num_views=cfg.num_views,
                                       accuracy=float(100.0 * correct.sum() / total))
        if items.multiple_choice:
            metrics["accuracy_on_clips"] = qa_metrics.multiple_choice_qa_accuracy(scores, items.answer_index)
            metrics["chance"] = 100.0 / scores.shape[1]
            baseline = f"chance {metrics['chance']:.2f}%, {scores.shape[1]} options"
        else:
            on_clips = qa_metrics.open_ended_accuracy(scores, items.answer_index)
            metrics.update(accuracy_on_clips=on_clips["accuracy"], num_out_of_vocab=on_clips["num_out_of_vocab"],
                           vocab_size=len(info["vocab"]))
            baseline = f"{on_clips['num_out_of_vocab']} answers outside the {len(info['vocab'])}-answer vocabulary"
            if info.get("train_answers"):
                majority = qa_metrics.majority_baseline(info["train_answers"],
                                                        info["answers"] + [None] * len(missing))
                metrics.update(majority_baseline=majority["accuracy"], majority_answer=majority["answer"])
                baseline = f"majority answer {majority['answer']!r}: {majority['accuracy']:.2f}%; " + baseline
        kinds = np.asarray(list(info["kinds"]) + missing)
        hits = np.concatenate([correct, np.zeros(len(missing), bool)])
        names = sorted(set(kinds.tolist()))
        metrics["accuracy_by_kind"] = {k: float(100 * hits[kinds == k].mean()) for k in names}
        metrics["num_by_kind"] = {k: int(np.sum(kinds == k)) for k in names}
        lines = [f"{QA_TASK_NAMES[self.task]} QA accuracy {metrics['accuracy']:.2f}% ({baseline}; counted wrong, "
                 "never dropped)",
                 "  by question kind: " + ", ".join(f"{k} {v:.1f}% ({metrics['num_by_kind'][k]})"
                                                    for k, v in metrics["accuracy_by_kind"].items())]
        if missing:
            lines.append(f"  {len(missing)} of {total} questions have no clip in the split (scored wrong); "
                         f"accuracy on the {len(items)} with a clip: {metrics['accuracy_on_clips']:.2f}%")
        where = self.source if self.source != run_inputs.SYNTHETIC else pathlib.Path(cfg.dataset).parent.name
        views = f", {cfg.num_views} views" if cfg.num_views > 1 else ""
        print(f"VideoQA {where}/{cfg.split}: {total} questions, step {step}{views}\n" + "\n".join(lines), flush=True)
        _write_json(self.out_dir, f"{self.name}_step{step}.json", metrics)
        return metrics


EVALUATORS = {"retrieval": RetrievalEvaluator, "qa": QAEvaluator, "multiple_choice": MultipleChoiceEvaluator}
