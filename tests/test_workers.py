"""Layers decomposed side by side (astra_peft/_workers.py): the same initialisation as one at a time, results in
the layers' order, errors raised in order with nothing left running, torch's thread count restored."""

import threading
import time

import pytest
import torch
from conftest import logits, make_batches, peft_model

from astra_peft import AstraConfig, collect_activation_stats, initialize_astra_weights
from astra_peft._workers import MAX_PARALLEL_DIM, MAX_WORKERS, layer_workers, ordered_map
from astra_peft.layers import lora_layers

QUIET = dict(show_progress=False)


@pytest.fixture
def threads():
    """Set torch's thread count for a test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    made, running, peak = [], [0], [0]
    lock = threading.Lock()

    def items():
        for i in range(12):
            made.append(i)
            yield i

    def slow(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 * ((i * 7) % 5))  # later items often finish first
        with lock:
            running[0] -= 1
        return i * i

    seen = []
    for result in ordered_map(slow, items(), 3):
        assert len(made) - len(seen) <= 3 + 1  # at most `workers` in flight, plus the one being made
        seen.append(result)
    assert seen == [i * i for i in range(12)]
    assert peak[0] <= 3


def test_ordered_map_raises_in_order_after_the_calls_in_flight(threads):
    threads(3)
    finished = []

    def fn(i):
        if i == 2:
            raise ValueError("layer 2")
        time.sleep(0.05)
        finished.append(i)
        return i

    got = []
    with pytest.raises(ValueError, match="layer 2"):
        for result in ordered_map(fn, iter(range(10)), 3):
            got.append(result)
    assert got == [0, 1]  # the results before the failing item, and no later one
    settled = list(finished)
    time.sleep(0.2)
    assert finished == settled  # nothing still running after the error reached the caller
    assert max(finished) < 2 + 3  # and nothing started beyond the window
    assert torch.get_num_threads() == 3  # restored


def test_layer_workers():
    assert layer_workers([(576, 576), (1536, 576)], on_cuda=True) == 1
    assert layer_workers([(576, 576), (MAX_PARALLEL_DIM + 1, 576)], on_cuda=False) == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert layer_workers([(576, 576)], on_cuda=False) == 2
        torch.set_num_threads(MAX_WORKERS + 4)
        assert layer_workers([(576, 576)], on_cuda=False) == MAX_WORKERS
    finally:
        torch.set_num_threads(before)


def _init(family, threads_n, set_threads, batches, config):
    set_threads(threads_n)
    model = peft_model(family)
    stats = collect_activation_stats(model, batches, model.peft_config["default"], config)
    report = initialize_astra_weights(model, stats=stats, astra_config=config)
    assert torch.get_num_threads() == threads_n  # restored after the workers
    ab = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
          for n, m in lora_layers(model, "default").items()}
    return model, report, ab


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("selection", ["smallest", "largest"])
def test_parallel_decomposition_initialises_as_one_at_a_time(family, selection, threads):
    batches = make_batches()
    config = AstraConfig(eigen_selection=selection, **QUIET)
    _, serial_report, serial = _init(family, 1, threads, batches, config)
    model, report, parallel = _init(family, 3, threads, batches, config)
    assert [layer.name for layer in report.layers] == [layer.name for layer in serial_report.layers]
    for a, b in zip(report.layers, serial_report.layers):
        assert a.selection.indices == b.selection.indices
        assert a.selection.n_selected_degenerate == b.selection.n_selected_degenerate
    for name, (a, b) in serial.items():
        pa, pb = parallel[name]
        # float64 arithmetic of one layer, on one thread or another (the BLAS may split a call differently when
        # two run at once): the same factors up to rounding, far below the float32 adapter's resolution
        assert (pa - a).abs().max() <= 1e-6 and (pb - b).abs().max() <= 1e-6, name
    base = peft_model(family)
    with base.disable_adapter():
        before = logits(base, batches[0])
    assert (logits(model, batches[0]) - before).abs().max() <= 1e-4


def test_a_refused_layer_leaves_the_model_untouched_with_workers(threads):
    threads(3)
    batches = make_batches()
    model = peft_model("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    # gate/up (d_out 64 > d_in 32) have structural zeros, which `smallest` selects and null_space="raise" refuses:
    # the refusal comes from a worker while other layers are in flight
    config = AstraConfig(null_space="raise", **QUIET)
    stats = collect_activation_stats(model, batches, model.peft_config["default"], config)
    with pytest.raises(ValueError, match="Layer '.*(gate|up)_proj'.*degenerate"):
        initialize_astra_weights(model, stats=stats, astra_config=config)
    assert torch.get_num_threads() == 3
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_ordered_map_frees_each_item_when_its_call_returns(threads):
    """Items are layers' float64 statistics: only the calls in flight and the one being made may hold them."""
    import gc
    import weakref

    class Item:
        pass

    refs = []

    def items():
        for _ in range(10):
            item = Item()
            refs.append(weakref.ref(item))
            yield item
            del item

    for n, _ in enumerate(ordered_map(lambda item: id(item), items(), 2)):
        gc.collect()
        alive = sum(r() is not None for r in refs)
        assert alive <= 2 + 1, (n, alive)
