"""Embedder fine-tuning (tasks/contrastive.py): the loss equals sentence-transformers' MultipleNegativesRankingLoss,
gradient caching and the all-gather across ranks give the plain path's loss and gradients, retrieval rises on a tiny
model, and configs/embed-finetune.yaml trains, exports and loads in sentence-transformers with predict's vectors."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, free_port, read_jsonl, write_jsonl

FINETUNE = str(ROOT / "configs/embed-finetune.yaml")


def _vectors(rows: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("negatives", [0, 2])
def test_ranking_loss_equals_sentence_transformers(symmetric, negatives):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from lit_fast.tasks.contrastive import ranking_loss

    n = 6
    anchors, positives = _vectors(n, seed=1), _vectors(n, seed=2)
    columns = [_vectors(n, seed=3 + k) for k in range(negatives)]  # sentence-transformers: one column a negative
    flat = torch.stack(columns, 1).reshape(n * negatives, -1) if negatives else None  # lit_fast: row by row
    keys = torch.arange(n)
    negative_keys = torch.arange(100, 100 + n * negatives) if negatives else None
    directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
    reference = MultipleNegativesRankingLoss(None, scale=17.0, directions=directions,
                                             partition_mode="per_direction" if symmetric else "joint")
    expected = reference.compute_loss_from_embeddings([anchors, positives, *columns], None)
    mine = ranking_loss(anchors, positives, flat, keys, negative_keys, scale=17.0, symmetric=symmetric)
    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-6)


def test_a_positive_shared_by_two_anchors_is_not_their_negative():
    from lit_fast.tasks.contrastive import ranking_loss

    anchors, positives = _vectors(4, seed=1), _vectors(4, seed=2)
    positives[2] = positives[0]  # rows 0 and 2 have the same positive text (the same key)
    keys = torch.tensor([7, 8, 7, 9])
    logits = 20 * F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T
    logits[0, 2] = logits[2, 0] = float("-inf")
    expected = F.cross_entropy(logits, torch.arange(4))
    torch.testing.assert_close(ranking_loss(anchors, positives, None, keys, None), expected)
    assert ranking_loss(anchors, positives, None, torch.arange(4), None) > expected  # counted, it would cost


def test_retrieval_metrics_rank_among_distinct_positives():
    from lit_fast.tasks.contrastive import retrieval_metrics

    e = torch.eye(3)
    documents = e[[0, 1, 1, 2]]  # rows 1 and 2: the same positive (key 5): a corpus of 3
    keys = torch.tensor([3, 5, 5, 9])
    queries = torch.stack([e[0],  # its document first
                           e[2] + 0.5 * e[1],  # key 9's document first, its own second
                           e[1],  # first
                           -e[2] + 0.1 * e[0] + 0.05 * e[1]])  # its own last of 3
    metrics = retrieval_metrics(queries, keys, documents, keys, k=1)
    assert {k: v.item() for k, v in metrics.items()} == {"recall@1": 0.5, "mrr@1": 0.5}
    assert retrieval_metrics(queries, keys, documents, keys, k=2)["recall@2"].item() == 0.75
    metrics = retrieval_metrics(queries, keys, documents, keys, k=10)
    assert metrics["recall@10"].item() == 1.0
    assert metrics["mrr@10"].item() == pytest.approx((1 + 0.5 + 1 + 1 / 3) / 4)

    from lit_fast.tasks.contrastive import Retrieval

    metric = Retrieval("mrr")  # over batches: the same as over the whole split at once
    metric.update(queries[:1], keys[:1], documents[:1])
    metric.update(queries[1:], keys[1:], documents[1:])
    assert metric.compute().item() == pytest.approx(metrics["mrr@10"].item())


def _pair_batch(module, rows, negatives=True):
    codec = module.codec()
    records = [{"index": i, "text": a, "pair": p, **({"negative": n} if negatives else {})}
               for i, (a, p, n) in enumerate(rows)]
    return codec.collate(codec.encode(records, "fit"))


ROWS = [(f"query number {i} about {'cats ' * (i % 4)}", f"a document on topic {i} with {'dogs ' * (i % 5)} words",
         [f"an unrelated passage {i}", f"another distractor {i} {'x ' * i}"][: 1 + i % 2]) for i in range(7)]


def _grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_cache_gives_the_plain_loss_and_gradients(tmp_path, tiny_bert_dir, symmetric):
    from lit_fast import Embedder

    from test_sentence_transformers import build_st

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="mean", dense=[(16, torch.nn.Tanh())], normalize=True)
    plain = Embedder(str(folder), symmetric=symmetric)
    cached = Embedder(str(folder), symmetric=symmetric, mini_batch_size=3)
    for module in (plain, cached):
        module.configure_model()
        module.eval()  # dropout off: the plain path embeds all rows in one call, the cache in 3-row calls
    cached.load_state_dict(plain.state_dict())
    batch = _pair_batch(plain, ROWS)
    assert batch["negative"]["input_ids"].shape[0] == 10 and batch["pair"]["input_ids"].shape[0] == 7
    loss, grads = _grads(plain, batch)
    cached_loss, cached_grads = _grads(cached, batch)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-6)
    assert set(cached_grads) == set(grads) and any(n.startswith("head.dense") for n in grads)
    assert not any("pooler" in n for n in grads)  # frozen: not part of a sentence embedding
    for name in grads:  # fp32; the 3-row mini-batches pad to other widths, so sums run in another order
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_cache_replays_dropout():
    """With dropout on, the second forward of each mini-batch must draw the first one's masks."""
    from lit_fast.tasks.contrastive import cached_loss, ranking_loss

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Dropout(0.5))

    def embed(inputs):
        return layer(inputs["input_ids"]).mean(1)

    ids = torch.randint(0, 50, (10, 5))
    parts = [{"input_ids": ids[:5], "attention_mask": torch.ones(5, 5, dtype=torch.long)},
             {"input_ids": ids[5:], "attention_mask": torch.ones(5, 5, dtype=torch.long)}]
    keys = torch.arange(5)

    def loss_of(a, p):
        return ranking_loss(a, p, None, keys, None)

    torch.manual_seed(1)  # reference: the same mini-batches in the same order, with a graph
    reference = loss_of(*[torch.cat([embed({k: v[s:s + 2] for k, v in part.items()}) for s in range(0, 5, 2)])
                          for part in parts])
    expected = torch.autograd.grad(reference, list(layer.parameters()))[0]
    torch.manual_seed(1)
    loss = cached_loss(embed, parts, loss_of, 2, list(layer.parameters()))
    got = torch.autograd.grad(loss, list(layer.parameters()))[0]
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(got, expected)
    assert expected.abs().sum() > 0


