"""CLI: convert a PyTorch checkpoint into an orbax checkpoint of Clover params, usable as `init_from`.

  python -m clover_jax.convert --source official_clover --checkpoint clover.pth --model base --out ckpt/
  python -m clover_jax.convert --source torchvision_swin3d --checkpoint swin3d_b.pth \
      --bert-dir bert-base-uncased/ --model base --out init/

Sources: `official_clover` (a whole official pre-training checkpoint), `torchvision_swin3d` /
`official_swin3d` (video encoder only; add `--bert-dir` to also load a HF BERT into the text and
fusion encoders), `hf_bert` (a HF folder with config.json + model.safetensors: text + fusion layers,
and the MLM head when the file holds `cls.predictions.*`, as BertForMaskedLM / BertForPreTraining files do;
a BERT without it is named in one printed line and the head stays freshly initialised).
The output folder holds `params/` (orbax; only the converted subtrees) and `conversion.json` (the
preset, what was loaded, what stays freshly initialised, and unused checkpoint keys).
"""
from __future__ import annotations

import json
import pathlib

from clover_jax.convert.bert import has_hf_mlm_head, load_hf_bert_dir
from clover_jax.convert.checkpoint_io import load_state_dict
from clover_jax.convert.clover import import_official_clover, import_pretrained_parts
from clover_jax.convert.common import CheckpointMismatchError
from clover_jax.launch import USER_ERRORS, OneLineArgumentParser, exit_process, report_user_error
from clover_jax.models.clover import abstract_params, clover_config

SOURCES = ("official_clover", "torchvision_swin3d", "official_swin3d", "hf_bert")


def convert(source: str, checkpoint: str | None, model: str, out: str, bert_dir: str | None = None,
            model_overrides: dict | None = None) -> dict:
    """Converts and writes `out/params` (orbax) + `out/conversion.json`; returns the JSON record."""
    import orbax.checkpoint as ocp

    if source not in SOURCES:
        raise ValueError(f"--source={source!r}; valid: {SOURCES}")
    config = clover_config(model, **(model_overrides or {}))
    target = abstract_params(config)
    if source == "official_clover":
        params, report = import_official_clover(load_state_dict(checkpoint), config, target, strict=False)
    else:
        video = None if source == "hf_bert" else load_state_dict(checkpoint)
        bert_path = checkpoint if source == "hf_bert" else bert_dir
        bert = load_hf_bert_dir(bert_path)[1] if bert_path else None
        if bert is not None and not has_hf_mlm_head(bert):
            print(f"{bert_path}: no cls.predictions.* (BERT's MLM head) in this checkpoint; "
                  "mlm_head stays at its fresh initialisation")
        params, report = import_pretrained_parts(
            config, target, video_state_dict=video,
            video_source="official" if source == "official_swin3d" else "torchvision", bert_state_dict=bert,
        )
    out_dir = pathlib.Path(out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / "params", params, force=True)
    checkpointer.wait_until_finished()
    record = dict(source=source, checkpoint=str(checkpoint), bert_dir=bert_dir, model=model,
                  model_overrides=model_overrides or {}, loaded=report.loaded, fresh=report.missing,
                  unused_checkpoint_keys=report.unexpected)
    (out_dir / "conversion.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m clover_jax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors) or HF folder")
    parser.add_argument("--bert-dir", help="HF BERT folder to load alongside a Swin3D checkpoint")
    parser.add_argument("--model", default="base", help="Clover preset the checkpoint is for (default: base)")
    parser.add_argument("--model-overrides", default="{}", help='JSON, e.g. \'{"h_v_input": "video_token_mean"}\'')
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.source != "hf_bert" and not args.checkpoint:
        parser.error(f"--source {args.source} needs --checkpoint (a .pth/.pt/.bin/.safetensors file)")
    if args.source == "hf_bert" and not (args.checkpoint and pathlib.Path(args.checkpoint).is_dir()):
        parser.error("--source hf_bert needs --checkpoint=<HF folder holding config.json and model.safetensors>")
    try:
        overrides = json.loads(args.model_overrides)
        if not isinstance(overrides, dict):
            raise ValueError(f"--model-overrides must be a JSON object, got {args.model_overrides!r}")
        record = convert(args.source, args.checkpoint, args.model, args.out, args.bert_dir, overrides)
    except (CheckpointMismatchError,) + USER_ERRORS as err:
        return report_user_error(err)
    print(f"loaded {len(record['loaded'])} parameters; {len(record['fresh'])} stay freshly initialised; "
          f"{len(record['unused_checkpoint_keys'])} checkpoint keys unused -> {args.out}")
    return 0


if __name__ == "__main__":
    exit_process(main())
