"""The prediction writer under DDP: 2 CPU processes write the same file as 1 process, atomically."""

import numpy as np
import pytest

from conftest import ROOT, read_jsonl, run_script, write_jsonl
from lit_fast.errors import LitFastError
from lit_fast.writers import PredictionWriter


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
