"""`kernels.launch` (direct launches of compiled Triton kernels) and the front's host-side helpers, on the CPU with
stand-ins for Triton: which calls reuse a compiled kernel, which go through Triton's own launch, and what the
direct launch passes."""

from __future__ import annotations

import types

import pytest
import torch

from lit_fast.fastpath.encoder import kernels, rows


class FakeCompiled:
    packed_metadata = "meta"
    function = "fn"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeKernel:
    """Triton's `kernel[grid](*args, **kw)`: records the call and returns one compiled kernel per specialization."""

    arg_names = ["X", "Out", "width", "eps", "BLOCK"]

    def __init__(self):
        self.through_triton = []
        self.compiled = {}

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.through_triton.append((grid, args, kwargs))
            key = tuple(kernels._specializations(args)) + tuple(kwargs.items())
            return self.compiled.setdefault(key, FakeCompiled())
        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(kernels, "_FAST_LAUNCH_OK", True)
    hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]),
                                  launch_exit_hook=types.SimpleNamespace(calls=[]))
    monkeypatch.setattr(kernels, "_knobs", types.SimpleNamespace(runtime=hooks))
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    return hooks


def test_the_second_launch_of_a_specialization_goes_direct_with_every_argument_in_order(fast):
    kernel = FakeKernel()
    x, out = torch.zeros(64), torch.zeros(64)
    kernels.launch(kernel, (7,), x, out, 64, 1e-5, BLOCK=64, num_warps=2)
    assert len(kernel.through_triton) == 1
    kernels.launch(kernel, (9, 2), x, out, 64, 1e-5, BLOCK=64, num_warps=2)
    assert len(kernel.through_triton) == 1  # reused
    (compiled,) = kernel.compiled.values()
    (args,) = compiled.launches
    assert args[:7] == (9, 2, 1, 1234, "fn", "meta", None) and args[7:9] == (None, None)
    assert args[9:11] == (x, out) and args[11:] == (64, 1e-5, 64)  # runtime arguments, then the constexpr


@pytest.mark.parametrize("change", ["misaligned", "int is 1", "int not /16", "int64", "constexpr", "warps", "dtype"])
def test_anything_triton_specializes_on_gets_its_own_compiled_kernel(fast, change):
    kernel = FakeKernel()
    base = torch.zeros(80)
    args, kw = [base[:64], base[:64], 64, 1e-5], {"BLOCK": 64, "num_warps": 2}
    kernels.launch(kernel, (1,), *args, **kw)
    if change == "misaligned":
        args[0] = base[1:65]  # 4 bytes past a 16-byte boundary
    elif change == "int is 1":
        args[2] = 1
    elif change == "int not /16":
        args[2] = 65
    elif change == "int64":
        args[2] = 2**33
    elif change == "constexpr":
        kw["BLOCK"] = 128
    elif change == "warps":
        kw["num_warps"] = 4
    else:
        args[1] = torch.zeros(64, dtype=torch.float16)
    kernels.launch(kernel, (1,), *args, **kw)
    assert len(kernel.through_triton) == 2  # not reused: Triton's own launch (and compile) path


def test_a_launch_hook_or_the_interpreter_sends_every_call_through_triton(fast, monkeypatch):
    kernel = FakeKernel()
    x = torch.zeros(64)
    fast.launch_enter_hook.calls.append(lambda *a: None)  # a profiler listening
    for _ in range(3):
        kernels.launch(kernel, (1,), x, x, 64, 1e-5, BLOCK=64)
    assert len(kernel.through_triton) == 3
    fast.launch_enter_hook.calls.clear()
    monkeypatch.setattr(kernels, "_FAST_LAUNCH_OK", False)  # as under TRITON_INTERPRET=1
    for _ in range(2):
        kernels.launch(kernel, (1,), x, x, 64, 1e-5, BLOCK=64)
    assert len(kernel.through_triton) == 5


def test_a_kernel_with_a_parameter_left_to_its_default_is_never_launched_directly(fast):
    kernel = FakeKernel()
    x = torch.zeros(64)
    for _ in range(2):
        kernels.launch(kernel, (1,), x, x, 64, 1e-5)  # BLOCK not given: the full argument list is unknown here
    assert len(kernel.through_triton) == 2


