"""Embedder vectors equal sentence-transformers' for what a model's files say (models/sentence_transformers.py): pooling
modes, prompts left in or out of the pooling, Dense layers, Normalize, truncation, binary precision - from a local
folder and from a hub id's cache - and refusal of what it cannot reproduce."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_jsonl, run_script, write_jsonl

TEXTS = ["a first sentence", "another, longer sentence with a few more words in it", "x",
         "Ünïcödé and 🙂 survive", "the fourth one"]


def build_st(folder: Path, base: str, pooling, include_prompt=True, dense=(), normalize=False, prompts=None,
             default_prompt_name=None) -> Path:
    """A sentence-transformers model on `base` (the tiny random BERT), saved as sentence-transformers saves it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    transformer = Transformer(base, max_seq_length=48)
    modules = [transformer, Pooling(32, pooling_mode=pooling, include_prompt=include_prompt)]
    width = 32 * (len(pooling) if isinstance(pooling, tuple) else 1)
    for out, activation in dense:
        modules.append(Dense(width, out, activation_function=activation))
        width = out
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=prompts or {}, default_prompt_name=default_prompt_name)
    model.save(str(folder))
    return folder


def lit_fast_vectors(module, texts, fast_path=False) -> torch.Tensor:
    from lit_fast.fastpath import to_fast_path

    module.configure_model()
    module.model.eval()
    if fast_path:
        to_fast_path(module.model)
    codec = module.codec()
    batch = codec.collate(codec.encode([{"index": i, "text": t} for i, t in enumerate(texts)], "predict"))
    with torch.inference_mode():
        return module.embed(batch)


CASES = {
    "cls, prompt left out, dense tanh, normalize": dict(pooling="cls", include_prompt=False,
                                                        dense=[(16, torch.nn.Tanh())], normalize=True),
    "mean + max concatenated, two dense": dict(pooling=("mean", "max"),
                                               dense=[(24, torch.nn.Identity()), (8, torch.nn.Tanh())]),
    "weightedmean, prompt left out": dict(pooling="weightedmean", include_prompt=False),
    "lasttoken, normalize": dict(pooling="lasttoken", normalize=True),
    "mean, prompt kept": dict(pooling="mean", normalize=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fast_path", [False, True])
def test_vectors_equal_sentence_transformers(tmp_path, tiny_bert_dir, case, fast_path):
    from sentence_transformers import SentenceTransformer

    from lit_fast import Embedder

    folder = build_st(tmp_path / "st", tiny_bert_dir, prompts={"query": "query: ", "passage": "passage: "},
                      **CASES[case])
    st = SentenceTransformer(str(folder), device="cpu")
    reference = torch.tensor(st.encode(TEXTS, prompt_name="query"))
    mine = lit_fast_vectors(Embedder(str(folder), prompt_name="query"), TEXTS, fast_path)
    assert mine.shape == reference.shape
    assert F.cosine_similarity(mine, reference, dim=-1).min() >= 0.9999
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)


def test_default_prompt_truncate_dim_and_binary_precision_match(tmp_path, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    from lit_fast import Embedder
    from lit_fast.tasks.embedding import quantize

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="mean", normalize=True,
                      prompts={"query": "query: "}, default_prompt_name="query")
    st = SentenceTransformer(str(folder), device="cpu", truncate_dim=12)
    reference = st.encode(TEXTS)  # the default prompt applies
    mine = lit_fast_vectors(Embedder(str(folder), truncate_dim=12), TEXTS)
    torch.testing.assert_close(mine, torch.tensor(reference), atol=1e-5, rtol=1e-4)
    for precision in ("binary", "ubinary"):
        assert (quantize(mine, precision) == quantize_embeddings(reference, precision)).all()
    assert quantize(mine, "float16").dtype.name == "float16"


def test_a_hub_id_reads_the_sentence_transformers_files_from_the_cache(tmp_path, tiny_bert_dir):
    """The bug: for a hub id the Embedder mean-pooled, unnormalised, whatever the model's files said."""
    from sentence_transformers import SentenceTransformer

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="cls", dense=[(16, torch.nn.Tanh())], normalize=True)
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-st" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, snapshot)
    (cache / "models--someone--tiny-st" / "refs").mkdir()
    (cache / "models--someone--tiny-st" / "refs" / "main").write_text(snapshot.name)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "out.jsonl"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = run_script("predict.py", "--config", "configs/embed-minilm.yaml", "--model.pretrained", "someone/tiny-st",
                      "--data.path", str(data), "--output", str(out), "--trainer.accelerator", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine = torch.tensor([row["embedding"] for row in read_jsonl(out)])
    reference = torch.tensor(SentenceTransformer(str(folder), device="cpu").encode(TEXTS))
    assert mine.shape == (len(TEXTS), 16)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)

    # the same model cached without its sentence-transformers files (as transformers alone caches it): refused,
    # unless the user says how to pool
    for name in ("modules.json", "1_Pooling", "2_Dense", "3_Normalize", "config_sentence_transformers.json",
                 "sentence_bert_config.json"):
        target = snapshot / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    proc = run_script("predict.py", "--config", "configs/embed-minilm.yaml", "--model.pretrained", "someone/tiny-st",
                      "--data.path", str(data), "--output", str(tmp_path / "o2.jsonl"), env=env)
    assert proc.returncode == 2 and "without its modules.json" in proc.stderr and "model.pooling" in proc.stderr
    proc = run_script("predict.py", "--config", "configs/embed-minilm.yaml", "--model.pretrained", "someone/tiny-st",
                      "--model.pooling", "cls", "--data.path", str(data), "--output", str(tmp_path / "o3.jsonl"),
                      "--trainer.accelerator", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_what_the_embedder_cannot_reproduce_is_an_error(tmp_path, tiny_bert_dir):
    from lit_fast import Embedder
    from lit_fast.errors import ConfigError

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="mean", prompts={"query": "query: "})
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="LayerNorm.*reproduces Transformer, Pooling, Dense and Normalize"):
        Embedder(str(folder))
    modules.pop()
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="prompt_name 'passage' is not one of this model's prompts \\(document, query\\)"):
        Embedder(str(folder), prompt_name="passage")
    with pytest.raises(ConfigError, match="model.precision 'int4' is not one of"):
        Embedder(str(folder), precision="int4")
    with pytest.raises(ConfigError, match="quantization_ranges is for model.precision int8 or uint8, not float32"):
        Embedder(str(folder), quantization_ranges=str(folder / "ranges.npy"))


