"""Weight-decay rule sets: under `official`, the decayed / not-decayed tensors are mmcv's (issue 31 D2).

`_mmcv_decays` transcribes the weight-decay part of mmcv 1.3.18 `DefaultOptimizerConstructor.add_params`
(mmcv/runner/optimizer/default_constructor.py) and applies it to the official parameter names of
`../shared/golden/clover_official_tiny` with the official configs' `paramwise_cfg`; our rule set, applied to
our names of the same tensors (`convert.clover.official_clover_plan`), must give the same two lists.
"""
import re

import pytest
from safetensors.numpy import load_file

from clover_jax import weight_decay
from clover_jax.convert.clover import official_clover_plan
from clover_jax.models.clover import abstract_params, clover_config
from clover_jax.run_setup import load_config_file

# paramwise_cfg of configs/exp_local/pretrain_webvid_cc3m.py (and finetune_{msrvtt,didemo,lsmdc}_retrieval.py,
# finetune_msrvtt_mc.py), and of every finetune_*QA / tgif / lsmdc_{mc,FIB} config
PRETRAIN_PARAMWISE = dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                          custom_keys={"absolute_pos_embed": dict(decay_mult=0.0),
                                       "relative_position_bias_table": dict(decay_mult=0.0)})
QA_PARAMWISE = dict(norm_decay_mult=0.0, bias_decay_mult=0.0, custom_keys={"qa_head": dict(lr_mult=10)})

# Official modules that are nn.LayerNorm / nn.BatchNorm1d (mmcv's `is_norm`), by their source: Swin3D norm,
# norm1, norm2, downsample.norm, patch_embed.norm; BERT and MLM-head LayerNorm; the fusion's norm;
# ssl_head.img_projector[1], [4] (and text_projector[1] with text_bn); mlm_ssl_V_head.img_bn1/2,
# mlm_ssl_T_head.bn; the QA heads' (mc_)vqa_classifier[2].
_OFFICIAL_NORM_MODULE = re.compile(r"(^|\.)(norm\d?|LayerNorm|img_bn\d|bn)$|^ssl_head\.img_projector\.[14]$"
                                   r"|^ssl_head\.text_projector\.1$|^qa_head\.(mc_)?vqa_classifier\.2$")
# Official tensors our model does not hold: the fusion's unused BERT embeddings and the text BERT's pooler.
_NOT_OURS = re.compile(r"^multimodal_backbone\.bert_embedding\.|^text_backbone\.bert\.pooler\.")


def _mmcv_decays(name, paramwise):
    """Whether mmcv gives the parameter `name` a non-zero weight decay (the constructor's rules, in its order)."""
    module, _, leaf = name.rpartition(".")
    keys = paramwise.get("custom_keys", {})
    for key in sorted(sorted(keys), key=len, reverse=True):  # longest key first, then alphabetical
        if key in name:
            return keys[key].get("decay_mult", 1.0) != 0
    if _OFFICIAL_NORM_MODULE.search(module):
        return paramwise.get("norm_decay_mult", 1.0) != 0
    if leaf == "bias":  # no DCN or depth-wise Conv2d in Clover
        return paramwise.get("bias_decay_mult", 1.0) != 0
    return True


def _qa_head_names(ours_head, official_head):
    """Ours -> official names of a QA head (official Sequential: Dropout, Linear, LayerNorm, GELU, Linear)."""
    pairs = {"fc1/kernel": "1.weight", "fc1/bias": "1.bias", "ln/scale": "2.weight", "ln/bias": "2.bias",
             "fc2/kernel": "4.weight", "fc2/bias": "4.bias"}
    return {f"{ours_head}/{k}": f"{official_head}.{v}" for k, v in pairs.items()}


