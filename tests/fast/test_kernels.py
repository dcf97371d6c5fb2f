"""The fast path's per-machine kernel choices (minibge/fast/kernels.py, and the attention candidates
in minibge/fast/encoder.py): measured, cached, reported. No test here reads a clock's real value:
the timings are faked, so the choices are the test's, whatever the machine's load."""
import itertools
import json
import logging

import pytest
import torch

from conftest import TINY

from minibge import BertConfig, BertModel
from minibge.fast import FastEncoder
from minibge.fast import encoder as fast_path
from minibge.fast import kernels
from minibge.fast import onednn


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY)).eval()


CHOOSERS = (kernels.choose_matmul, fast_path.choose_attention, fast_path.choose_short_attention)


def forget_in_process():
    """What a new process starts with: no choice remembered in memory (the cache file stays)."""
    for chooser in CHOOSERS:
        chooser.cache_clear()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_CACHE_DIR", str(tmp_path))
    forget_in_process()
    yield tmp_path
    forget_in_process()


def test_pick_takes_the_faster_route_and_mkl_on_a_tie():
    assert kernels.pick({"mkl": 2.0, "onednn": 1.0}) == "onednn"
    assert kernels.pick({"mkl": 1.0, "onednn": 2.0}) == "mkl"
    assert kernels.pick({"mkl": 1.0, "onednn": 1.0}) == "mkl"


@pytest.mark.parametrize("faster", ["mkl", "onednn"])
def test_fast_encoder_follows_the_measurement_and_caches_it(cache_dir, monkeypatch, faster):
    if not onednn.available(torch.empty(0)):
        pytest.skip("no working oneDNN operator in this torch build: nothing to choose")
    calls = []
    fake_timings = {"mkl": 1.0, "onednn": 2.0} if faster == "mkl" else {"mkl": 2.0, "onednn": 1.0}
    monkeypatch.setattr(kernels, "time_routes", lambda h, i: calls.append((h, i)) or dict(fake_timings))
    fake_route_timings(monkeypatch, "buckets")
    fake_short_timings(monkeypatch, ("sdpa", "sdpa"))
    model = tiny_model(seed=1)
    fast = FastEncoder(model)
    assert fast.onednn is (faster == "onednn") and fast.matmul_choice.route == faster
    assert bool(fast.packed_weights) is (faster == "onednn"), "packed weights only for the oneDNN route"
    assert calls == [(model.config.hidden_size, model.config.intermediate_size)]
    record = {key: entry for key, entry in json.loads((cache_dir / "kernels.json").read_text()).items() if "H=" in key}
    # the cache stores the route and the fake timings the monkeypatched measurement returned; no clock is read
    expected_entry = {"route": faster, "seconds": fake_timings}
    assert list(record.values()) == [expected_entry]
    assert kernels.cpu_model() in next(iter(record)) and torch.__version__ in next(iter(record))
    # a new process (the in-memory cache cleared) reads the file instead of measuring again
    forget_in_process()
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


def test_forget_machine_drops_this_machines_choices_only(cache_dir, monkeypatch):
    """`minibge info --remeasure`: this machine's cached choices go, and are measured again by the
    next process; another machine's (another CPU, torch or thread count) stay."""
    if not onednn.available(torch.empty(0)):
        pytest.skip("no working oneDNN operator in this torch build: nothing is measured or cached")
    calls = []
    monkeypatch.setattr(kernels, "time_routes", lambda h, i: calls.append((h, i)) or {"mkl": 1.0, "onednn": 2.0})
    kernels.choose_matmul(32, 64)
    path = cache_dir / "kernels.json"
    other = {"Another CPU | torch 0.0 | 2 threads | H=32 I=64": {"route": "onednn", "seconds": {"mkl": 2.0, "onednn": 1.0}}}
    path.write_text(json.dumps({**json.loads(path.read_text()), **other}))
    assert kernels.forget_machine() == 1
    assert json.loads(path.read_text()) == other
    assert kernels.forget_machine() == 0 and json.loads(path.read_text()) == other
    forget_in_process()
    assert not kernels.choose_matmul(32, 64).cached and len(calls) == 2, "not measured again after forget_machine"
    assert not [p for p in cache_dir.iterdir() if p.name != "kernels.json"], "a temporary file was left behind"


def test_real_measurement_times_both_routes(cache_dir):
    if not onednn.available(torch.empty(0)):
        pytest.skip("no working oneDNN operator in this torch build")
    measured = kernels.time_routes(64, 256)  # real timings: only their presence and sanity are checked, no bound
    assert set(measured) == {"mkl", "onednn"} and all(0 < t < float("inf") for t in measured.values()), measured


# -----------------------------------------------------------------------------
# The measurement itself, on a fake clock

