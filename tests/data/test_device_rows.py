"""Predict rows that stay on the device until written (data/device_rows.py), and the host-side bookkeeping that keeps
the predict loop from waiting for the GPU: row indices kept on the host, tokens counted there."""

from types import SimpleNamespace

import numpy as np
import torch

from lit_fast.data.datamodule import TextDataModule
from lit_fast.data.device_rows import DeviceRows, as_rows


def test_device_rows_build_their_rows_once_from_host_arrays():
    calls = []

    def build(arrays):
        calls.append(sorted(arrays))
        assert all(isinstance(a, np.ndarray) for a in arrays.values())
        return [{"index": int(i), "v": v} for i, v in zip(arrays["index"], arrays["v"])]

    rows = DeviceRows({"v": torch.arange(6.0).view(3, 2), "index": torch.tensor([5, 3, 4])}, build)
    assert calls == []  # nothing is built until asked
    assert [r["index"] for r in rows.rows()] == [5, 3, 4]
    assert as_rows(rows) is rows.rows()
    np.testing.assert_array_equal(rows.rows()[1]["v"], [2.0, 3.0])
    assert calls == [["index", "v"]]
    plain = [{"index": 0}]
    assert as_rows(plain) is plain


def test_predict_batches_keep_their_indices_on_the_host_and_count_tokens_there():
    """Reading a batch's indices or its token count back from the GPU would wait for the batch to be computed; the
    DataModule keeps the one on the host and counts the other there. "meta" stands in for the GPU."""
    dm = TextDataModule(batch_size=4)
    batch = {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.array([[1, 1, 0], [1, 1, 1]]),
             "index": np.array([7, 2])}
    for predicting in (True, False):
        dm.trainer = SimpleNamespace(predicting=predicting)
        moved = dm.transfer_batch_to_device(dm.on_before_batch_transfer(dict(batch), 0), torch.device("meta"), 0)
        assert moved["input_ids"].device.type == "meta"
        assert moved["index"].device.type == ("cpu" if predicting else "meta")
        assert moved.get("num_tokens") == (5 if predicting else None)
