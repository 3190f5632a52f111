"""SDPA kernel policy: validation, explanations, strict/non-strict, the context manager."""

import logging

import pytest
import torch
import torch.nn.functional as F

from lit_fast.fastpath.decoder.sdpa import (
    check_attention_implementation,
    check_sdpa_backends,
    parse_sdpa_backends,
    sdpa_policy,
    why_not,
)
from lit_fast.errors import ConfigError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_attention_names():
    assert check_attention_implementation("sdpa") == "sdpa"
    assert check_attention_implementation("eager") == "eager"
    with pytest.raises(ConfigError, match="use one of sdpa, flash_attention_2, eager"):
        check_attention_implementation("flash")


def test_flash_attention_2_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    with pytest.raises(ConfigError, match="pip install flash-attn --no-build-isolation"):
        check_attention_implementation("flash_attention_2")


def test_parse_backends():
    assert parse_sdpa_backends(None) is None
    assert parse_sdpa_backends([]) is None
    assert parse_sdpa_backends("math") == ["math"]
    assert parse_sdpa_backends(["flash", "math", "flash"]) == ["flash", "math"]
    with pytest.raises(ConfigError, match=r"\['fast'\] not known"):
        parse_sdpa_backends(["flash", "fast"])


def test_cpu_efficient_only_explains_and_says_what_to_change():
    with pytest.raises(ConfigError) as err:
        check_sdpa_backends(["efficient", "cudnn"], device="cpu", dtype=torch.float32, head_dim=64)
    msg = str(err.value)
    assert "efficient: the efficient kernel exists only on CUDA GPUs" in msg
    assert "cudnn: the cudnn kernel exists only on CUDA GPUs" in msg
    assert "add 'efficient' or 'math'" in msg and "attention_strict: false" in msg


def test_cpu_non_strict_falls_back_to_math(caplog):
    with caplog.at_level(logging.WARNING, logger="lit_fast.fastpath.decoder.sdpa"):
        got = check_sdpa_backends(["efficient"], device="cpu", dtype=torch.float32, head_dim=64, strict=False)
    assert got == ["efficient", "math"]
    assert "Falling back to adding 'math'" in caplog.text
    # and the fallback really runs
    q = torch.randn(1, 2, 4, 8)
    with sdpa_policy(got):
        F.scaled_dot_product_attention(q, q, q)


def test_cpu_flash_and_math_fit():
    assert check_sdpa_backends(["flash"], device="cpu", dtype=torch.float32, head_dim=64) == ["flash"]
    assert check_sdpa_backends(["math"], device="cpu", dtype=torch.float32, head_dim=64) == ["math"]
    assert check_sdpa_backends(None, device="cpu", dtype=torch.float32, head_dim=64) is None


def test_policy_restricts_kernels_on_cpu():
    """Under efficient-only, a CPU SDPA call has no kernel: proof the context manager really restricts."""
    q = torch.randn(1, 2, 4, 8)
    with sdpa_policy(["efficient"]), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q)
    with sdpa_policy(["math"]):
        out = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


def test_why_not_rules_without_cuda():
    assert why_not("math", device="cpu", dtype=torch.float16, head_dim=300, has_mask=True) is None
    assert "only on CUDA" in why_not("cudnn", device="cpu", dtype=torch.float16, head_dim=64, has_mask=False)


@cuda
@pytest.mark.gpu
def test_gpu_flash_fp32_explained():
    with pytest.raises(ConfigError, match="flash takes only fp16/bf16 inputs, and the model runs in torch.float32"):
        check_sdpa_backends(["flash"], device="cuda", dtype=torch.float32, head_dim=64)


@cuda
@pytest.mark.gpu
def test_gpu_flash_with_mask_and_odd_head_dim():
    with pytest.raises(ConfigError, match="flash takes no padding"):
        check_sdpa_backends(["flash"], device="cuda", dtype=torch.bfloat16, head_dim=64, has_mask=True)
    with pytest.raises(ConfigError, match="head dimension"):
        check_sdpa_backends(["flash"], device="cuda", dtype=torch.bfloat16, head_dim=260, has_mask=False)
    assert check_sdpa_backends(["flash"], device="cuda", dtype=torch.bfloat16, head_dim=64, has_mask=False) == [
        "flash"]
    assert check_sdpa_backends(["flash", "efficient"], device="cuda", dtype=torch.bfloat16, head_dim=64) == [
        "flash", "efficient"]
