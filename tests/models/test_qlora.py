"""QLoRA on a tiny random Llama (CPU): k-bit preparation, training steps, adapter round trip, merged export."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from lit_fast.errors import ConfigError  # noqa: E402
from lit_fast.models import qlora, quantization as q  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qlora-llama")
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _base(path: str, mode: str | None = "nf4"):
    from transformers import AutoModelForCausalLM

    config = q.bnb_config(mode, "fp32", "cpu") if mode else None
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    # fp32 compute really computes in fp32 on CPU (no bf16 fused kernel), so exports can be compared exactly
    return q.prepare_quantized_model(model, mode)


IDS = torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(3))


def _train(model, steps: int = 8) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_without_lora_config(llama_dir):
    with pytest.raises(ConfigError, match="QLoRA needs a LoRA config"):
        qlora.prepare_qlora(_base(llama_dir), None)
    with pytest.raises(ConfigError, match="needs a quantized base model"):
        qlora.prepare_qlora(_base(llama_dir, None), {"r": 4})
    with pytest.raises(ConfigError, match="invalid LoRA settings"):
        qlora.prepare_qlora(_base(llama_dir), {"rank": 4})


@pytest.fixture(scope="module")
def trained(llama_dir):
    torch.manual_seed(0)
    model = qlora.prepare_qlora(_base(llama_dir), {"r": 8, "lora_alpha": 16}, task_type="CAUSAL_LM")
    losses = _train(model)
    return model.eval(), losses


def test_steps_lower_the_loss_and_only_adapters_train(trained):
    model, losses = trained
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} >= {"q_proj", "v_proj", "down_proj"}  # all-linear by default
    assert losses[-1] < losses[0] - 0.5, losses


def test_adapters_round_trip(trained, llama_dir, tmp_path):
    from peft import PeftModel

    model, _ = trained
    qlora.export_qlora(model, tmp_path, "adapter")
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 500_000  # adapters only, not the base
    reloaded = PeftModel.from_pretrained(_base(llama_dir), tmp_path).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_full_precision_export(trained, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    model, _ = trained
    qlora.export_qlora(model, tmp_path, "merged", dtype=dtype)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    assert not q.is_quantized(merged) and merged.dtype == getattr(torch, dtype)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.inference_mode():
        want, got = model(IDS).logits, merged(IDS).logits.float()
    # dequantized base + adapters reproduces the QLoRA model: exactly in fp32, to bf16 rounding in bf16
    tol = {"float32": 1e-4, "bfloat16": 0.1}[dtype]
    assert (got - want).abs().max() < tol
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the trained model kept its adapters


def test_merge_from_int8(llama_dir):
    torch.manual_seed(0)
    model = qlora.prepare_qlora(_base(llama_dir, "int8"), {"r": 4, "lora_alpha": 8})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # non-zero adapters, so that the merge has something to fold in
    model.eval()
    merged = qlora.merge_qlora(model, "float32")
    assert not q.is_quantized(merged)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(merged(IDS).logits.flatten(0, 1), model(IDS).logits.flatten(0, 1))
    assert cos.min() > 0.99  # int8 layers compute with int8 activations, the merged model in fp32


def _lora_grads(path: str, mode: str, infer_first: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q.bnb_config(mode, "bf16", "cpu"))
    if infer_first:  # an eval-mode forward: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights (no backward)
        with torch.inference_mode():
            model(IDS[:2])
    torch.manual_seed(0)
    peft_model = qlora.prepare_qlora(model, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    with torch.no_grad():
        for i, (name, p) in enumerate(peft_model.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    peft_model.train()
    peft_model(input_ids=IDS[:2], labels=IDS[:2]).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq"])
def test_gradients_stay_right_after_inference(llama_dir, mode):
    """Without undoing bitsandbytes' CPU repacking, the gradients below are ~100% off (and torch warns)."""
    want, got = _lora_grads(llama_dir, mode, False), _lora_grads(llama_dir, mode, True)
    worst = max(float((got[n] - want[n]).norm() / want[n].norm()) for n in want)
    assert worst < 0.05, worst  # the repacked scales keep their bf16 rounding (~0.4% each)


def test_load_trainable_state(trained):
    model, _ = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}  # like a Lightning checkpoint: base + adapters
    assert any(k.endswith("weight.absmax") for k in state)  # the packed base's scales, which load_state_dict rejects
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        model.get_parameter(name).zero_()
    qlora.load_trainable_state(model, state)
    torch.testing.assert_close(model.get_parameter(name), state[name])
    del state[name]
    with pytest.raises(ConfigError, match="lacks 1 trainable tensors"):
        qlora.load_trainable_state(model, state)


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
def test_checkpoint_of_a_qlora_model_loads_back(llama_dir, mode):
    """What Lightning does with the best checkpoint: module.load_state_dict(its own earlier state_dict)."""
    torch.manual_seed(0)
    model = qlora.prepare_qlora(_base(llama_dir, mode), {"r": 4, "lora_alpha": 8})
    _train(model, steps=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        model.get_parameter(name).zero_()
    model.load_state_dict(state)  # strict
    torch.testing.assert_close(model.get_parameter(name), state[name])
    model.eval()
    with torch.inference_mode():
        assert torch.isfinite(model(IDS).logits).all()
    # a checkpoint of another base is refused, not half-loaded
    other = {k: (v * 2 if k.endswith(("absmax", "SCB")) else v) for k, v in state.items()}
    with pytest.raises(ConfigError, match="different quantized base"):
        model.load_state_dict(other)
