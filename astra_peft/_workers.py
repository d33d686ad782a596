"""Decomposing several layers at once on CPU, each on one thread.

A layer's decomposition is a chain of small dense operations (d ≤ a few thousand): a Householder reduction that is
half matrix-vector work, a QR, a few products. Split over threads inside each operation (torch's intra-op
parallelism, the BLAS's threads) they scale poorly, and every operation ends in a barrier where the threads of one
library spin while the other's run: at 2 threads SmolLM2's decomposition took longer in wall time than at 1
(benchmarks/README.md, issue 18). Layers are independent, so the threads are better spent one layer each: the
LAPACK and torch calls release the GIL. Results come back in the layers' order, so what is reported and written
does not depend on which thread finished first.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# Layers larger than this are decomposed one at a time with every thread inside each operation: there the operations
# are large enough to use them, and only one layer's float64 working set (a few d × d matrices) is held at a time.
MAX_PARALLEL_DIM = 2048
# At most this many layers in flight: each holds its float64 statistic and the decomposition's copies of it
# (≈ 3·d²·8 bytes, ≤ 100 MB at MAX_PARALLEL_DIM), so memory stays within a few hundred MB however many cores.
MAX_WORKERS = 8


def layer_workers(dims: Iterable[tuple[int, int]], on_cuda: bool) -> int:
    """How many layers to decompose at once: torch's thread count (capped) on CPU when every layer is small; 1 on
    GPU, where one decomposition already fills the device, or when a layer exceeds MAX_PARALLEL_DIM."""
    if on_cuda or any(max(d) > MAX_PARALLEL_DIM for d in dims):
        return 1
    return max(1, min(torch.get_num_threads(), MAX_WORKERS))


@contextmanager
def one_thread_per_op():
    """One thread inside each operation for the block (the workers are the parallelism), restored after: torch's
    intra-op threads, and the BLAS that SciPy's LAPACK calls run on (OpenBLAS, its own thread pool). Left at
    its default, each of two concurrent LAPACK calls asks OpenBLAS for every core, and the calls wait on each other's
    spinning threads: a decomposition that took 6 s took 160 s once on this 2-core machine."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn(item) for each of `items`, in their order, with at most `workers` calls in flight.

    `items` is consumed lazily on the calling thread (an item is made only when a slot is free), and only the
    futures are kept: an item (a layer's float64 statistic) is freed as soon as its call returns, so at most
    `workers` + 1 exist at once. An exception of fn is raised here, in order, after the calls in flight have
    finished: nothing runs on after the caller has seen it. With workers == 1 everything runs on the calling
    thread, as a plain loop.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    with one_thread_per_op(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="astra-decompose") as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                del item
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error or an abandoned generator: start nothing more
                future.cancel()
