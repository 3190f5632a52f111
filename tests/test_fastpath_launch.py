"""`kernels.launch` (direct launches of compiled Triton kernels) and the front's host-side helpers, on the CPU with
stand-ins for Triton: which calls reuse a compiled kernel, which go through Triton's own launch, and what the
direct launch passes."""

from __future__ import annotations

import types

import pytest
import torch

from lit_fast.fastpath import kernels, rows


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
            key = tuple(kernels._specialization(a) for a in args) + tuple(kwargs.items())
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


def test_a_launch_hook_or_the_switch_sends_every_call_through_triton(fast, monkeypatch):
    kernel = FakeKernel()
    x = torch.zeros(64)
    fast.launch_enter_hook.calls.append(lambda *a: None)  # a profiler listening
    for _ in range(3):
        kernels.launch(kernel, (1,), x, x, 64, 1e-5, BLOCK=64)
    assert len(kernel.through_triton) == 3
    fast.launch_enter_hook.calls.clear()
    monkeypatch.setattr(kernels, "FAST_LAUNCH", False)
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
