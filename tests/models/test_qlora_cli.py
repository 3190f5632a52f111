"""configs/qlora-causal.yaml end to end on a tiny 4-bit Llama: train.py trains adapters, exports them (adapter and
merged), and the exports agree with each other and beat the untrained base on the training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
generation = pytest.importorskip("lit_fast.tasks.causal_lm")

from tests.conftest import write_jsonl  # noqa: E402

CONFIG = "configs/qlora-causal.yaml"
PAIRS = [("what color is the sky", "blue"), ("what color is the grass", "green"), ("what color is the sun", "yellow")]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("qlora-cli-llama")
    words = sorted({w for prompt, answer in PAIRS for w in (prompt + " " + answer).split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a random head with 0.02-sized weights cannot express a peaked distribution at all
        model.lm_head.weight.mul_(25)
    model.save_pretrained(path)
    return str(path)


def _train(run_train, model_dir: str, data: Path, out: Path, export: str) -> None:
    code, _, err = run_train(
        "--config", CONFIG, "--model.pretrained", model_dir, "--model.chat_template", "false",
        "--model.max_length", "32", "--model.lr", "0.02",
        "--model.lora.dropout", "0.0", "--model.lora.export", export,
        "--data.path", str(data), "--data.val_fraction", "0.2", "--data.batch_size", "8",
        "--trainer.max_steps", "30", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.default_root_dir", str(out.parent / f"runs-{export}"),
        "--export_dir", str(out))
    assert code == 0, err


def _completion_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean cross-entropy of the completions (and EOS) given their prompts, as the training loss counts it."""
    losses = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.inference_mode():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_qlora_config_trains_and_exports(run_train, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_fast.models.quantization import bnb_config, is_quantized, prepare_quantized_model

    rows = [{"prompt": prompt, "completion": " " + answer} for prompt, answer in PAIRS] * 10
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    _train(run_train, tiny_llama_dir, data, tmp_path / "adapter", "adapter")
    _train(run_train, tiny_llama_dir, data, tmp_path / "merged", "merged")

    adapter_files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter_files and "model.safetensors" not in adapter_files
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not is_quantized(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=bnb_config("nf4", "fp32", "cpu"))
    with_adapters = PeftModel.from_pretrained(prepare_quantized_model(base, "nf4"), tmp_path / "adapter").eval()
    untrained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()

    # training lowered the loss on its data; both exports hold the same fine-tuned model (same seed, same steps)
    trained_loss, before = _completion_loss(merged, tokenizer, rows[:3]), _completion_loss(untrained, tokenizer, rows[:3])
    assert trained_loss < before - 1.0, (trained_loss, before)
    ids = tokenizer([r["prompt"] for r in rows[:3]], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, with_adapters(ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("decoding", ["hf", "fast"])
def test_generate_with_quantized_weights(run_predict, tiny_llama_dir, tmp_path, decoding):
    """--model.quantization on the generation config: transformers generate, or lit_fast's loop over bnb layers."""
    from tests.conftest import read_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _ in PAIRS])
    outputs = {}
    for mode in (None, "nf4", "int8", "nf4+emb"):  # nf4+emb: the W4 winner, embedding table and head in 4 bits
        out = tmp_path / f"{decoding}-{mode}.jsonl"
        code, _, err = run_predict(
            "--config", "configs/generate-smollm2.yaml", "--model.pretrained", tiny_llama_dir,
            "--model.chat_template", "false", "--model.max_new_tokens", "4", "--model.decoding", decoding,
            *(("--model.quantization", mode) if mode else ()), "--data.path", str(prompts), "--data.id_column", "null",
            "--trainer.accelerator", "cpu", "--output", str(out))
        assert code == 0, err
        outputs[mode] = read_jsonl(out)
    assert all(len(rows) == len(PAIRS) for rows in outputs.values())
    # the tiny model's answers are near-ties, so only int8 (closest to full precision) must give the same text
    assert [r["generated_text"] for r in outputs["int8"]] == [r["generated_text"] for r in outputs[None]]
