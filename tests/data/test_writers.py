"""The prediction writer under DDP: 2 CPU processes write the same file as 1 process, atomically."""

import numpy as np
import pytest

from conftest import ROOT, read_jsonl, run_script, write_jsonl
from lit_fast.errors import LitFastError
from lit_fast.data.writers import PredictionWriter


def test_two_processes_write_the_same_file_as_one(tmp_path, tiny_bert_dir):
    rows = [{"id": f"x{i}", "text": "word " * (i % 13 + 1) + str(i)} for i in range(37)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--config", str(ROOT / "configs/embed-minilm.yaml"), "--model.pretrained", tiny_bert_dir,
              "--data.path", str(data), "--data.id_column", "id", "--data.batch_size", "4"]
    outputs = {}
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2",
                                               "--trainer.accelerator", "cpu"])):
        for suffix in (".jsonl", ".parquet"):
            out = tmp_path / f"{name}{suffix}"
            # one thread per process in both runs: the same math, so the files must match byte for byte
            # (Lightning's CPU DDP otherwise gives each process cores/world threads, and GEMM blocking follows)
            proc = run_script("predict.py", *common, *extra, "--output", str(out), env={"OMP_NUM_THREADS": "1"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.count("wrote 37 rows") == 1  # only rank 0 reports
            outputs[name + suffix] = out
    assert outputs["ddp.jsonl"].read_bytes() == outputs["one.jsonl"].read_bytes()
    import pyarrow.parquet as pq

    assert pq.read_table(outputs["ddp.parquet"]).equals(pq.read_table(outputs["one.parquet"]))
    got = read_jsonl(outputs["ddp.jsonl"])
    assert [r["index"] for r in got] == list(range(37)) and [r["id"] for r in got] == [r["id"] for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", *[p.name for p in outputs.values()]])


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


def test_four_processes_and_two_nodes_of_two(tmp_path, tiny_bert_dir):
    """4 DDP processes, and 2 "nodes" x 2 processes started by torchrun on loopback (gloo): same file as 1 process."""
    import socket

    rows = [{"text": "token " * (i % 17 + 1) + str(i)} for i in range(45)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--config", str(ROOT / "configs/embed-multigpu.yaml"), "--model.pretrained", tiny_bert_dir,
              "--data.path", str(data), "--data.batch_size", "4", "--data.max_tokens", "64",
              "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.strategy", "ddp"]
    env = {"OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.jsonl"
    proc = run_script("predict.py", *common, "--trainer.devices", "1", "--output", str(one), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = tmp_path / "four.jsonl"
    proc = run_script("predict.py", *common, "--trainer.devices", "4", "--output", str(four), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert four.read_bytes() == one.read_bytes()

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = tmp_path / "nodes.jsonl"
    args = [*common, "--trainer.num_nodes", "2", "--trainer.devices", "2", "--output", str(nodes)]
    procs = [_torchrun(rank, port, args, env) for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert sum(out.count("wrote 45 rows") for out, _ in results) == 1
    assert nodes.read_bytes() == one.read_bytes()
