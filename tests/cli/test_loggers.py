"""Training logs: CSV by default (also where TensorBoard is installed), any Lightning logger by --trainer.logger."""

import csv
import importlib.util

import pytest
from conftest import ROOT, write_jsonl

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")


def _train(run_train, tmp_path, tiny_bert_dir, *extra):
    rows = [{"text": f"review {i} " + "word " * (i % 5), "category": "fresh" if i % 2 else "rotten"}
            for i in range(40)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    code, out, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--data.max_rows", "null", "--data.batch_size", "4", "--trainer.max_steps", "4",
                               "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
                               "--trainer.default_root_dir", str(tmp_path / "runs"), *extra)
    assert code == 0, err


def test_csv_is_the_default_logger(run_train, tmp_path, tiny_bert_dir):
    _train(run_train, tmp_path, tiny_bert_dir)
    (metrics,) = (tmp_path / "runs").glob("lightning_logs/version_0/metrics.csv")
    logged = {k for row in csv.DictReader(metrics.open()) for k, v in row.items() if v}
    assert {"train_loss", "val_loss", "val_acc", "val_f1", "val_precision", "val_recall"} <= logged
    assert not list((tmp_path / "runs").rglob("events.out.tfevents.*"))  # not TensorBoard, installed or not


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_logger_by_config(run_train, tmp_path, tiny_bert_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(run_train, tmp_path, tiny_bert_dir, "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
           "--trainer.logger.save_dir", str(tmp_path / "tb"), "--trainer.logger.name", "rotten")
    run = tmp_path / "tb" / "rotten" / "version_0"
    assert list(run.glob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(run)).Reload().Tags()["scalars"]  # every event file of the run
    assert {"train_loss", "val_loss", "val_acc", "val_f1", "val_precision", "val_recall"} <= set(scalars)
    assert list((tmp_path / "tb" / "rotten").glob("version_0/checkpoints/best-*.ckpt"))  # beside the logs
    assert not list((tmp_path / "runs").rglob("metrics.csv"))