class FakeClock:
    """Stands in for the time module inside kernels.py: each timed pass moves it on by its cost."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_best_times_keeps_each_routes_best_pass(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(kernels, "time", clock)
    costs = {"a": iter([9.0, 3.0, 2.0, 5.0]),        # warm-up (not counted), then three passes
             "b": itertools.repeat(1.0), "slow": itertools.repeat(50.0), "broken": None}
    calls = dict.fromkeys(costs, 0)

    def run(route):
        calls[route] += 1
        if costs[route] is None:
            raise RuntimeError("no such kernel on this CPU")
        clock.now += next(costs[route])

    best = kernels.best_times({route: (lambda r=route: run(r)) for route in costs}, repeats=3)  # on the fake clock
    assert best == {"a": 2.0, "b": 1.0, "slow": 50.0, "broken": float("inf")}, best
    assert calls == {"a": 4, "b": 4, "slow": 4, "broken": 1}, "a warm-up and three passes each; the broken one: its warm-up"


def test_pick_breaks_ties_by_the_order_of_the_routes():
    assert kernels.pick(dict.fromkeys(fast_path.SHORT_METHODS, 1.0), fast_path.SHORT_METHODS) == "sdpa"
    assert kernels.pick(dict.fromkeys(fast_path.CPU_ATTENTION, 1.0), fast_path.CPU_ATTENTION) == "buckets"
    assert kernels.pick({"sdpa": 2.0, "plain": 1.5, "transposed": 1.0}, fast_path.SHORT_METHODS) == "transposed"
    assert kernels.pick({"buckets": 2.0, "padded": 1.0}, fast_path.CPU_ATTENTION) == "padded"
    # within TIE of the fastest is a tie, taken by the earlier route; beyond it the faster one wins
    near, beyond = 1 + kernels.TIE / 2, 1 + 2 * kernels.TIE
    assert kernels.pick({"sdpa": near, "plain": 2.0, "transposed": 1.0}, fast_path.SHORT_METHODS) == "sdpa"
    assert kernels.pick({"sdpa": beyond, "plain": near, "transposed": 1.0}, fast_path.SHORT_METHODS) == "plain"
    assert kernels.pick({"mkl": beyond, "onednn": 1.0}) == "onednn" and kernels.pick({"mkl": near, "onednn": 1.0}) == "mkl"


# -----------------------------------------------------------------------------
# The attention choices: forced by fake timings, cached, reported, overridden

def fake_short_timings(monkeypatch, winners, calls=None):
    """time_short_attention made to find winners[i] fastest in band i."""
    winner_of = {lengths: winner for (_, lengths), winner in zip(fast_path.SHORT_BANDS, winners)}

    def fake(num_heads, head_dim, lengths, dtype=torch.float32):
        if calls is not None:
            calls.append((num_heads, head_dim, lengths))
        return {method: 1.0 if method == winner_of[lengths] else 2.0 for method in fast_path.SHORT_METHODS}
    monkeypatch.setattr(fast_path, "time_short_attention", fake)


def fake_route_timings(monkeypatch, winner, calls=None):
    def fake(num_heads, head_dim, plan=(), dtype=torch.float32):
        if calls is not None:
            calls.append((num_heads, head_dim, plan))
        return {route: 1.0 if route == winner else 2.0 for route in fast_path.CPU_ATTENTION}
    monkeypatch.setattr(fast_path, "time_attention_routes", fake)


def assert_encoder_is_the_model(fast, model, seed=0):
    """Lengths on both sides of each short band and above SHORT_ATTENTION, in one batch."""
    torch.manual_seed(seed)
    lengths = torch.tensor([40, 33, 20, 20, 16, 15, 5, 1])
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), 40))
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    with torch.inference_mode():
        out, ref = fast(ids, mask), model(ids, mask)
    diff = (out - ref)[mask.bool()].abs()
    assert diff.max() < 1e-5, f"attention={fast.attention} {fast.short_attention}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"


@pytest.mark.parametrize("faster", fast_path.CPU_ATTENTION)
def test_auto_attention_takes_the_measured_route_and_caches_it(cache_dir, monkeypatch, faster):
    route_calls, short_calls = [], []
    fake_route_timings(monkeypatch, faster, route_calls)
    fake_short_timings(monkeypatch, ("transposed", "plain"), short_calls)
    model = tiny_model(seed=3)
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    fast = FastEncoder(model)
    assert fast.attention == faster and fast.attention_choice.route == faster and not fast.attention_choice.cached
    # buckets was timed with the short-group plan it would run with
    plan = ((15, "transposed"), (fast_path.SHORT_ATTENTION, "plain"))
    assert route_calls == [(heads, head_dim, plan)], route_calls
    assert [lengths for *_, lengths in short_calls] == [lengths for _, lengths in fast_path.SHORT_BANDS]
    assert_encoder_is_the_model(fast, model)
    # a new process reads all of it from the file instead of measuring again
    forget_in_process()
    again = FastEncoder(model)
    assert again.attention == faster and again.attention_choice.cached and all(c.cached for _, c in again.short_attention)
    assert len(route_calls) == 1 and len(short_calls) == len(fast_path.SHORT_BANDS)
    assert not [p for p in cache_dir.iterdir() if p.name != "kernels.json"], "a temporary file was left behind"


@pytest.mark.parametrize("winners", [("sdpa", "sdpa"), ("transposed", "plain"), ("plain", "transposed"), ("transposed", "sdpa")])
def test_short_groups_take_the_measured_method_per_band(cache_dir, monkeypatch, winners):
    fake_short_timings(monkeypatch, winners)
    ran = []
    for method, attend in list(fast_path.SHORT_ATTEND.items()):  # record which method each group length ran
        monkeypatch.setitem(fast_path.SHORT_ATTEND, method,
                            lambda q, k, v, method=method, attend=attend: ran.append((q.shape[-2], method)) or attend(q, k, v))
    model = tiny_model(seed=4)
    fast = FastEncoder(model, attention="buckets")
    longest = [band[0] for band in fast_path.SHORT_BANDS]
    assert fast_path.short_plan(fast.short_attention) == tuple(zip(longest, winners))
    assert_encoder_is_the_model(fast, model)
    expected = {L: winners[0] if L <= longest[0] else winners[1] for L in (1, 5, 15, 16, 20)}
    assert dict(ran) == expected, f"length -> method run: {dict(ran)}, expected {expected} (longer groups: SDPA directly)"


@pytest.mark.parametrize("mode", ["buckets", "padded", "nested"])
def test_explicit_attention_wins_over_the_measurement(cache_dir, monkeypatch, mode):
    fake_route_timings(monkeypatch, next(r for r in fast_path.CPU_ATTENTION if r != mode))  # another would win
    fake_short_timings(monkeypatch, ("transposed", "plain"))
    model = tiny_model(seed=5)
    fast = FastEncoder(model, attention=mode)
    assert fast.attention == mode and fast.attention_choice is None
    assert bool(fast.short_attention) is (mode == "buckets"), "the short-group plan only matters to buckets"
    assert dict(fast.kernel_report())["attention route"] == f"{mode} (attention={mode!r} on cpu)"
    if not (cache_dir / "kernels.json").exists():
        return
    assert not [key for key in json.loads((cache_dir / "kernels.json").read_text()) if "attention route" in key]


@pytest.mark.parametrize("entry", [
    {"route": "gpu", "seconds": {"buckets": 1.0, "padded": 2.0, "nested": 3.0}},    # not one of the routes
    {"route": "padded", "seconds": {"padded": 0.5}},                               # a route's time missing
    {"route": "padded", "seconds": {"buckets": "1", "padded": 0.5, "nested": 3.0}},
    {"route": "padded", "seconds": {"buckets": -1.0, "padded": 0.5, "nested": 3.0}},
    {"route": "padded", "seconds": {"buckets": True, "padded": 0.5, "nested": 3.0}},
    {"route": "padded", "seconds": {"buckets": float("nan"), "padded": 0.5, "nested": 3.0}},
    {"route": "padded", "seconds": [1.0, 0.5, 3.0]},
    "padded",
])
def test_a_malformed_attention_entry_is_measured_again(cache_dir, monkeypatch, entry):
    calls = []
    fake_route_timings(monkeypatch, "buckets", calls)
    fake_short_timings(monkeypatch, ("sdpa", "sdpa"))
    model = tiny_model(seed=6)
    assert FastEncoder(model).attention == "buckets" and len(calls) == 1
    path = cache_dir / "kernels.json"
    record = json.loads(path.read_text())
    key = next(key for key in record if "attention route" in key)
    path.write_text(json.dumps({**record, key: entry}))
    forget_in_process()
    fake_route_timings(monkeypatch, "padded", calls)
    again = FastEncoder(model)
    assert not again.attention_choice.cached and again.attention == "padded" and len(calls) == 2, again.attention_choice
    assert json.loads(path.read_text())[key]["route"] == "padded", "the bad entry was replaced"


def test_the_choices_are_reported_and_logged(cache_dir, monkeypatch, caplog):
    fake_route_timings(monkeypatch, "buckets")
    fake_short_timings(monkeypatch, ("transposed", "plain"))
    with caplog.at_level(logging.INFO, logger="minibge.fast.kernels"):
        fast = FastEncoder(tiny_model(seed=7))
    report = dict(fast.kernel_report())
    assert report["attention route"].startswith("buckets (buckets 1000.00 ms, padded 2000.00 ms"), report
    shorts = [how for what, how in report.items() if what.startswith("attention of groups")]
    assert [how.split()[0] for how in shorts] == ["transposed", "plain"], report
    assert "fp32 matmuls" in report
    for what, how in fast.kernel_report()[1:]:
        assert f"{what} on this CPU" in caplog.text and how in caplog.text, (what, caplog.text)


def test_real_attention_measurements_time_every_candidate(cache_dir):
    """The real timing functions, once, on the tiny shapes: every candidate runs and gets a time."""
    short = fast_path.time_short_attention(2, 8, (3, 5))
    assert set(short) == set(fast_path.SHORT_METHODS) and all(0 < s < float("inf") for s in short.values()), short
    routes = fast_path.time_attention_routes(2, 8, ((15, "transposed"), (32, "plain")))
    assert set(routes) == set(fast_path.CPU_ATTENTION) and all(0 < s < float("inf") for s in routes.values()), routes
