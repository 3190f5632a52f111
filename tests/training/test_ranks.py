"""Packed losses under DDP: ranks with different numbers of loss units (target tokens here) still train on the mean
over every rank's units (training/ranks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from _decoder_models import causal_model
from conftest import ROOT, free_port
from lit_fast.training import causal_lm_loss, pack_causal, use_packed_attention
from lit_fast.training.packing import IGNORE
from lit_fast.training.ranks import rank_share


def rank_examples(rank: int) -> list[dict]:
    """Rank 0: three examples with long completions; rank 1: two with short ones (about 4x fewer targets)."""
    g = torch.Generator().manual_seed(10 + rank)
    lengths, prompts = ([20, 17, 25], [2, 3, 2]) if rank == 0 else ([22, 19], [17, 15])
    out = []
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append({"index": i, "input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return out


_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
tests = os.path.join(os.environ["PYTHONPATH"], "tests")
sys.path[:0] = [tests, os.path.join(tests, "training")]
from _decoder_models import causal_model
from test_ranks import rank_examples
from lit_fast.training import causal_lm_loss, pack_causal, use_packed_attention
from lit_fast.training.ranks import rank_share

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
model = use_packed_attention(causal_model("llama"))
batch = pack_causal(rank_examples(rank))


class Step(torch.nn.Module):  # what Lightning's DDP wrapper runs: the task's loss on the plain HF model
    def __init__(self):
        super().__init__()
        self.model = model

    def forward(self):
        return causal_lm_loss(self.model, batch)


ddp = torch.nn.parallel.DistributedDataParallel(Step())


loss = ddp()
(loss * rank_share(batch.num_targets, loss.device)).backward()
grads = {n: p.grad.tolist() for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" in n}
json.dump({"targets": batch.num_targets, "grads": grads}, open(sys.argv[1] + f".{rank}", "w"))
# no rank tears gloo down while the other's last collective is in flight, and no DDP reducer outlives the group
# (either aborted a run with "terminate called without an active exception")
del ddp, loss
dist.barrier()
dist.destroy_process_group()
'''


def test_one_process_has_no_share():
    assert rank_share(7, torch.device("cpu")) == 1.0


def test_two_ranks_train_on_the_mean_over_every_target(tmp_path):
    """2 gloo processes through DDP, as Lightning runs them: the averaged gradient equals one process's gradient of
    the mean loss over both ranks' target tokens, not the average of the two ranks' own means."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], env={**env, "RANK": str(r)},
                              cwd=ROOT / "tests" / "training", stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    counts = [r["targets"] for r in results]
    assert counts[0] > 3 * counts[1]  # uneven enough that the two normalisations differ

    model = use_packed_attention(causal_model("llama"))
    sums = [causal_lm_loss(model, pack_causal(rank_examples(r))) * counts[r] for r in range(2)]
    (sum(sums) / sum(counts)).backward(retain_graph=True)
    want = {n: p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" in n}
    model.zero_grad()
    (sum(s / c for s, c in zip(sums, counts)) / 2).backward()  # the ranks' own means, averaged
    naive = {n: p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" in n}
    for name, grad in want.items():
        for result in results:
            torch.testing.assert_close(torch.tensor(result["grads"][name]), grad, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(naive[name], grad, rtol=1e-3)
