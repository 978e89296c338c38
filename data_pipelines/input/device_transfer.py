"""Host -> device: local numpy batches of every process -> global batch-sharded jax.Arrays, prefetched."""
from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

import numpy as np


def numpy_batches(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """Local batches as dicts of numpy arrays."""
    return iter(ds.as_numpy_iterator())


def to_global(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """Local batch -> global jax.Arrays sharded along the batch axis by `sharding` (e.g.
    NamedSharding(mesh, P("data"))); every process passes its own local rows."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_iterator(local_batches: Iterable[dict[str, np.ndarray]], sharding: Any, prefetch: int = 2) -> Iterator[dict]:
    """Yields global batches, keeping `prefetch` batches already transferred ahead of the consumer."""
    queue: collections.deque = collections.deque()
    iterator = iter(local_batches)
    for batch in iterator:
        queue.append(to_global(batch, sharding))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
