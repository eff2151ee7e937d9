"""Host-side thread pools: decoding and preprocessing images ahead of the device (benchmarks,
annotation), where the work releases the GIL (PIL, numpy)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def map_threaded(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 4
                 ) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed ``workers`` at a time ahead of the
    consumer (a bounded window, so memory stays flat)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        window = 4 * max(1, workers)
        futures = [pool.submit(fn, x) for x in items[:window]]
        for i in range(len(items)):
            if i + window < len(items):
                futures.append(pool.submit(fn, items[i + window]))
            yield futures[i].result()
            futures[i] = None