def _compare(golden_dir, spec, paramwise, model_overrides, head=None):
    official = [n for n in load_file(str(golden_dir / "clover_official_tiny" / "weights.safetensors"))
                if not n.endswith("relative_position_index")]  # a buffer, not a parameter
    rules = load_config_file(spec).optim.decay_rules
    tree = abstract_params(clover_config("official_tiny", **model_overrides))
    to_official = {ours: src for ours, (src, _) in official_clover_plan(clover_config("official_tiny")).items()}
    if head:
        head_names = _qa_head_names(*head)
        to_official.update(head_names)
        official += list(head_names.values())
    decayed, kept = weight_decay.split_names(tree, rules)
    assert sorted(to_official) == sorted(decayed + kept)  # every tensor of ours has its official name
    held = [n for n in official if not _NOT_OURS.search(n)]
    assert sorted(set(to_official.values())) == sorted(held)
    want_decayed = sorted(n for n in held if _mmcv_decays(n, paramwise))
    want_kept = sorted(n for n in held if not _mmcv_decays(n, paramwise))
    got_decayed, got_kept = sorted(to_official[p] for p in decayed), sorted(to_official[p] for p in kept)
    ours_default = {to_official[p] for p in weight_decay.split_names(tree, "ours")[0]}
    print(f"{spec}: rules {rules}: decayed {len(got_decayed)} (mmcv {len(want_decayed)}), not decayed "
          f"{len(got_kept)} (mmcv {len(want_kept)}); decayed here, not under 'ours': "
          f"{sorted(set(got_decayed) - ours_default)}")
    assert got_decayed == want_decayed
    assert got_kept == want_kept
    return set(got_decayed), set(got_kept)


def test_official_pretraining_decay_lists_are_mmcvs(golden_dir):
    decayed, kept = _compare(golden_dir, "configs/pretrain.py:tiny,official", PRETRAIN_PARAMWISE, {})
    assert (len(decayed), len(kept)) == (72, 138)
    assert {"backbone.mask_token", "multimodal_backbone.vis_space_pos", "multimodal_backbone.vis_tempor_pos",
            "multimodal_backbone.token_type_embeddings.weight",
            "text_backbone.bert.embeddings.position_embeddings.weight",
            "text_backbone.bert.embeddings.token_type_embeddings.weight"} <= decayed
    assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in kept


@pytest.mark.parametrize("spec, overrides, head", [
    ("configs/finetune_qa.py:msrvtt_qa,tiny,official", dict(num_answers=7), ("qa_head", "qa_head.vqa_classifier")),
    ("configs/finetune_qa.py:tgif_action,tiny,official", dict(multiple_choice=True),
     ("mc_head", "qa_head.mc_vqa_classifier")),
])
def test_official_qa_decay_lists_are_mmcvs(golden_dir, spec, overrides, head):
    decayed, kept = _compare(golden_dir, spec, QA_PARAMWISE, overrides, head)
    assert (len(decayed), len(kept)) == (86, 130)
    official_head = head[1]
    assert {f"{official_head}.2.weight", f"{official_head}.2.bias", f"{official_head}.1.bias",
            "backbone.layers.0.blocks.0.attn.relative_position_bias_table"} <= decayed


# Our mask before the rule sets (optim.py until issue 31), per path component, lower case.
_OLD_NO_DECAY = re.compile(r"(norm|^ln\d*$|position|(^|_)pos($|_)|token_type|relative_position|rel_pos|mask_token)")


def _old_decays(path):
    components = [c.lower() for c in path.split("/") if c]
    return components[-1] not in ("bias", "scale") and not any(_OLD_NO_DECAY.search(c) for c in components)


@pytest.mark.parametrize("overrides", [{}, dict(num_answers=7), dict(multiple_choice=True)])
def test_default_rules_keep_our_mask(overrides):
    tree = abstract_params(clover_config("tiny", **overrides))
    decayed, kept = weight_decay.split_names(tree, "ours")
    assert decayed == sorted(p for p in decayed + kept if _old_decays(p))
    assert load_config_file("configs/pretrain.py:tiny").optim.decay_rules == "ours"


def test_summary_line_and_bad_rules():
    tree = abstract_params(clover_config("official_tiny", num_answers=7))
    line = weight_decay.describe(tree, "ours")
    assert line.startswith("weight decay: decayed 68 tensors, not decayed 148; rules: ours (norms no, biases no, ")
    assert weight_decay.decays("video_encoder/mask_token") is False
    assert weight_decay.decays("video_encoder/mask_token", "official") is True
    with pytest.raises(ValueError, match=r"optim.decay_rules='mmcv'; valid: \['official', 'official_qa', 'ours'\]"):
        weight_decay.decays("a/kernel", "mmcv")