_DDP_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
from lit_fast.tasks.contrastive import cached_loss, ranking_loss
from lit_fast.training.ranks import gather_rows

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
mini_batch = int(sys.argv[2]) or None
torch.manual_seed(0)
encoder = torch.nn.EmbeddingBag(40, 8)  # the same weights on every rank
ids = torch.randint(0, 40, (2, 9, 4), generator=torch.Generator().manual_seed(3))  # anchors, positives: 9 rows
keys = torch.arange(9)
rows = [range(0, 5), range(5, 9)][rank]  # uneven: 5 rows on rank 0, 4 on rank 1


class Step(torch.nn.Module):  # what Lightning's DDP wrapper runs: the loss of this rank's rows
    def __init__(self):
        super().__init__()
        self.encoder = encoder

    def forward(self):
        mine = ids[:, list(rows)]
        parts = [{"input_ids": mine[k], "attention_mask": torch.ones_like(mine[k])} for k in range(2)]
        embed = lambda inputs: self.encoder(inputs["input_ids"])
        loss_of = lambda a, p: ranking_loss(a, p, None, keys[list(rows)], None, symmetric=True, gather=True)
        if mini_batch:
            return cached_loss(embed, parts, loss_of, mini_batch, list(self.parameters()))
        return loss_of(*[embed(p) for p in parts])


