"""Evaluation: dual-encoder text<->video retrieval over a whole split, metrics table, JSON and HTML report.

  python -m clover_jax.eval --workdir=WORKDIR            # the run's config and its latest checkpoint
  python -m clover_jax.eval --workdir=W --checkpoint=PATH --config=configs/pretrain.py:base

Every clip of the split is embedded once (v = g_v(pool Swin)), every caption once (t = g_t(CLS)); the
last batch is padded with `valid=False` rows, never dropped. Text->video and video->text R@1/5/10,
median and mean rank are computed over the full similarity matrix (`evaluators.retrieval`), with
multiple captions per video. Results go to `WORKDIR/eval/retrieval_step{N}.json` and a report
`WORKDIR/eval/retrieval_step{N}.html` with the top-5 clips of sampled queries as thumbnail strips.

For a VideoQA run (config.task "qa_open_ended" / "qa_multiple_choice" / "qa_fill_in_blank") it scores every
question of the eval split instead (`evaluate_qa`): accuracy overall and per question kind (answers
outside the vocabulary and questions whose clip is missing count wrong, never dropped) next to the
majority-answer baseline or 1/K chance, into `WORKDIR/eval/qa_step{N}.json`; `config.eval.num_views` > 1
averages the Swin features of that many interleaved views per clip (TGIF multi-view testing).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np

from clover_jax import data as data_glue
from clover_jax.evaluators.report import videos_for_report, write_retrieval_report
from clover_jax.evaluators.retrieval import retrieval_metrics, top_k
from clover_jax.models.clover import Clover, CloverConfig
from clover_jax.run_logging import (
    USER_ERRORS,
    OneLineArgumentParser,
    exit_process,
    quiet_third_party_logs,
    report_user_error,
)
from data_pipelines.input_pipeline import InputConfig, make_eval_dataset, to_global

THUMB_FRAMES = 4
THUMB_SIZE = 64


def _thumbnails(video: np.ndarray, cfg: InputConfig) -> np.ndarray:
    """Normalised (B, T, H, W, 3) -> uint8 (B, <=4, <=64, <=64, 3) frames for the report."""
    frames = video[:, np.linspace(0, video.shape[1] - 1, min(THUMB_FRAMES, video.shape[1])).astype(int)]
    frames = frames * np.asarray(cfg.std, np.float32) + np.asarray(cfg.mean, np.float32)
    stride = max(1, video.shape[2] // THUMB_SIZE)
    return np.clip(frames[:, :, ::stride, ::stride], 0, 255).astype(np.uint8)


def embed_split(model_config: CloverConfig, params: Any, cfg: InputConfig, batch_sharding: Any,
                *, thumbnails: bool = False, captions: bool = True) -> dict[str, Any]:
    """Embeds every clip and every caption of `cfg.split`; returns numpy arrays on every process:
    video_emb (Nclips, E), text_emb (Ncaptions, E), text_to_video (Ncaptions,), captions (token ids),
    and, with `thumbnails`, uint8 thumbnail strips of every clip (gathered from all processes)."""
    model = Clover(model_config)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    video_fn = jax.jit(lambda p, v: model.apply({"params": p}, v, method=Clover.encode_video)[1],
                       out_shardings=replicated)
    text_fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=Clover.encode_text)[1],
                      out_shardings=replicated)

    def gather(local: np.ndarray) -> np.ndarray:
        return np.asarray(jax.device_get(jax.jit(lambda x: x, out_shardings=replicated)(
            to_global({"x": local}, batch_sharding)["x"])))

    clips: dict[int, np.ndarray] = {}
    thumbs: dict[int, np.ndarray] = {}
    for batch in make_eval_dataset(cfg, mode="clips", include_video=True):
        emb = np.asarray(jax.device_get(video_fn(params, to_global({"v": batch["video"]}, batch_sharding)["v"])))
        index, valid = gather(batch["clip_index"]), gather(batch["valid"])
        for i, ok, e in zip(index, valid, emb):
            if ok:
                clips[int(i)] = e
        if thumbnails:
            # The report may show any clip, not only this process's: gather them like the indices.
            for i, ok, t in zip(index, valid, gather(_thumbnails(batch["video"], cfg))):
                if ok:
                    thumbs[int(i)] = t
    texts: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    for batch in make_eval_dataset(cfg, mode="pairs", include_video=False) if captions else ():
        g = to_global({"i": batch["text_ids"], "m": batch["text_mask"]}, batch_sharding)
        emb = np.asarray(jax.device_get(text_fn(params, g["i"], g["m"])))
        clip, cap, valid, ids = (gather(batch[k]) for k in ("clip_index", "caption_index", "valid", "text_ids"))
        texts += [(int(c), int(k), e, t) for c, k, ok, e, t in zip(clip, cap, valid, emb, ids) if ok]
    order = sorted(clips)
    position = {c: n for n, c in enumerate(order)}
    texts.sort(key=lambda x: (x[0], x[1]))
    return dict(
        clip_ids=np.asarray(order),
        video_emb=np.stack([clips[c] for c in order]),
        text_emb=np.stack([t[2] for t in texts]) if texts else None,
        text_to_video=np.asarray([position[t[0]] for t in texts]),
        text_ids=np.stack([t[3] for t in texts]) if texts else None,
        thumbnails={position[c]: v for c, v in thumbs.items()},
    )


def format_table(metrics: dict[str, Any], title: str) -> str:
    lines = [title, f"{'direction':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MdR':>8}{'MnR':>9}"]
    for d, name in (("t2v", "text->video"), ("v2t", "video->text")):
        lines.append(f"{name:<10}{metrics[f'{d}_r1']:8.2f}{metrics[f'{d}_r5']:8.2f}{metrics[f'{d}_r10']:8.2f}"
                     f"{metrics[f'{d}_median_rank']:8.1f}{metrics[f'{d}_mean_rank']:9.2f}")
    lines.append(f"chance R@10 (text->video): {100 * min(10, metrics['num_videos']) / metrics['num_videos']:.2f}")
    return "\n".join(lines)


def evaluate_retrieval(model_config: CloverConfig, params: Any, cfg: InputConfig, batch_sharding: Any,
                       out_dir: pathlib.Path | None, step: int, *, report_queries: int = 20) -> dict[str, Any]:
    """Zero-shot / fine-tuned retrieval on one split; prints the table; writes JSON + HTML on process 0."""
    emb = embed_split(model_config, params, cfg, batch_sharding, thumbnails=out_dir is not None)
    metrics = retrieval_metrics(emb["video_emb"], emb["text_emb"], emb["text_to_video"])
    metrics.update(step=step, split=cfg.split, dataset=cfg.dataset)
    title = (f"retrieval on {pathlib.Path(cfg.dataset).name}/{cfg.split}: {metrics['num_videos']} clips, "
             f"{metrics['num_texts']} captions, step {step}")
    print(format_table(metrics, title), flush=True)
    if out_dir is not None and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"retrieval_step{step}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        from data_pipelines.text_masking import load_tokenizer

        tokenizer = load_tokenizer()
        captions = [tokenizer.decode(ids) for ids in emb["text_ids"]]
        k = min(5, len(emb["video_emb"]))
        ranked = top_k(emb["video_emb"], emb["text_emb"], k)
        needed = videos_for_report(ranked, report_queries, 0)
        thumbs = {i: emb["thumbnails"][i] for i in needed if i in emb["thumbnails"]}
        write_retrieval_report(out_dir / f"retrieval_step{step}.html", captions, emb["text_to_video"], ranked,
                               thumbs, metrics={k2: metrics[k2] for k2 in ("t2v_r1", "t2v_r5", "t2v_r10",
                                                                            "t2v_median_rank")},
                               num_queries=report_queries, seed=0,
                               video_names=[f"clip {c}" for c in emb["clip_ids"]], title=title)
    return metrics


QA_MODEL_INPUTS = ("video", "text_ids", "text_mask", "option_ids", "option_mask")


def qa_scores(model_config: CloverConfig, params: Any, cfg: InputConfig, items: Any, batch_sharding: Any,
              *, at_mask_token: bool = False) -> np.ndarray:
    """Answer logits (N, num_answers) or option scores (N, K) of every QA item, in item order
    (`at_mask_token`: open-ended logits read at the [MASK], for fill-in-the-blank). With
    `cfg.num_views` > 1 each clip is seen as that many views whose Swin features are averaged."""
    from data_pipelines.input_pipeline import make_qa_eval_dataset

    model = Clover(model_config)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    if items.multiple_choice:
        score = lambda p, b: model.apply({"params": p}, b["video"], b["option_ids"], b["option_mask"],  # noqa: E731
                                         method=Clover.qa_multiple_choice)
    else:
        score = lambda p, b: model.apply({"params": p}, b["video"], b["text_ids"], b["text_mask"],  # noqa: E731
                                         at_mask_token=at_mask_token, method=Clover.qa_open_ended)
    score_fn = jax.jit(score, out_shardings=replicated)
    gather = jax.jit(lambda x: x, out_shardings=replicated)
    scores: dict[int, np.ndarray] = {}
    for batch in make_qa_eval_dataset(cfg, items):
        inputs = {k: v for k, v in batch.items() if k in QA_MODEL_INPUTS}
        out = np.asarray(jax.device_get(score_fn(params, to_global(inputs, batch_sharding))))
        rows = to_global({"i": batch["item_index"], "v": batch["valid"]}, batch_sharding)
        for i, ok, row in zip(np.asarray(gather(rows["i"])), np.asarray(gather(rows["v"])), out):
            if ok:
                scores[int(i)] = row
    if sorted(scores) != list(range(len(items))):
        raise RuntimeError(f"QA eval scored {len(scores)} of {len(items)} items: the eval pass lost some")
    return np.stack([scores[i] for i in range(len(items))])


def evaluate_qa(config: Any, model_config: CloverConfig, params: Any, batch_sharding: Any,
                out_dir: pathlib.Path | None, step: int) -> dict[str, Any]:
    """VideoQA accuracy on `config.eval.split`, overall and per question kind, next to its baseline
    (majority training answer, or 1/K); prints it and writes `qa_step{N}.json` on process 0.

    Every question counts: an answer outside the vocabulary and a question whose clip is missing from
    the split are both wrong. `accuracy_on_clips` is the accuracy over the questions that have a clip."""
    from clover_jax.evaluators import qa as qa_metrics

    items, info = data_glue.qa_items(config, config.eval.split, model_config.num_answers)
    cfg = data_glue.qa_eval_input(config)
    scores = qa_scores(model_config, params, cfg, items, batch_sharding,
                       at_mask_token=config.task == "qa_fill_in_blank")
    correct = np.argmax(scores, axis=1) == items.answer_index  # -1 (out of vocabulary) never matches
    missing = list(info.get("missing_kinds", []))
    total = len(items) + len(missing)
    source = config.qa.get("source", data_glue.SYNTHETIC)
    metrics: dict[str, Any] = dict(task=config.task, source=source, step=step, split=config.eval.split, num=total,
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
            majority = qa_metrics.majority_baseline(info["train_answers"], info["answers"] + [None] * len(missing))
            metrics.update(majority_baseline=majority["accuracy"], majority_answer=majority["answer"])
            baseline = f"majority answer {majority['answer']!r}: {majority['accuracy']:.2f}%; " + baseline
    kinds = np.asarray(list(info["kinds"]) + missing)
    hits = np.concatenate([correct, np.zeros(len(missing), bool)])
    metrics["accuracy_by_kind"] = {k: float(100 * hits[kinds == k].mean()) for k in sorted(set(kinds.tolist()))}
    metrics["num_by_kind"] = {k: int(np.sum(kinds == k)) for k in sorted(set(kinds.tolist()))}
    name = {"qa_open_ended": "open-ended", "qa_multiple_choice": "multiple-choice",
            "qa_fill_in_blank": "fill-in-the-blank"}[config.task]
    lines = [f"{name} QA accuracy {metrics['accuracy']:.2f}% ({baseline}; counted wrong, never dropped)",
             "  by question kind: " + ", ".join(f"{k} {v:.1f}% ({metrics['num_by_kind'][k]})"
                                                for k, v in metrics["accuracy_by_kind"].items())]
    if missing:
        lines.append(f"  {len(missing)} of {total} questions have no clip in the split (scored wrong); "
                     f"accuracy on the {len(items)} with a clip: {metrics['accuracy_on_clips']:.2f}%")
    where = source if source != data_glue.SYNTHETIC else pathlib.Path(cfg.dataset).parent.name
    views = f", {cfg.num_views} views" if cfg.num_views > 1 else ""
    print(f"VideoQA {where}/{config.eval.split}: {total} questions, step {step}{views}\n" + "\n".join(lines),
          flush=True)
    if out_dir is not None and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"qa_step{step}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def evaluate_multiple_choice(model_config: CloverConfig, params: Any, cfg: InputConfig, examples: list,
                             batch_sharding: Any, out_dir: pathlib.Path | None, step: int) -> dict[str, Any]:
    """MSR-VTT multiple choice with the dual encoder (reference §5.2, `acc_for_msrvtt_mc`): per item, the
    option caption with the highest cosine to its clip's v is the prediction. `examples` are
    `annotations.QAExample`s (`read_msrvtt_mc_jsonl`); items whose clip is not in the split count wrong."""
    from clover_jax.evaluators.retrieval import multiple_choice_accuracy
    from data_pipelines.builder import split_index
    from data_pipelines.synthetic_qa import encode_texts

    if not examples:
        raise ValueError("no multiple-choice items to evaluate")
    emb = embed_split(model_config, params, cfg, batch_sharding, captions=False)
    video_ids = split_index(cfg.dataset, cfg.split).video_id
    row_of = {video_ids[c]: n for n, c in enumerate(emb["clip_ids"])}
    present = [ex for ex in examples if ex.video in row_of]
    k = len(present[0].options) if present else 0
    if any(len(ex.options) != k for ex in present):
        raise ValueError("multiple-choice items have different option counts")
    accuracy_present = 0.0
    if present:
        ids, mask = encode_texts([o for ex in present for o in ex.options], cfg.text.max_length, truncate=True)
        model = Clover(model_config)
        replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
        text_fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=Clover.encode_text)[1],
                          out_shardings=replicated)
        size = cfg.batch_size
        chunks = []
        for start in range(0, len(ids), size):  # fixed-size chunks: one compile; the tail is padded
            i, m = ids[start:start + size], mask[start:start + size]
            pad = size - len(i)
            i, m = np.pad(i, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
            out = text_fn(params, jax.device_put(i, replicated), jax.device_put(m, replicated))
            chunks.append(np.asarray(jax.device_get(out))[: size - pad])
        option_emb = np.concatenate(chunks).reshape(len(present), k, -1)
        video_emb = emb["video_emb"][[row_of[ex.video] for ex in present]]
        answers = np.asarray([ex.answer_index for ex in present])
        accuracy_present = multiple_choice_accuracy(video_emb, option_emb, answers)
    metrics = dict(mc_accuracy=accuracy_present * len(present) / len(examples), num_items=len(examples),
                   num_missing_clip=len(examples) - len(present), step=step, split=cfg.split, dataset=cfg.dataset)
    print(f"multiple choice (dual encoder) on {pathlib.Path(cfg.dataset).name}/{cfg.split}: "
          f"{metrics['mc_accuracy']:.2f}% of {len(examples)} items ({metrics['num_missing_clip']} clips missing, "
          f"counted wrong; chance {100 / max(k, 1):.1f}%), step {step}", flush=True)
    if out_dir is not None and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"multiple_choice_step{step}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def main(argv: list[str] | None = None) -> int:
    """CLI: evaluate a run's checkpoint with the run's own eval settings."""
    from clover_jax import train as train_lib

    parser = OneLineArgumentParser(prog="python -m clover_jax.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the training workdir (holds config.json, checkpoints/)")
    parser.add_argument("--checkpoint", default="", help="a checkpoint (workdir, checkpoints/ or step folder)")
    parser.add_argument("--config", default="", help="config file[:arg], when the workdir has no config.json")
    parser.add_argument("--msrvtt_mc", default="", help="also score this MSR-VTT multiple-choice JSONL "
                        "(clips from the eval split) with the dual encoder")
    args = parser.parse_args(argv)
    try:
        return _evaluate(args, train_lib)
    except USER_ERRORS as err:
        return report_user_error(err)


def _evaluate(args: Any, train_lib: Any) -> int:
    workdir = pathlib.Path(args.workdir).absolute()
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir={args.workdir} does not exist (pass a training run's workdir)")
    config = train_lib.load_run_config(workdir, args.config)
    quiet_third_party_logs(workdir, "eval")
    run = train_lib.setup_run(config)
    params, step = train_lib.load_params_for_eval(run, args.checkpoint or workdir)
    if config.get("task", "pretrain") in data_glue.QA_TASKS:
        evaluate_qa(config, run.model_config, params, run.batch_sharding, workdir / "eval", step)
        return 0
    dataset = data_glue.resolve_dataset(config.eval.dataset, config.data)
    cfg = data_glue.eval_input(config.eval, config.data, dataset)
    evaluate_retrieval(run.model_config, params, cfg, run.batch_sharding, workdir / "eval", step,
                       report_queries=config.eval.report_queries)
    if args.msrvtt_mc:
        from data_pipelines.annotations import read_msrvtt_mc_jsonl

        evaluate_multiple_choice(run.model_config, params, cfg, list(read_msrvtt_mc_jsonl(args.msrvtt_mc)),
                                 run.batch_sharding, workdir / "eval", step)
    return 0

if __name__ == "__main__":
    exit_process(main())