def test_next_power_of_2_matches_its_definition():
    assert [kernels.next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 768, 1024, 1025)] == [0, 1, 2, 4, 4, 8, 1024,
                                                                                          1024, 2048]


def test_host_copy_hands_back_the_values_it_was_given_each_time():
    copy = rows.HostCopy()
    assert copy.start(torch.tensor([3, 1, 2], dtype=torch.int32)).tolist() == [3, 1, 2]
    assert copy.start(torch.arange(5)).tolist() == [0, 1, 2, 3, 4]


# ---- cuda_graphs="auto": which batches replay graphs (the decisions; the replays themselves are GPU tests) -------


def _packing(batch: int, tokens: int, max_len: int):
    from lit_fast.fastpath.encoder.padding import Packing

    lengths = (tokens // batch,) * (batch - 1) + (tokens - (tokens // batch) * (batch - 1),)
    return Packing(batch, max_len, None, torch.zeros(batch + 1, dtype=torch.int32), lengths, max_len)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: counts replays."""

    replays = 0

    def replay(self):
        FakeGraph.replays += 1


def test_auto_graphs_wait_for_a_repeated_small_shape_and_never_take_large_batches():
    from lit_fast.fastpath import FastPathOptions
    from lit_fast.fastpath.encoder import layer_graphs

    auto = layer_graphs.LayerGraphs(FastPathOptions(cuda_graphs="auto"))
    small = _packing(8, 1000, 200)
    assert not auto.wants(small, torch.float16)  # first sight: eager
    assert auto.wants(small, torch.float16)  # seen before: replay (captured on this call)
    assert not auto.wants(_packing(8, 1000, 200), torch.bfloat16)  # another dtype is another shape
    large = _packing(64, layer_graphs.AUTO_MAX_TOKENS + 1, 256)
    assert not any(auto.wants(large, torch.float16) for _ in range(3))
    always = layer_graphs.LayerGraphs(FastPathOptions(cuda_graphs=True))
    assert always.wants(large, torch.float16) and always.wants(small, torch.float16)
    # what the front asks before it computes the first layer's q/k/v in its graph
    assert auto.will_replay(1000) and not auto.will_replay(layer_graphs.AUTO_MAX_TOKENS + 1)
    assert always.will_replay(layer_graphs.AUTO_MAX_TOKENS + 1)


def test_auto_graphs_stop_and_free_everything_after_too_many_captures():
    from lit_fast.fastpath import FastPathOptions
    from lit_fast.fastpath.cuda_graphs import Graph
    from lit_fast.fastpath.encoder import layer_graphs
    from _encoder_models import tiny_text_model

    model = tiny_text_model("bert")
    stack = to_stack(model)
    auto = layer_graphs.LayerGraphs(FastPathOptions(cuda_graphs="auto"))
    auto.cache.captures = layer_graphs.AUTO_LIMITS.max_captures
    auto.cache.graphs[("old",)] = Graph(FakeGraph(), None)
    tokens = torch.zeros(10, model.config.hidden_size)
    packing = _packing(2, 10, 5)
    assert auto(tokens, packing, stack.layer_parts) is None  # declined: the caller runs the layers itself
    assert auto.cache.stopped and not auto.cache.graphs and auto.cache.pool is None
    assert not auto.wants(packing, torch.float16)


def test_a_known_shape_replays_first_and_a_stale_graph_is_dropped_after_the_check():
    """The graph last replayed for a batch shape is replayed before the layers are looked up; the weights are checked
    after it (while the GPU would run it). A check that fails throws that result away and forgets the graph."""
    from lit_fast.fastpath import FastPathOptions
    from lit_fast.fastpath.cuda_graphs import Graph
    from lit_fast.fastpath.encoder import layer_graphs
    from _encoder_models import tiny_text_model

    model = tiny_text_model("bert")
    stack = to_stack(model)
    width = model.config.hidden_size
    packing = _packing(2, 10, 5)
    auto = layer_graphs.LayerGraphs(FastPathOptions(cuda_graphs="auto"))
    shape = (2, layer_graphs.bucket_tokens(11), layer_graphs.bucket_max_len(5), torch.float32, width,
             torch.device("cpu"))
    key = auto._key(shape, stack.layer_parts())
    out = torch.arange(64.0 * width).view(64, width)
    static_tokens = torch.zeros(64, width)
    auto.cache.graphs[key] = Graph(FakeGraph(), (static_tokens, torch.zeros(4, dtype=torch.int32), out))
    auto.latest[shape] = key
    looked_up = []
    FakeGraph.replays = 0

    def resolve():
        looked_up.append(FakeGraph.replays)  # how many replays had been launched when the layers were looked up
        return stack.layer_parts()

    tokens = torch.randn(10, width)
    got = auto(tokens, packing, resolve)
    assert torch.equal(got, out[:10]) and got.data_ptr() != out.data_ptr()  # a copy: the next replay reuses `out`
    assert torch.equal(static_tokens[:10], tokens) and looked_up == [1]
    view = auto(tokens, packing, resolve, copy_out=False)  # for a caller that copies it itself (unpacking)
    assert torch.equal(view, out[:10]) and view.data_ptr() == out.data_ptr() and looked_up == [1, 2]
    dense = model.encoder.layer[1].output.dense
    dense.weight = torch.nn.Parameter(dense.weight.detach().clone())  # moved: the graph read the old one
    auto.cache.captures = layer_graphs.AUTO_LIMITS.max_captures  # so that no capture is tried here (it needs CUDA)
    assert auto(tokens, packing, resolve) is None
    assert FakeGraph.replays == 3 and key not in auto.cache.graphs and not auto.latest


def test_front_graphs_capture_on_the_second_sight_and_drop_a_graph_whose_embeddings_moved():
    """The front's graphs (front_graphs.py): a key is captured the second time it is seen; a replay is followed by
    the check of the embedding module's tensors, and a graph whose tables moved (or whose norm changed) is dropped
    and its embeddings reported stale; after its captures run out the front stops capturing."""
    from lit_fast.fastpath.cuda_graphs import Graph
    from lit_fast.fastpath.encoder import front_graphs
    from _encoder_models import tiny_text_model

    class FakeCopy:
        def target(self, count, device):
            self.count = count

        def written(self):
            self.waiting = True

    embeddings = tiny_text_model("bert").embeddings
    graphs = front_graphs.FrontGraphs()
    key = ("mask", "ids")
    assert not graphs.wants(key) and graphs.wants(key)
    assert graphs.replay(key, embeddings) is None  # nothing captured for it
    sources, tensors = front_graphs.embedding_sources(embeddings)
    assert len(tensors) == 7  # three tables, the norm's weight and bias, two index buffers
    FakeGraph.replays = 0

    def entry() -> Graph:
        sources, tensors = front_graphs.embedding_sources(embeddings)
        return Graph(FakeGraph(), front_graphs.FrontGraph(torch.zeros(5), torch.zeros(4, 8), None, None, FakeCopy(),
                                                          5, torch.device("cpu"), sources, []), tensors)

    graphs.cache.graphs[key] = first = entry()
    assert graphs.replay(key, embeddings) == (first.outputs, True) and first.outputs.copy.waiting
    assert first.outputs.copy.count == 5
    table = embeddings.position_embeddings
    table.weight = torch.nn.Parameter(table.weight.detach().clone())  # moved: the replay read the old one
    assert graphs.replay(key, embeddings) == (first.outputs, False) and key not in graphs.cache.graphs
    graphs.cache.graphs[key] = second = entry()
    embeddings.LayerNorm.eps = 1e-3  # captured as a constant
    assert graphs.replay(key, embeddings) == (second.outputs, False) and key not in graphs.cache.graphs
    assert FakeGraph.replays == 3
    graphs.cache.graphs[key] = entry()
    graphs.cache.captures = front_graphs.LIMITS.max_captures
    assert graphs.capture(("other",), embeddings, 5, [], lambda copy: None, torch.device("cpu"), 0) is None
    assert graphs.stopped and not graphs.cache.graphs and not graphs.wants(key)


def to_stack(model):
    from lit_fast.fastpath import to_fast_path

    to_fast_path(model, "packed")
    return model.encoder.forward


def test_cuda_graphs_takes_true_false_or_auto():
    from lit_fast.errors import ConfigError
    from lit_fast.fastpath import is_fast_path, to_fast_path
    from _encoder_models import tiny_text_model

    model = tiny_text_model("bert")
    with pytest.raises(ConfigError, match="cuda_graphs='sometimes'"):
        to_fast_path(model, cuda_graphs="sometimes")
    assert not is_fast_path(model)
    for mode in (True, False, "auto"):
        stack = to_fast_path(model, cuda_graphs=mode).encoder.forward
        assert (stack.graphed is None) == (mode is False)
        assert stack.graphed is None or stack.graphed.auto == (mode == "auto")


def test_graphs_decline_weights_made_under_inference_mode():
    """Inference tensors have no version counter: a graph could not see an in-place update of the q/k/v weights
    (which it reads as a remembered concatenation), so the layers run without graphs."""
    from lit_fast.fastpath import FastPathOptions
    from lit_fast.fastpath.encoder import layer_graphs
    from _encoder_models import tiny_text_model

    with torch.inference_mode():
        model = tiny_text_model("bert")
    stack = to_stack(model)
    for mode in ("auto", True):
        graphed = layer_graphs.LayerGraphs(FastPathOptions(cuda_graphs=mode))
        with torch.inference_mode():
            tokens = torch.zeros(10, model.config.hidden_size)
            assert graphed(tokens, _packing(2, 10, 5), stack.layer_parts) is None
        assert graphed.untracked and not graphed.cache.graphs and graphed.cache.captures == 0


def test_a_converted_model_with_graphs_and_a_plan_copy_can_be_deep_copied():
    """CUDA graphs and CUDA events cannot be copied; a copied model gets the same settings and empty caches."""
    import copy

    from _encoder_models import text_batch, tiny_text_model

    model = tiny_text_model("bert")
    stack = to_stack(model)

    class NotCopyable:
        def __reduce_ex__(self, protocol):
            raise TypeError("cannot pickle a CUDA graph")

    stack.graphed.cache.graphs[("shape",)] = NotCopyable()
    vars(model)["forward"].copy.event = NotCopyable()  # the front's
    twin = copy.deepcopy(model)
    twin_stack = twin.encoder.forward
    assert twin_stack is not stack and twin_stack.owner is twin.encoder
    assert twin_stack.graphed.auto and not twin_stack.graphed.cache.graphs
    assert vars(twin)["forward"].copy.event is None and vars(twin)["forward"].stack is twin_stack
    ids, mask = text_batch("right")
    with torch.inference_mode():
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).last_hidden_state,
                           model(input_ids=ids, attention_mask=mask).last_hidden_state)


@pytest.mark.skipif(__import__("lit_fast.fastpath.encoder.layers", fromlist=["varlen_attn"]).varlen_attn is None,
                    reason="torch without varlen_attn")
def test_the_log_line_says_what_cuda_graphs_will_do():
    from lit_fast.fastpath.encoder import policy

    cuda = torch.device("cuda")
    assert "CUDA graphs for repeated batches" in policy.describe("packed", cuda, torch.float16)
    assert "CUDA graphs for every batch" in policy.describe("packed", cuda, torch.float16, True)
    assert "CUDA graphs" not in policy.describe("packed", cuda, torch.float16, False)
    assert "CUDA graphs" not in policy.describe("packed", cuda, torch.float32)  # no varlen path to replay
    assert "CUDA graphs" not in policy.describe("packed", torch.device("cpu"), torch.float16)


def test_a_shape_whose_graph_was_dropped_to_make_room_runs_as_a_new_shape():
    """The cache drops the oldest graphs to stay within its limits; a batch shape that pointed at one is forgotten and
    runs as a new shape (here: no capture on the CPU, so the caller runs the layers)."""
    from lit_fast.fastpath import FastPathOptions
    from lit_fast.fastpath.encoder import layer_graphs
    from _encoder_models import tiny_text_model

    model = tiny_text_model("bert")
    stack = to_stack(model)
    auto = layer_graphs.LayerGraphs(FastPathOptions(cuda_graphs="auto"))
    shape = (2, layer_graphs.bucket_tokens(11), layer_graphs.bucket_max_len(5), torch.float32,
             model.config.hidden_size, torch.device("cpu"))
    auto.latest[shape] = ("a key whose graph is gone",)
    auto.cache.captures = layer_graphs.AUTO_LIMITS.max_captures
    assert auto(torch.zeros(10, model.config.hidden_size), _packing(2, 10, 5), stack.layer_parts) is None
    assert not auto.latest
