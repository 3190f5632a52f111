"""The one CUDA-graph cache (lit_fast/fastpath/cuda_graphs.py): repeats before capture, the oldest dropped to stay
within max_graphs and max_bytes, giving up after max_captures. The captures themselves need CUDA (GPU tests)."""

import pytest
import torch

from lit_fast.fastpath.cuda_graphs import Graph, GraphCache, GraphLimits


def _graph(nbytes: int = 0) -> Graph:
    return Graph(graph=None, outputs=None, nbytes=nbytes)


def test_a_key_is_due_the_repeats_th_time_and_one_off_keys_are_forgotten():
    cache = GraphCache(GraphLimits(repeats=3, max_seen=4))
    assert [cache.due("a") for _ in range(4)] == [False, False, True, True]
    for key in "bcd":
        cache.due(key)
    cache.due("e")  # the fifth key counted: the counts start over
    assert list(cache.seen) == ["e"] and not cache.due("a")


def test_the_oldest_graphs_go_first_to_stay_within_max_graphs_and_max_bytes():
    cache = GraphCache(GraphLimits(max_graphs=3, max_bytes=1000))
    for key in "abc":
        cache.admit(key, _graph(100))
    cache.admit("d", _graph(100))  # a fourth: the oldest goes
    assert list(cache.graphs) == ["b", "c", "d"]
    cache.admit("e", _graph(900))  # only "d" (100) may stay beside it
    assert list(cache.graphs) == ["d", "e"] and cache.nbytes == 1000
    cache.admit("f", _graph(2000))  # larger than the limit alone: kept, alone
    assert list(cache.graphs) == ["f"]


def test_the_cache_gives_up_after_max_captures_and_frees_its_graphs():
    cache = GraphCache(GraphLimits(repeats=1, max_captures=2))
    cache.admit("a", _graph())
    cache.captures = 2
    assert cache.capture("b", lambda: None, torch.device("cpu")) is None  # gives up before touching CUDA
    assert cache.stopped and not cache.graphs and cache.pool is None and not cache.due("a")
    assert cache.capture("c", lambda: None, torch.device("cpu")) is None


def test_a_copied_model_gets_an_empty_cache_with_the_same_limits():
    import copy

    cache = GraphCache(GraphLimits(max_graphs=5))
    cache.admit("a", _graph())
    clone = copy.deepcopy(cache)
    assert clone.limits == cache.limits and not clone.graphs


@pytest.mark.gpu
def test_a_capture_replays_what_it_recorded_and_reads_its_inputs_in_place():
    cache = GraphCache(GraphLimits(repeats=1))
    x = torch.arange(8.0, device="cuda")
    graph = cache.capture("double", lambda: x * 2, x.device, keep=(x,), nbytes=32)
    x.copy_(torch.full_like(x, 5.0))
    assert torch.equal(graph.replay(), torch.full_like(x, 10.0)) and cache.get("double") is graph
