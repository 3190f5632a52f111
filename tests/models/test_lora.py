"""LoRA settings, application and export (merged: plain transformers; adapter: peft on the base)."""

import pytest
import torch
from _decoder_models import causal_model

from lit_fast.errors import ConfigError
from lit_fast.models.lora import LoraSettings, apply_lora, export_lora

peft = pytest.importorskip("peft")


def _trained_lora(tmp_path):
    base_dir = tmp_path / "base"
    causal_model("llama").save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir),
                       LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), "CAUSAL_LM")
    with torch.no_grad():  # stand-in for training: non-zero B matrices change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return base_dir, model.eval()


def test_only_adapters_train():
    model = apply_lora(causal_model("opt"), LoraSettings(rank=2, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_export_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = _trained_lora(tmp_path)
    export_lora(model, tmp_path / "merged", "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n in merged.state_dict())
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert any("lora_" in n for n, _ in model.named_parameters()), "export must not unload the trained module"


def test_adapter_export_loads_on_the_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, model = _trained_lora(tmp_path)
    export_lora(model, tmp_path / "adapter", "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_settings_are_clear():
    with pytest.raises(ConfigError, match="lora.rank must be >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(ConfigError, match="merged or adapter"):
        LoraSettings(export="both")
    with pytest.raises(ConfigError, match=r"does not fit .* Linear layers of this model: .*q_proj"):
        apply_lora(causal_model("llama"), LoraSettings(target_modules=["query_key_value"]))
