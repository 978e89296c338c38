"""Which parameters get weight decay: named rule sets (ours, the official configs') and the mask they give.

Each rule set reads like the official code's mmcv `DefaultOptimizerConstructor` `paramwise_cfg`
(mmcv/runner/optimizer/default_constructor.py): `keys` maps a substring of the parameter path to whether
it decays; the longest matching key (ties: alphabetical) decides and overrides the other rules, as a
matching custom key does in mmcv. Otherwise `norms` decides for normalisation-layer parameters and
`biases` for every other `bias`; everything else decays. mmcv knows a norm layer by its module type; here
a parameter is a norm's when its leaf is `scale` (Flax LayerNorm) or a module on its path is named
`*norm*` / `ln`, `ln1`, ... (every LayerNorm of our models is).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax

from clover_jax.param_paths import path_to_str

DECAY_RULES: dict[str, dict[str, Any]] = {
    # Ours: no decay on norms, biases, position and token-type embeddings, relative-position tables and the
    # Swin mask token (`fusion/spatial_pos`, `text_encoder/embeddings/position_embeddings`, ...).
    "ours": dict(norms=False, biases=False,
                 keys={"position": False, "_pos": False, "token_type": False, "rel_pos": False, "mask_token": False}),
    # The official pre-training and retrieval configs: norm_decay_mult=0, bias_decay_mult=0, custom_keys
    # absolute_pos_embed and relative_position_bias_table with decay_mult=0 (pretrain_webvid_cc3m.py 131-136).
    # BERT position / token-type embeddings, the fusion position tables and token types and the mask token decay.
    "official": dict(norms=False, biases=False,
                     keys={"absolute_pos_embed": False, "relative_position_bias_table": False}),
    # The official QA configs: norm_decay_mult=0, bias_decay_mult=0, custom_keys {'qa_head': lr_mult=10}: the
    # key (decay_mult 1) overrides the norm and bias rules, so the head's norms and biases decay, and so do
    # the relative-position tables. Our multiple-choice head is `mc_head` (the official one is `qa_head`).
    "official_qa": dict(norms=False, biases=False, keys={"qa_head": True, "mc_head": True}),
}
_NORM_MODULE = re.compile(r"norm|^ln\d*$", re.IGNORECASE)


def rule_set(name: str) -> dict[str, Any]:
    """The rule set `name`; ValueError names the valid ones."""
    if name not in DECAY_RULES:
        raise ValueError(f"optim.decay_rules={name!r}; valid: {sorted(DECAY_RULES)}")
    return DECAY_RULES[name]


def _matching_key(path: str, keys: Mapping[str, bool]) -> str | None:
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in path:
            return key
    return None


def decays(path: str, rules: str = "ours") -> bool:
    """Whether the parameter at 'a/b/leaf' gets weight decay under the rule set `rules`."""
    rule = rule_set(rules)
    components = [c for c in path.split("/") if c]
    if not components:  # a bare array as the whole params tree (also optax's placeholder tree)
        return True
    key = _matching_key(path, rule["keys"])
    if key is not None:
        return bool(rule["keys"][key])
    if components[-1] == "scale" or any(_NORM_MODULE.search(c) for c in components[:-1]):
        return bool(rule["norms"])
    if components[-1] == "bias":
        return bool(rule["biases"])
    return True


def decay_mask(params: Any, rules: str = "ours") -> Any:
    """Tree of bools (True = decayed) with the structure of `params`, from `decays` on each path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_to_str(p), rules), params)


def split_names(params: Any, rules: str = "ours") -> tuple[list[str], list[str]]:
    """(decayed paths, not-decayed paths) of `params`, each sorted."""
    flat = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return sorted(p for p in flat if decays(p, rules)), sorted(p for p in flat if not decays(p, rules))


def describe(params: Any, rules: str = "ours") -> str:
    """One line: how many tensors decay under `rules`, and the rules."""
    decayed, kept = split_names(params, rules)
    rule = rule_set(rules)
    keys = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in rule["keys"].items())
    return (f"weight decay: decayed {len(decayed)} tensors, not decayed {len(kept)}; rules: {rules} "
            f"(norms {'yes' if rule['norms'] else 'no'}, biases {'yes' if rule['biases'] else 'no'}, keys {keys})")
