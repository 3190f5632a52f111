"""Batches (lit_fast/data/batching.py): every row once in evaluation, equal steps on every rank in training, and
loader workers that receive the codec, never the model."""

import pickle
from types import SimpleNamespace

from torch.utils.data import IterableDataset

from conftest import write_jsonl
from lit_fast.data.datamodule import TextDataModule
from lit_fast.training import PackedBatch


def _datamodule(rank: int, world: int) -> TextDataModule:
    dm = TextDataModule(batch_size=4, seed=1)
    dm.examples = {"fit": [{"index": i, "length": 1 + i % 9} for i in range(37)],
                   "val": [{"index": i, "length": 1 + i % 5} for i in range(7)]}
    dm.codec = SimpleNamespace(collate=lambda examples: [e["index"] for e in examples])
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0, num_devices=world,
                                 strategy=SimpleNamespace(global_rank=rank, world_size=world))
    return dm


def test_every_rank_gets_rows_and_training_ranks_get_equal_steps():
    for world in (1, 2, 3):
        seen, counts = [], []
        for rank in range(world):
            dm = _datamodule(rank, world)
            val = list(dm._loader("val", shuffle=False))
            assert val, "a rank without validation rows"
            seen += [i for b in val for i in b]
            counts.append(len(list(dm._loader("fit", shuffle=True))))
        assert sorted(seen) == list(range(7))  # validation: every row exactly once over all ranks
        assert len(set(counts)) == 1  # training: the same number of steps on every rank


def test_each_epoch_is_shuffled_anew_and_reproducibly():
    dm = _datamodule(0, 1)
    loader = dm._loader("fit", shuffle=True)
    first = list(loader)
    dm.trainer.current_epoch = 1
    second = list(loader)
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(37))
    assert first != second
    dm.trainer.current_epoch = 0
    assert list(loader) == first


def test_loader_workers_receive_the_codec_not_the_model(tmp_path, tiny_bert_dir):
    """What a spawn or forkserver start method would pickle for each worker: the dataset (examples, batches, the
    codec's collate). It must not drag the LightningModule and its weights along."""
    import lightning as L

    from lit_fast.tasks import Classifier

    rows = [{"text": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    data = TextDataModule(str(write_jsonl(tmp_path / "d.jsonl", rows)), label_column="label", batch_size=4)
    task = Classifier(tiny_bert_dir)
    blobs = []

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            blobs.append(pickle.dumps(trainer.train_dataloader.dataset))

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Grab()], accelerator="cpu")
    trainer.fit(task, datamodule=data)
    (blob,) = blobs
    assert b"Classifier" not in blob and b"BertForSequenceClassification" not in blob
    dataset = pickle.loads(blob)
    batch = next(iter(dataset))
    # model.packing auto: a BERT classifier trains on packed rows, which the codec's pack builds in the workers
    assert isinstance(batch, PackedBatch) and batch.labels is not None and batch.index is not None


def test_predict_workers_send_arrays_through_the_pipe_and_the_loop_gets_tensors(tiny_bert_dir):
    """predict_loader: what a worker sends holds no tensor (so nothing travels through /dev/shm or a worker's descriptor
    server); the main process gets the same batches, as tensors of the same dtypes, as without workers."""
    import pyarrow as pa
    import torch

    from lit_fast.data.batching import PredictBatches, as_arrays, as_tensors, predict_loader, predict_plan
    from lit_fast.tasks import Embedder

    texts = pa.array([f"sentence number {i} " * (1 + i % 7) for i in range(60)])
    plan = predict_plan([len(t) for t in texts.to_pylist()], 8, None)
    dataset = PredictBatches(texts, plan, Embedder(tiny_bert_dir).codec(), None, 0, 1)
    sent = as_arrays(next(iter(dataset)))
    assert sent and not any(torch.is_tensor(v) for v in sent.values())

    def rows(workers: int) -> dict[int, dict]:
        out = {}
        for batch in map(as_tensors, predict_loader(dataset, num_workers=workers)):
            assert all(torch.is_tensor(v) for v in batch.values())
            for k, index in enumerate(batch["index"].tolist()):
                out[index] = {key: (v[k].tolist(), v.dtype) for key, v in batch.items() if key != "index"}
        return out

    alone, with_workers = rows(0), rows(2)
    assert sorted(alone) == list(range(60))
    assert with_workers == alone