ddp = torch.nn.parallel.DistributedDataParallel(Step())
loss = ddp()
loss.backward()
gathered = gather_rows(torch.tensor([[float(rank)]] * len(rows)))
json.dump({"loss": loss.item(), "grad": encoder.weight.grad.tolist(), "gathered": gathered.flatten().tolist()},
          open(sys.argv[1] + f".{rank}", "w"))
# no rank tears gloo down while the other's last collective is in flight, and no DDP reducer outlives the group
# (either aborted a run with "terminate called without an active exception")
del ddp, loss
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.parametrize("mini_batch", [0, 2])
def test_negatives_from_every_rank_give_the_single_process_gradients(tmp_path, mini_batch):
    """2 gloo processes with uneven rows, each ranking its anchors against every rank's positives (through DDP, as
    Lightning runs it): the averaged gradient equals one process's on the whole batch, with or without the cache."""
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(mini_batch)],
                              env={**env, "RANK": str(r)}, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert results[0]["gathered"] == results[1]["gathered"] == [0.0] * 5 + [1.0] * 4

    torch.manual_seed(0)
    encoder = torch.nn.EmbeddingBag(40, 8)
    ids = torch.randint(0, 40, (2, 9, 4), generator=torch.Generator().manual_seed(3))
    anchors, positives = F.normalize(encoder(ids[0]), dim=-1), F.normalize(encoder(ids[1]), dim=-1)
    forward = F.cross_entropy(20 * anchors @ positives.T, torch.arange(9), reduction="none")
    backward = F.cross_entropy(20 * positives @ anchors.T, torch.arange(9), reduction="none")
    per_rank = [(forward[r].mean() + backward[r].mean()) / 2 for r in (slice(0, 5), slice(5, 9))]
    for result, expected in zip(results, per_rank):
        assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # every rank's loss reaches every rank's rows through the gather; DDP averages the two ranks' gradients
    (sum(per_rank) / 2).backward()
    for result in results:
        torch.testing.assert_close(torch.tensor(result["grad"]), encoder.weight.grad, rtol=1e-5, atol=1e-6)


