"""Parameter names: nested trees <-> {"a/b/c": leaf}, and the "a/b/c" name of a jax key path."""
from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested param dict -> {"a/b/c": leaf}."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested param dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def path_to_str(path: tuple[Any, ...]) -> str:
    """'a/b/c' from a jax key path (dict keys, attribute names, sequence indices)."""
    return "/".join(str(next((getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)), key))
                    for key in path)
