"""The prediction writer under DDP: several CPU processes, and nodes, write the same file as 1 process, atomically."""

import numpy as np
import pytest

from conftest import ROOT, read_jsonl, run_script, write_jsonl
from lit_fast.errors import LitFastError
from lit_fast.data.writers import PredictionWriter


@pytest.mark.parametrize("indices, message", [([0, 1, 1, 2], "predicted twice"), ([0, 2], "2 rows predicted for 3")])
def test_merge_refuses_duplicates_and_gaps(tmp_path, indices, message):
    writer = PredictionWriter(str(tmp_path / "o.jsonl"))
    with pytest.raises(LitFastError, match=message):
        writer._check(np.array(indices), expected=3)


def _torchrun(node_rank: int, port: int, args: list[str], env: dict):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node_rank),
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "predict.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_ranks_and_nodes_write_the_same_file_as_one_process(tmp_path, tiny_bert_dir):
    """4 DDP processes (Parquet), and 2 "nodes" x 2 processes started by torchrun on loopback (gloo; JSON lines):
    the same file as 1 process, byte for byte, rows in input order with their ids; only rank 0 reports."""
    import socket

    rows = [{"id": f"x{i}", "text": "token " * (i % 17 + 1) + str(i)} for i in range(45)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--config", str(ROOT / "configs/embed-multigpu.yaml"), "--model.pretrained", tiny_bert_dir,
              "--data.path", str(data), "--data.id_column", "id", "--data.batch_size", "4", "--data.max_tokens",
              "64", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.strategy", "ddp"]
    # one thread per process in every run: the same math, so the files must match byte for byte (Lightning's CPU
    # DDP otherwise gives each process cores/world threads, and GEMM blocking follows)
    env = {"OMP_NUM_THREADS": "1"}
    outputs = {}
    for name, devices in (("one.jsonl", "1"), ("one.parquet", "1"), ("four.parquet", "4")):
        outputs[name] = tmp_path / name
        proc = run_script("predict.py", *common, "--trainer.devices", devices, "--output", str(outputs[name]), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote 45 rows") == 1
    import pyarrow.parquet as pq

    assert pq.read_table(outputs["four.parquet"]).equals(pq.read_table(outputs["one.parquet"]))
    got = read_jsonl(outputs["one.jsonl"])
    assert [r["index"] for r in got] == list(range(45)) and [r["id"] for r in got] == [r["id"] for r in rows]

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = outputs["nodes.jsonl"] = tmp_path / "nodes.jsonl"
    args = [*common, "--trainer.num_nodes", "2", "--trainer.devices", "2", "--output", str(nodes)]
    procs = [_torchrun(rank, port, args, env) for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert sum(out.count("wrote 45 rows") for out, _ in results) == 1
    assert nodes.read_bytes() == outputs["one.jsonl"].read_bytes()
    # nothing but the input and the outputs: no shard, index or temporary file left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", *outputs])


def _two_ranks(out, rows: int, monkeypatch) -> list:
    """Two ranks' started writers for `out` (expecting `rows` rows in all), driven in turn in this process with
    Lightning's one-process strategy (broadcast and reduce hand back their input, barrier returns at once); both
    shards go in one folder, named by the token rank 0 would broadcast. Ends them rank 1 first: rank 0 merges."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lit_fast.data import writers

    monkeypatch.setattr(writers, "run_token", lambda: "host-1-test")
    ranks = []
    for rank in (0, 1):
        trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")), is_global_zero=rank == 0,
                                  global_rank=rank, world_size=2,
                                  datamodule=SimpleNamespace(num_rows={"predict": rows}))
        writer = writers.PredictionWriter(str(out))
        writer.on_predict_start(trainer, None)
        ranks.append((writer, trainer))
    return ranks


def _end(ranks: list) -> None:
    for writer, trainer in reversed(ranks):  # rank 0 merges last, after both shards are complete
        writer.on_predict_end(trainer, None)


def test_parquet_merge_streams_shards_in_input_order(tmp_path, monkeypatch):
    """Two ranks' Arrow shards (driven in one process), more rows than one merge slice: the Parquet output has
    every row once in input order with its vector (float16 kept), one row group per slice, and nothing else is left."""
    import pyarrow.parquet as pq
    import torch

    from lit_fast.data import writers

    rows = writers._MERGE_ROWS + 4321
    vectors = np.random.default_rng(0).standard_normal((rows, 3)).astype(np.float16)
    order = np.random.default_rng(1).permutation(rows)
    out = tmp_path / "out.parquet"
    ranks = _two_ranks(out, rows, monkeypatch)
    for k, start in enumerate(range(0, rows, 1000)):  # batches dealt to the ranks in turn
        writer, trainer = ranks[k % 2]
        batch = order[start:start + 1000]
        prediction = [{"index": int(i), "embedding": vectors[i]} for i in batch]
        writer.write_on_batch_end(trainer, None, prediction, None, {"index": torch.as_tensor(batch)}, k, 0)
    _end(ranks)
    table = pq.read_table(out)
    assert table.column("index").to_pylist() == list(range(rows))
    got = np.asarray(table.column("embedding").to_pylist(), dtype=np.float16)
    assert np.array_equal(got, vectors)
    assert table.schema.field("embedding").type.value_type == "halffloat"
    assert pq.ParquetFile(out).metadata.num_row_groups == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_a_json_line_reads_back_to_the_values_written():
    """JSON-lines rows (orjson from the vectors' buffers): float32 / float16 / int8 vectors and tensors read back to
    the same values; NaN stays NaN (json's spelling, not null); keys that are not strings become strings as json.dumps
    makes them."""
    import json
    import math

    import torch

    from lit_fast.data.writers import _json_line

    rng = np.random.default_rng(0)
    vector = rng.standard_normal(384).astype(np.float32)
    half = rng.standard_normal(8).astype(np.float16)
    row = {"index": 3, "id": "é-1", "embedding": vector, "half": half, "bits": np.array([-128, 7], np.int8),
           "tensor": torch.tensor([0.5, 1.25]), "scores": {1: 0.25, "b": 0.75}}
    line = _json_line(row)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    got = json.loads(line)
    assert np.array_equal(np.asarray(got["embedding"], np.float32), vector)
    assert np.array_equal(np.asarray(got["half"], np.float16), half)
    assert got["bits"] == [-128, 7] and got["tensor"] == [0.5, 1.25] and got["id"] == "é-1" and got["index"] == 3
    assert got["scores"] == {"1": 0.25, "b": 0.75}
    broken = _json_line({"index": 0, "embedding": np.array([np.nan, 1.0], np.float32)})
    assert math.isnan(json.loads(broken)["embedding"][0])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_rank_without_rows_leaves_an_empty_shard_the_merge_reads(tmp_path, monkeypatch, suffix):
    """More ranks than batches: rank 1 predicts nothing, and the output is rank 0's rows alone, in order."""
    import torch

    out = tmp_path / f"out{suffix}"
    ranks = _two_ranks(out, 3, monkeypatch)
    writer, trainer = ranks[0]
    prediction = [{"index": i, "label": f"l{i}"} for i in (2, 0, 1)]
    writer.write_on_batch_end(trainer, None, prediction, None, {"index": torch.tensor([2, 0, 1])}, 0, 0)
    _end(ranks)
    if suffix == ".jsonl":
        got = read_jsonl(out)
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).to_pylist()
    assert got == [{"index": i, "label": f"l{i}"} for i in range(3)]