def test_an_export_with_dense_layers_and_prompts_loads_in_sentence_transformers(tmp_path, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    from lit_fast import Embedder

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="cls", include_prompt=False,
                      dense=[(16, torch.nn.Tanh())], normalize=True, prompts={"query": "query: "})
    module = Embedder(str(folder), prompt_name="query")
    mine = lit_fast_vectors(module, TEXTS)
    module.export(str(tmp_path / "exported"))
    st = SentenceTransformer(str(tmp_path / "exported"), device="cpu")
    torch.testing.assert_close(torch.tensor(st.encode(TEXTS, prompt_name="query")), mine, atol=1e-5, rtol=1e-4)


def test_int8_and_uint8_match_sentence_transformers(tmp_path, tiny_bert_dir):
    """int8 / uint8 as quantize_embeddings makes them: ranges from a calibration sample (or, in encode(), from the
    vectors themselves, as SentenceTransformer.encode(precision=...) does)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    from lit_fast import Embedder, quantization_ranges
    from lit_fast.tasks.embedding import quantize

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="mean", normalize=True)
    st = SentenceTransformer(str(folder), device="cpu")
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 4)]
    reference = st.encode(texts)
    calibration = st.encode(texts[::3])
    for precision in ("int8", "uint8"):
        # the bucketing itself, on the same float vectors: identical
        mine = quantize(torch.tensor(reference), precision, quantization_ranges(calibration))
        theirs = quantize_embeddings(reference, precision, calibration_embeddings=calibration)
        assert mine.dtype == theirs.dtype and (mine == theirs).all()
        # end to end: fp32 vectors differ in the last bits, so a value on a bucket edge may land one bucket over
        encoded = Embedder(str(folder), precision=precision).encode(texts, device="cpu")
        expected = st.encode(texts, precision=precision)
        assert encoded.dtype == expected.dtype
        diff = np.abs(encoded.astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_predict_int8_reads_its_ranges_and_refuses_without_them(tmp_path, tiny_bert_dir, run_predict):
    import numpy as np

    from lit_fast import Embedder, quantization_ranges

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="mean", normalize=True)
    ranges = quantization_ranges(Embedder(str(folder)).encode(TEXTS, device="cpu"))
    np.save(tmp_path / "ranges.npy", ranges)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    args = ["--config", str(ROOT / "configs/embed-minilm.yaml"), "--model.pretrained", str(folder),
            "--data.path", str(data), "--trainer.accelerator", "cpu", "--model.precision", "int8"]
    code, _, err = run_predict(*args, "--output", str(tmp_path / "no.jsonl"))
    assert code == 2 and "model.quantization_ranges" in err.strip().splitlines()[-1]
    assert not (tmp_path / "no.jsonl").exists()
    out = tmp_path / "out.jsonl"
    code, _, err = run_predict(*args, "--model.quantization_ranges", str(tmp_path / "ranges.npy"), "--output", str(out))
    assert code == 0, err
    rows = read_jsonl(out)
    expected = Embedder(str(folder), precision="int8").encode(TEXTS, device="cpu", ranges=ranges)
    assert np.array_equal(np.array([r["embedding"] for r in rows], np.int16), expected.astype(np.int16))
    np.save(tmp_path / "bad.npy", ranges[:, :5])
    code, _, err = run_predict(*args, "--model.quantization_ranges", str(tmp_path / "bad.npy"),
                               "--output", str(tmp_path / "bad.jsonl"))
    assert code == 2 and "dimensions" in err.strip().splitlines()[-1]
    assert not (tmp_path / "bad.jsonl").exists()
