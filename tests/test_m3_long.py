"""One 8,192-token document on the CPU (issue 21, item 4): encoded through BGE-M3's pipeline without a
(T, T) score matrix, bounded by a size (the peak resident memory the encode adds), never by a time; and the
manual attention path refusing a score matrix over its stated budget, with an error naming the fused path.

The model has BGE-M3's 16 heads and 8194 positions but a hidden size of 64 (head dim 4) and 2 layers, so
one layer's (16, 8192, 8192) fp32 score matrix would be 4 GiB, and even one head's 256 MiB, while
everything the fused path keeps is a few MiB: the bound below separates the two by far.
"""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from rerank_fixtures import write_xlmr_tokenizer

from minibge import BertModel
from minibge.config import preset
from minibge.m3 import M3Model, fresh_head, load_m3
from minibge.model import MANUAL_ATTENTION_MAX_BYTES

MiB = 2 ** 20
BOUND = 200 * MiB  # what one 8k encode may add to the process's peak memory


def long_config():
    return dataclasses.replace(preset("bge-m3"), hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                               vocab_size=400, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m3-long")
    config = long_config()
    torch.manual_seed(0)
    encoder = BertModel(config)
    model = M3Model(encoder, fresh_head(64, "colbert"), fresh_head(64, "sparse"))
    write_xlmr_tokenizer(folder, model_max_length=8192)
    from minibge import Tokenizer
    model.save_pretrained(folder, Tokenizer.from_pretrained(folder))
    return folder


SCRIPT = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from minibge.m3 import load_m3
m3 = load_m3(sys.argv[1], device="cpu", fast=sys.argv[2] == "fast")
text = "the giant panda is a bear species endemic to China " * 2000
ids = m3.tokenizer.encode_batch([text], 8192)[0]
m3.encode(["warm up"], return_sparse=True, return_colbert_vecs=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = m3.encode([text], max_length=8192, return_sparse=True, return_colbert_vecs=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"tokens": len(ids), "colbert": list(out["colbert_vecs"][0].shape), "added": after - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fast", "plain"])
def test_8k_document_encodes_within_a_memory_bound(long_folder, path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(long_folder), path], capture_output=True, text=True,
                            timeout=600, env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["tokens"] == 8192 and measured["colbert"] == [8191, 64]
    one_head = 8192 * 8192 * 4
    assert measured["added"] < BOUND < one_head, \
        f"the 8k encode added {measured['added'] / MiB:.0f} MiB to the peak (bound {BOUND / MiB:.0f} MiB; one head's " \
        f"(T, T) score matrix alone is {one_head / MiB:.0f} MiB)"


def test_manual_path_refuses_a_score_matrix_over_budget(long_folder):
    model = load_m3(long_folder, device="cpu", attn_impl="manual", fast=False)
    scores = 16 * 8192 * 8192 * 4
    assert scores > MANUAL_ATTENTION_MAX_BYTES, "the 8k document must be over the stated budget"
    ids = torch.full((1, 8192), 5, dtype=torch.long)
    ids[0, 0], ids[0, -1] = 0, 2
    with pytest.raises(ValueError, match=r"attn_impl='sdpa'.*never builds it") as err:
        model.model.encoder(ids, torch.ones_like(ids))
    assert "4.0 GiB" in str(err.value) and "2.0 GiB" in str(err.value)
    with pytest.raises(ValueError, match="fused path"):
        model.model.encoder.inspect(ids[:, :8000])
    short = ids[:, :1024]  # 16·1024² fp32 = 64 MiB: within the budget, the manual path still runs
    assert model.model.encoder(short, torch.ones_like(short)).shape == (1, 1024, 64)
