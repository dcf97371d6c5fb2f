"""The fast path's per-machine matmul choice (minibge/fast/kernels.py): measured, cached, reported."""
import json

import pytest
import torch

from conftest import TINY

from minibge import BertConfig, BertModel
from minibge.fast import FastEncoder
from minibge.fast import kernels
from minibge.fast import onednn


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY)).eval()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_CACHE_DIR", str(tmp_path))
    kernels.choose_matmul.cache_clear()
    yield tmp_path
    kernels.choose_matmul.cache_clear()


def test_pick_takes_the_faster_route_and_mkl_on_a_tie():
    assert kernels.pick({"mkl": 2.0, "onednn": 1.0}) == "onednn"
    assert kernels.pick({"mkl": 1.0, "onednn": 2.0}) == "mkl"
    assert kernels.pick({"mkl": 1.0, "onednn": 1.0}) == "mkl"


@pytest.mark.parametrize("faster", ["mkl", "onednn"])
def test_fast_encoder_follows_the_measurement_and_caches_it(cache_dir, monkeypatch, faster):
    if not onednn.available(torch.empty(0)):
        pytest.skip("no working oneDNN operator in this torch build: nothing to choose")
    calls = []
    seconds = {"mkl": 1.0, "onednn": 2.0} if faster == "mkl" else {"mkl": 2.0, "onednn": 1.0}
    monkeypatch.setattr(kernels, "time_routes", lambda h, i: calls.append((h, i)) or dict(seconds))
    model = tiny_model(seed=1)
    fast = FastEncoder(model)
    assert fast.onednn is (faster == "onednn") and fast.matmul_choice.route == faster
    assert bool(fast.packed_weights) is (faster == "onednn"), "packed weights only for the oneDNN route"
    assert calls == [(model.config.hidden_size, model.config.intermediate_size)]
    record = json.loads((cache_dir / "kernels.json").read_text())
    assert list(record.values()) == [{"route": faster, "seconds": seconds}]
    assert kernels.cpu_model() in next(iter(record)) and torch.__version__ in next(iter(record))
    # a new process (the in-memory cache cleared) reads the file instead of measuring again
    kernels.choose_matmul.cache_clear()
    again = FastEncoder(tiny_model(seed=2))
    assert again.matmul_choice.cached and again.matmul_choice.route == faster and len(calls) == 1
    assert not [p for p in cache_dir.iterdir() if p.name != "kernels.json"], "a temporary file was left behind"
    # an explicit choice is never overridden
    assert FastEncoder(model, onednn=False).onednn is False and FastEncoder(model, onednn=False).matmul_choice is None


@pytest.mark.parametrize("content", ["{not json", "[]", '{"k": {"route": "gpu", "seconds": {}}}', "\x00" * 10])
def test_a_malformed_cache_is_measured_again(cache_dir, monkeypatch, content):
    (cache_dir / "kernels.json").write_text(content)
    monkeypatch.setattr(kernels, "time_routes", lambda h, i: {"mkl": 1.0, "onednn": 2.0})
    choice = kernels.choose_matmul(32, 64)
    assert not choice.cached and choice.route in ("mkl", "onednn")


def test_real_measurement_times_both_routes(cache_dir):
    if not onednn.available(torch.empty(0)):
        pytest.skip("no working oneDNN operator in this torch build")
    seconds = kernels.time_routes(64, 256)
    assert set(seconds) == {"mkl", "onednn"} and all(0 < s < float("inf") for s in seconds.values()), seconds