def _topic_rows(tokenizer, topics: int, rows: int, seed: int) -> list[dict]:
    """Anchors and positives that share a topic: two of its four keywords each (one in common), among noise words."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 4)
    pick = random.Random(0)
    keywords = [pick.sample(words, 4) for _ in range(topics)]
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        k = keywords[i % topics]
        noise = lambda n: rng.sample(words, n)  # noqa: E731
        out.append({"anchor": " ".join(rng.sample([k[0], k[1], *noise(4)], 6)),
                    "positive": " ".join(rng.sample([k[1], k[2], k[3], *noise(5)], 8))})
    return out


def test_training_raises_validation_retrieval(tmp_path, tiny_bert_dir):
    import lightning as L

    from lit_fast import Embedder, TextDataModule
    from test_sentence_transformers import build_st

    folder = build_st(tmp_path / "st", tiny_bert_dir, pooling="mean", dense=[(16, torch.nn.Tanh())], normalize=True)
    module = Embedder(str(folder), lr=1e-3, warmup_ratio=0.0, mini_batch_size=8, symmetric=True)
    rows = _topic_rows(module.tokenizer, topics=40, rows=400, seed=1)
    train, val = write_jsonl(tmp_path / "train.jsonl", rows[:320]), write_jsonl(tmp_path / "val.jsonl", rows[320:])
    data = TextDataModule(path=str(train), val_path=str(val), text_column="anchor", pair_column="positive",
                          batch_size=32, seed=0)

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)

    before = trainer().validate(module, datamodule=data, verbose=False)[0]
    dense = module.head.dense[0].weight.detach().clone()
    trainer(max_epochs=2).fit(module, datamodule=data)
    after = trainer().validate(module, datamodule=data, verbose=False)[0]
    # two epochs of 10 steps: MRR@10 0.04 -> 0.13, recall@10 0.17 -> 0.40 (seeded; the bars leave room for BLAS)
    assert after["val_mrr@10"] > 2 * before["val_mrr@10"], (before, after)
    assert after["val_recall@10"] > before["val_recall@10"] + 0.1, (before, after)
    assert after["val_loss"] < before["val_loss"]
    assert not torch.equal(module.head.dense[0].weight, dense)  # the Dense layer trained too


def test_finetune_config_trains_exports_and_loads_in_sentence_transformers(tmp_path, run_train, run_predict,
                                                                           tiny_bert_dir):
    """configs/embed-finetune.yaml on a tiny model: train with hard negatives and gradient caching, export, then
    sentence-transformers and lit_fast's predict give the same vectors from the export."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    rows = _topic_rows(AutoTokenizer.from_pretrained(tiny_bert_dir), topics=10, rows=60, seed=2)
    for i, row in enumerate(rows):
        row["negative"] = [rows[(i + k) % len(rows)]["positive"] for k in range(1, 2 + i % 2)]  # 1 or 2 a row
    train, val = write_jsonl(tmp_path / "train.jsonl", rows[:48]), write_jsonl(tmp_path / "val.jsonl", rows[48:])
    export = tmp_path / "exported"
    common = ("--config", FINETUNE, "--model.pretrained", tiny_bert_dir, "--data.path", str(train),
              "--data.val_path", str(val))
    code, _, err = run_train(*common, "--data.pair_column", "null", "--export_dir", str(export))
    assert code == 2 and "set --data.pair_column" in err and not export.exists()

    code, out, err = run_train(*common, "--data.negative_column", "negative", "--data.batch_size", "8",
                               "--model.mini_batch_size", "4", "--model.symmetric", "true",
                               "--trainer.max_steps", "4", "--trainer.accelerator", "cpu",
                               "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export))
    assert code == 0, err
    assert "(val_mrr@10=" in out and f"to {export}" in out

    texts = [r["anchor"] for r in rows[:5]] + ["a short one", "Ünïcödé and 🙂 survive"]
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    code, _, err = run_predict("--config", str(ROOT / "configs/embed-minilm.yaml"), "--model.pretrained", str(export),
                               "--data.path", str(data), "--output", str(tmp_path / "out.jsonl"),
                               "--trainer.accelerator", "cpu")
    assert code == 0, err
    mine = torch.tensor([r["embedding"] for r in read_jsonl(tmp_path / "out.jsonl")])
    reference = torch.tensor(SentenceTransformer(str(export), device="cpu").encode(texts))
    assert F.cosine_similarity(mine, reference, dim=-1).min() >= 0.9999
    untrained = torch.tensor(SentenceTransformer(tiny_bert_dir, device="cpu").encode(texts))
    assert not torch.allclose(reference, untrained, atol=1e-3)  # the export holds the trained weights


def test_ddp_finetune_on_two_cpu_processes(tmp_path, tiny_bert_dir):
    """train.py under DDP (2 gloo processes): negatives gathered across ranks with the gradient cache, uneven
    batches, the retrieval metric over both ranks' rows, one export from rank 0."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from conftest import run_script

    rows = _topic_rows(AutoTokenizer.from_pretrained(tiny_bert_dir), topics=10, rows=70, seed=3)
    train, val = write_jsonl(tmp_path / "train.jsonl", rows[:53]), write_jsonl(tmp_path / "val.jsonl", rows[53:])
    export = tmp_path / "exported"
    proc = run_script("train.py", "--config", FINETUNE, "--model.pretrained", tiny_bert_dir, "--data.path", str(train),
                      "--data.val_path", str(val), "--data.batch_size", "8", "--model.mini_batch_size", "3",
                      "--trainer.max_steps", "3", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"),
                      "--export_dir", str(export), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("exported the") == 1 and "val_mrr@10=" in proc.stdout
    assert SentenceTransformer(str(export), device="cpu").encode(["a text"]).shape == (1, 32)
