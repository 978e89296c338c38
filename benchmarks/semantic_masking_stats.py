"""Masked words per caption under the official semantic-masking rule against the previous rule.

  .venv/bin/python -m benchmarks.semantic_masking_stats [--captions ../shared/data/real/msrvtt/MSRVTT_JSFUSION_test.csv]
      [--max-length 30] [--sentence-case]

Reads the MSR-VTT 1k-A test captions, tags them under both rules and counts the whole words the masker
picks per caption (`text_masking.choose_masked_words`; the count does not depend on the draw):
  * official: tags over the lower-cased WordPiece words (`tag_rule="wordpiece_lower"`), mode "semantic"
    (k from every candidate entry, overlapping verb-phrase matches included);
  * previous: tags over the cased caption (`tag_rule="cased_caption"`), mode "semantic_dedup" (k from the
    distinct candidate words).
Prints a Markdown table: mean masked words and the number of captions with 0, 1, 2, 3, 4, 5+ of them, then
how many captions get a different count or other candidate words. `--sentence-case` upper-cases each
caption's first letter first (cased captions, as in WebVid/CC3M; the 1k-A captions are all lower case).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO_ROOT.parent / "shared" / "data" / "real" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
# rule name -> (tag rule of the stored tags, text-masking mode)
RULES = {"official": ("wordpiece_lower", "semantic"), "previous": ("cased_caption", "semantic_dedup")}
BINS = ("0", "1", "2", "3", "4", "5+")


def masked_word_counts(captions: list[str], tag_rule: str, mode: str, max_length: int,
                       nlp) -> tuple[np.ndarray, list[set[str]]]:
    """Whole words masked per caption under (tag_rule, mode), and each caption's candidate words (lower case)."""
    from data_pipelines.build import text_tags
    from data_pipelines.input import text_masking

    tokenizer = text_masking.load_tokenizer()
    cfg = text_masking.TextMaskingConfig(max_length=max_length, mode=mode)
    counts, words = [], []
    for i, (caption, tags) in enumerate(zip(captions, text_tags.tag_captions(captions, nlp, rule=tag_rule))):
        ids, tok_start, tok_end = tokenizer.tokenize(caption)
        chosen = text_masking.choose_masked_words(tags, tok_start, tok_end, min(len(ids), max_length - 2),
                                                  np.random.default_rng(i), cfg)
        counts.append(len(chosen))
        words.append({caption[s:e].lower() for s, e, c in zip(tags["word_start"], tags["word_end"],
                                                               tags["candidate"]) if c})
    return np.asarray(counts), words


def table(counts: dict[str, np.ndarray]) -> str:
    lines = ["| rule | captions | mean masked words | " + " | ".join(BINS) + " |",
             "|---|---:|---:|" + "---:|" * len(BINS)]
    for name, c in counts.items():
        bins = [int(np.sum(c == b)) for b in range(5)] + [int(np.sum(c >= 5))]
        lines.append(f"| {name} | {len(c)} | {c.mean():.3f} | " + " | ".join(map(str, bins)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=pathlib.Path, default=DEFAULT_CAPTIONS,
                   help="MSR-VTT 1k-A test CSV (key,vid_key,video_id,sentence)")
    p.add_argument("--max-length", type=int, default=30, help="text length with [CLS]/[SEP] (official: 30)")
    p.add_argument("--sentence-case", action="store_true", help="upper-case each caption's first letter first")
    args = p.parse_args(argv)
    if not args.captions.is_file():
        print(f"error: {args.captions} not found (pass --captions)", file=sys.stderr)
        return 2

    from data_pipelines.build import text_tags
    from data_pipelines.build.caption_readers import read_msrvtt_jsfusion_csv

    captions = [r.captions[0] for r in read_msrvtt_jsfusion_csv(args.captions)]
    if args.sentence_case:
        captions = [c[:1].upper() + c[1:] for c in captions]
    nlp = text_tags.load_tagger()
    results = {name: masked_word_counts(captions, rule, mode, args.max_length, nlp)
               for name, (rule, mode) in RULES.items()}
    counts = {name: c for name, (c, _) in results.items()}
    print(f"{len(captions)} captions from {args.captions}, max_length {args.max_length}"
          + (", sentence case" if args.sentence_case else ""))
    print(table(counts))
    official, previous = counts["official"], counts["previous"]
    print(f"\ncaptions whose masked-word count differs: {int(np.sum(official != previous))} "
          f"(official more: {int(np.sum(official > previous))}, fewer: {int(np.sum(official < previous))}); "
          f"masked words in all: official {int(official.sum())}, previous {int(previous.sum())}")
    other_words = sum(a != b for a, b in zip(results["official"][1], results["previous"][1]))
    print(f"captions whose candidate words differ: {other_words}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