def test_max_tokens_auto_is_the_budget_measured_for_the_device(tmp_path, tiny_bert_dir, monkeypatch):
    """`data.max_tokens: auto` (and encode()'s default): 4096 padded tokens per predict batch on a CPU, 65536 on a
    GPU; no cap in training; a number or null is kept as given."""
    import numpy as np

    from lit_fast.data import batching
    from lit_fast.errors import ConfigError
    from lit_fast.tasks import Embedder

    assert batching.predict_max_tokens("auto", "cpu") == 4096
    assert batching.predict_max_tokens("auto", "cuda") == 65536
    assert batching.predict_max_tokens(300, "cpu") == 300 and batching.predict_max_tokens(None, "cuda") is None
    for bad in (0, "many"):
        try:
            TextDataModule(max_tokens=bad)
        except ConfigError as err:
            assert "data.max_tokens" in str(err)
        else:
            raise AssertionError(f"max_tokens={bad!r} was accepted")

    rows = [{"text": "word " * (10 + i % 50)} for i in range(400)]  # about 7k characters' worth of tokens each
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    planned = {}
    for device in ("cpu", "cuda"):
        dm = TextDataModule(path, batch_size=512, max_tokens="auto")
        dm.trainer = SimpleNamespace(accelerator=type("CPUAccelerator" if device == "cpu" else "CUDAAccelerator",
                                                      (), {})())
        dm._predict_table()
        planned[device] = dm._plan
        assert dm._predict_max_tokens == batching.predict_max_tokens("auto", device)
        assert dm._train_max_tokens is None
    assert len(planned["cpu"]) > len(planned["cuda"]) == 1
    assert sorted(np.concatenate(planned["cpu"]).tolist()) == list(range(400))

    # encode() on the CPU by default: the CPU budget, so more batches than with 65536
    seen = []
    real = batching.predict_plan
    monkeypatch.setattr(batching, "predict_plan", lambda c, b, m: seen.append(m) or real(c, b, m))
    embedder = Embedder(tiny_bert_dir)
    auto = embedder.encode([r["text"] for r in rows], device="cpu")
    wide = embedder.encode([r["text"] for r in rows], device="cpu", max_tokens=65536)
    assert seen == [4096, 65536]
    np.testing.assert_allclose(auto, wide, rtol=1e-5, atol=1e-6)


def test_rows_of_a_chunked_column_come_back_in_the_order_asked_for():
    """Predict takes each batch's texts from the input column chunk by chunk (ArrowRows: ChunkedArray.take joins
    every chunk first, a cost of the whole input per batch); the values and their order are those of the column."""
    import numpy as np
    import pyarrow as pa

    from lit_fast.data.batching import ArrowRows

    values = [f"text {i}" if i % 7 else None for i in range(50)]
    sizes = [0, 13, 1, 0, 20, 16, 0]  # empty chunks too
    starts = np.cumsum([0] + sizes)
    column = pa.chunked_array([pa.array(values[a:b], pa.string()) for a, b in zip(starts, starts[1:])])
    rows = ArrowRows(column)
    assert len(rows) == 50 and rows.chunks[1].to_pylist() == values[:13]
    rng = np.random.default_rng(0)
    for picked in ([], [49, 0], list(range(50)), rng.integers(0, 50, 200).tolist(), [13, 13, 12, 14, 34]):
        assert rows.take(picked).to_pylist() == [values[i] for i in picked]
    assert ArrowRows(pa.array(values)).take([3, 1]).to_pylist() == [values[3], values[1]]
    assert ArrowRows(pa.chunked_array([], pa.string())).take([]).to_pylist() == []


class _WorkerEnv(IterableDataset):
    def __iter__(self):
        import os

        yield {"parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}


def test_loader_workers_tokenize_on_one_thread_whatever_the_environment_says(monkeypatch):
    """TOKENIZERS_PARALLELISM=true (a user's shell, a benchmark) would give every loader worker a thread per core;
    predict's and training's workers turn the tokenizer's pool off for themselves."""
    from lit_fast.data.batching import EpochLoader, one_thread_worker, predict_loader

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    assert [b["parallelism"] for b in predict_loader(_WorkerEnv(), num_workers=1)] == ["false"]
    training = EpochLoader(_WorkerEnv(), SimpleNamespace(seed=0), lambda: 0, num_workers=1)
    assert training.worker_init_fn is one_thread_worker
    assert [b["parallelism"] for b in predict_loader(_WorkerEnv(), num_workers=0)] == ["true"]  # the caller's own
