"""One import point for the annotation readers: row cleaning, caption readers, QA readers and QA sources."""
from data_pipelines.annotation_rows import PathLike, QAExample, Records, VideoText, clean_caption_text
from data_pipelines.caption_readers import (
    read_cc3m_tsv, read_didemo_json, read_generic_jsonl, read_lsmdc_tsv, read_msrvtt_captions_json,
    read_msrvtt_jsfusion_csv, read_msvd_captions, read_video_id_list, read_webvid_csv,
)
from data_pipelines.qa_readers import (
    ACTIVITYNET_QA_TYPES, FIB_BLANK, LSMDC_NUM_OPTIONS, TGIF_FRAMEQA_TYPES, TGIF_TASKS, read_activitynet_qa,
    read_ans2label, read_answer_set, read_lsmdc_fib, read_lsmdc_mc_tsv, read_msrvtt_mc_jsonl, read_msrvtt_qa_jsonl,
    read_msvd_qa, read_msvd_youtube_mapping, read_tgif_qa_tsv, tgif_task_from_filename,
)
from data_pipelines.qa_sources import (
    QA_SOURCE_TABLE, QA_SOURCES, QASource, answer_coverage, answer_vocabulary, read_qa_examples, read_qa_videos,
)

__all__ = [
    "ACTIVITYNET_QA_TYPES",
    "FIB_BLANK",
    "LSMDC_NUM_OPTIONS",
    "PathLike",
    "QAExample",
    "QASource",
    "QA_SOURCES",
    "QA_SOURCE_TABLE",
    "Records",
    "TGIF_FRAMEQA_TYPES",
    "TGIF_TASKS",
    "VideoText",
    "answer_coverage",
    "answer_vocabulary",
    "clean_caption_text",
    "read_activitynet_qa",
    "read_ans2label",
    "read_answer_set",
    "read_cc3m_tsv",
    "read_didemo_json",
    "read_generic_jsonl",
    "read_lsmdc_fib",
    "read_lsmdc_mc_tsv",
    "read_lsmdc_tsv",
    "read_msrvtt_captions_json",
    "read_msrvtt_jsfusion_csv",
    "read_msrvtt_mc_jsonl",
    "read_msrvtt_qa_jsonl",
    "read_msvd_captions",
    "read_msvd_qa",
    "read_msvd_youtube_mapping",
    "read_qa_examples",
    "read_qa_videos",
    "read_tgif_qa_tsv",
    "read_video_id_list",
    "read_webvid_csv",
    "tgif_task_from_filename",
]
