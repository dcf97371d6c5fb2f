"""minibge.hub against a fake Hub: a real HTTP server on 127.0.0.1 serving the Hub's URL layout.

No test touches the internet. The fake Hub can cut a connection halfway, ignore Range
requests, or serve corrupt bytes, and it records every request so the tests can check what
the client asked for.
"""
import hashlib
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

from minibge import hub
from minibge.hub import HubError, default_weights_dir, download, resolve_model_path

REPO = "test-org/tiny-bge"
SHARDED = "test-org/sharded-bge"
rng = random.Random(0)
WEIGHTS = rng.randbytes(200_000)
FILES = {
    "config.json": json.dumps({"model_type": "bert", "hidden_size": 8}).encode(),
    "tokenizer.json": json.dumps({"model": {"vocab": {"[PAD]": 0}}}).encode(),
    "tokenizer_config.json": b'{"do_lower_case": true}',
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n",
    "modules.json": b'[{"idx": 0, "type": "sentence_transformers.models.Transformer"}]',
    "1_Pooling/config.json": b'{"pooling_mode_cls_token": true}',
    "model.safetensors": WEIGHTS,
    # present on the Hub, but not for us: another weights format, ONNX, docs
    "pytorch_model.bin": rng.randbytes(1000),
    "onnx/model.onnx": rng.randbytes(1000),
    "README.md": b"# tiny-bge\n",
}
SHARD_FILES = {
    "config.json": FILES["config.json"],
    "model-00001-of-00002.safetensors": rng.randbytes(30_000),
    "model-00002-of-00002.safetensors": rng.randbytes(20_000),
    "model.safetensors.index.json": json.dumps({"weight_map": {
        "embeddings.weight": "model-00001-of-00002.safetensors",
        "encoder.weight": "model-00002-of-00002.safetensors",
        "pooler.weight": "model-00002-of-00002.safetensors"}}).encode(),
}
WANTED = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "modules.json",
          "1_Pooling/config.json", "model.safetensors"]


def is_lfs(path):
    return path.endswith((".safetensors", ".bin", ".onnx"))


def listing(files):
    entries = [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in ("1_Pooling", "onnx")]
    for path, data in files.items():
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's own object id
        entry = {"type": "file", "path": path, "size": len(data), "oid": blob}
        if is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries.append(entry)
    return entries


class FakeHub:
    def __init__(self):
        self.repos = {REPO: dict(FILES), SHARDED: dict(SHARD_FILES)}
        self.requests = []       # (path, Range header, Authorization header)
        self.drop_once = set()   # file paths whose next download is cut off halfway
        self.drop_always = set()  # file paths whose every download is cut off halfway
        self.corrupt = set()     # file paths served with wrong bytes (same length)
        self.ignore_range = False
        self.extra_entries = []  # appended to every listing as they are: e.g. malformed ones
        self.entry_patch = {}    # path -> fields that replace the listing entry's own
        self.link = None         # a Link header sent with every listing page (or a function making one)
        self.trickle = {}        # path -> seconds between single bytes of its body
        self.extra_bytes = {}    # path -> bytes sent after the file's own
        self.no_length = set()   # paths served without Content-Length (closed to end)
        self.redirect = {}       # path -> Location answered with 302
        self.trickle_listing = 0  # seconds between single bytes of the listing
        hub_state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def send(self, status, body, headers=()):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                hub_state.requests.append((path, self.headers.get("Range"), self.headers.get("Authorization")))
                if m := re.fullmatch(r"/api/models/(.+)/tree/([^/]+)", path):
                    if m.group(1) not in hub_state.repos:
                        return self.send(404, b'{"error": "Repository not found"}')
                    entries = listing(hub_state.repos[m.group(1)]) + hub_state.extra_entries
                    for entry in entries:
                        if isinstance(entry, dict) and entry.get("path") in hub_state.entry_patch:
                            entry.update(hub_state.entry_patch[entry["path"]])
                    link = hub_state.link() if callable(hub_state.link) else hub_state.link
                    if hub_state.trickle_listing:
                        body = json.dumps(entries).encode()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        for i in range(len(body)):  # bounded, and stops when the client hangs up
                            try:
                                self.wfile.write(body[i:i + 1])
                                self.wfile.flush()
                            except OSError:
                                return
                            time.sleep(hub_state.trickle_listing)
                        return
                    return self.send(200, json.dumps(entries).encode(), [("Link", link)] if link else [])
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m or m.group(3) not in hub_state.repos.get(m.group(1), {}):
                    return self.send(404, b"Entry not found")
                name = m.group(3)
                data = hub_state.repos[m.group(1)][name] + hub_state.extra_bytes.get(m.group(3), b"")
                if name in hub_state.redirect:
                    return self.send(302, b"", [("Location", hub_state.redirect[name])])
                if name in hub_state.trickle or name in hub_state.no_length:
                    self.send_response(200)
                    if name not in hub_state.no_length:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.close_connection = True
                    for i in range(len(data) if name in hub_state.trickle else 1):  # bounded
                        try:
                            self.wfile.write(data[i:i + 1] if name in hub_state.trickle else data)
                            self.wfile.flush()
                        except OSError:  # the client gave up: that is what we test
                            return
                        time.sleep(hub_state.trickle.get(name, 0))
                    return
                if name in hub_state.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                if (r := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) and not hub_state.ignore_range:
                    start = int(r.group(1))
                status = 206 if start else 200
                headers = [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")] if start else []
                body = data[start:]
                if name in hub_state.drop_once | hub_state.drop_always:
                    # a correct Content-Length, then half the bytes, then the socket closes
                    hub_state.drop_once.discard(name)
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send(status, body, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def content_gets(self, name=None):
        return [(p, r) for p, r, _ in self.requests if "/resolve/" in p and (name is None or p.endswith("/" + name))]


@pytest.fixture
def fake_hub():
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in (hub.HUB_URL_ENV, hub.WEIGHTS_DIR_ENV, "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "RETRY_BACKOFF_S", 0.0)


def dead_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_full_download(fake_hub, tmp_path):
    dest = download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert dest == tmp_path / "m"
    assert all_files(dest) == sorted(WANTED + [hub.SOURCE_FILE])  # no .incomplete, no onnx/, no README, no .bin
    assert hub.recorded_source(dest) == REPO
    for name in WANTED:
        assert (dest / name).read_bytes() == FILES[name]
    fetched = [p.split("/resolve/main/")[1] for p, _ in fake_hub.content_gets()]
    assert sorted(fetched) == sorted(WANTED)
    assert fetched[-1] == "config.json"  # fetched last: it marks a complete folder


def test_dropped_connection_resumes_with_range(fake_hub, tmp_path):
    fake_hub.drop_once.add("model.safetensors")
    dest = download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert fake_hub.content_gets("model.safetensors") == [
        (f"/{REPO}/resolve/main/model.safetensors", None),
        (f"/{REPO}/resolve/main/model.safetensors", f"bytes={len(WEIGHTS) // 2}-")]
    assert not list(dest.rglob("*.incomplete"))


def test_hopeless_connection_gives_up_and_keeps_the_partial_file(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "RETRIES", 2)
    fake_hub.drop_always.add("model.safetensors")
    dest = tmp_path / "m"
    with pytest.raises(HubError, match="failed 3 times.*run the same command again"):
        download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert len(fake_hub.content_gets("model.safetensors")) == 3
    assert (dest / "model.safetensors.incomplete").read_bytes() == WEIGHTS[:175_000]  # kept for next time
    assert not (dest / "model.safetensors").exists()
    fake_hub.drop_always.clear()
    download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS


def test_partial_file_from_earlier_run_is_resumed(fake_hub, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model.safetensors.incomplete").write_bytes(WEIGHTS[:123_456])
    download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert fake_hub.content_gets("model.safetensors") == [
        (f"/{REPO}/resolve/main/model.safetensors", "bytes=123456-")]


def test_server_ignoring_range_restarts_from_zero(fake_hub, tmp_path):
    fake_hub.ignore_range = True
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model.safetensors.incomplete").write_bytes(WEIGHTS[:50_000])
    download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS


def test_corrupt_content_leaves_nothing_behind(fake_hub, tmp_path):
    fake_hub.corrupt.add("model.safetensors")
    dest = tmp_path / "m"
    with pytest.raises(HubError, match="model.safetensors.*corrupt.*sha256"):
        download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert not (dest / "model.safetensors").exists()
    assert not (dest / "model.safetensors.incomplete").exists()
    assert not (dest / "config.json").exists()  # the folder is not marked complete


def test_garbage_partial_file_is_caught_and_removed(fake_hub, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model.safetensors.incomplete").write_bytes(b"\0" * 1000)  # not a prefix of the real file
    with pytest.raises(HubError, match="sha256"):
        download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert not (dest / "model.safetensors.incomplete").exists()
    download(REPO, dest, base_url=fake_hub.url, progress=False)  # and the next run succeeds
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS


def test_unknown_repo_is_a_clear_error(fake_hub, tmp_path):
    with pytest.raises(HubError, match=r"model 'nobody/nothing' not found on the Hub at .*check the name"):
        download("nobody/nothing", tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert not (tmp_path / "m").exists()


def test_unreachable_hub_says_where_to_put_the_files(tmp_path):
    dest = tmp_path / "m"
    with pytest.raises(HubError) as info:
        download(REPO, dest, base_url=dead_url(), progress=False)
    message = str(info.value)
    assert "could not reach the Hub" in message
    assert str(dest) in message and "config.json" in message and hub.HUB_URL_ENV in message


def test_second_download_fetches_nothing(fake_hub, tmp_path):
    download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    before = len(fake_hub.content_gets())
    download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert len(fake_hub.content_gets()) == before  # only the listing was asked for again


def test_stale_final_file_is_replaced(fake_hub, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(bytes(len(WEIGHTS)))  # right size, wrong sha256
    download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS


def test_sharded_weights(fake_hub, tmp_path):
    dest = download(SHARDED, tmp_path / "s", base_url=fake_hub.url, progress=True)  # with the tqdm bar on
    assert all_files(dest) == sorted([*SHARD_FILES, hub.SOURCE_FILE])
    for name, data in SHARD_FILES.items():
        assert (dest / name).read_bytes() == data


def test_env_vars_pick_hub_and_folder(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.HUB_URL_ENV, fake_hub.url)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    monkeypatch.setenv("HF_ENDPOINT", dead_url())  # MINIBGE_HUB_URL wins over HF_ENDPOINT
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert default_weights_dir() == tmp_path / "w"
    dest = download(REPO, progress=False)
    assert dest == tmp_path / "w" / "tiny-bge"
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert all(auth == "Bearer secret" for _, _, auth in fake_hub.requests)


def test_hf_endpoint_is_honoured(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url + "/")
    download(REPO, tmp_path / "m", progress=False)
    assert (tmp_path / "m" / "config.json").read_bytes() == FILES["config.json"]


def test_resolve_model_path(fake_hub, tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model_path(folder) == folder
    assert resolve_model_path(str(folder)) == folder

    weights = tmp_path / "w"
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(weights))
    monkeypatch.setenv(hub.HUB_URL_ENV, dead_url())  # already present: no network needed
    (weights / "bge-small-en-v1.5").mkdir(parents=True)
    (weights / "bge-small-en-v1.5" / "config.json").write_text("{}")
    assert resolve_model_path("BAAI/bge-small-en-v1.5") == weights / "bge-small-en-v1.5"

    with pytest.raises(HubError, match="not downloaded yet"):
        resolve_model_path(REPO, download_if_missing=False)
    monkeypatch.setenv(hub.HUB_URL_ENV, fake_hub.url)
    assert resolve_model_path(REPO) == weights / "tiny-bge"
    assert (weights / "tiny-bge" / "model.safetensors").read_bytes() == WEIGHTS

    # the folder is named after the name alone: another org's model of that name is not this one
    other = REPO.replace(REPO.split("/")[0], "someone-else")
    with pytest.raises(HubError, match=f"holds '{REPO}', not '{other}'"):
        resolve_model_path(other)
    with pytest.raises(HubError, match=f"holds '{REPO}', not '{other}'"):
        download(other, progress=False)
    hub.check_source(weights / "tiny-bge", REPO.upper())  # Hub ids are not case-sensitive: no error

    for nonsense in (tmp_path / "does" / "not" / "exist", "./missing/model", "no such thing"):
        with pytest.raises(HubError, match="no such model folder.*not a Hub id like BAAI/bge-small-en-v1.5"):
            resolve_model_path(nonsense)


def test_repo_without_config_is_refused(fake_hub, tmp_path):
    del fake_hub.repos[REPO]["config.json"]
    with pytest.raises(HubError, match="no config.json"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)


# ---------------------------------------------------------------- hostile ids and listings
def tree(folder):
    """Every file and folder under `folder`, as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("repo_id", ["org/..", "org/.", "org/", "../org", "/etc/passwd", "org/a/b", "org//a",
                                     "a/../../x", "org\\..\\x", "org/name\n", "", "org/na me"])
def test_hostile_repo_id_is_refused_before_anything_is_written(fake_hub, tmp_path, monkeypatch, repo_id):
    weights = tmp_path / "sandbox" / "weights"
    weights.mkdir(parents=True)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(weights))
    fake_hub.repos[repo_id] = dict(FILES)  # a mirror that would happily serve it
    with pytest.raises(ValueError, match="not a Hub model id"):
        download(repo_id, base_url=fake_hub.url, progress=False)
    assert tree(tmp_path) == ["sandbox", "sandbox/weights"]
    assert fake_hub.requests == []  # refused before asking the Hub anything


@pytest.mark.parametrize("bad_name", ["../x", "/etc/x", "a/../../x", "1_Pooling/../../x", "a//b", "./x", "a\\..\\x", ""])
def test_hostile_file_name_in_listing_is_refused(fake_hub, tmp_path, monkeypatch, bad_name):
    weights = tmp_path / "sandbox" / "weights"
    weights.mkdir(parents=True)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(weights))
    fake_hub.repos[REPO][bad_name] = b"pwned"
    with pytest.raises(HubError, match="refusing"):
        download(REPO, base_url=fake_hub.url, progress=False)
    assert tree(tmp_path) == ["sandbox", "sandbox/weights"]
    assert fake_hub.content_gets() == []  # the listing alone was enough to refuse


@pytest.mark.parametrize("shard", ["../evil.safetensors", "a/../../evil.safetensors", "/tmp/evil.safetensors"])
def test_hostile_shard_index_writes_nothing_outside(fake_hub, tmp_path, monkeypatch, shard):
    weights = tmp_path / "sandbox" / "weights"
    weights.mkdir(parents=True)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(weights))
    index = json.dumps({"weight_map": {"embeddings.weight": shard}}).encode()
    fake_hub.repos[SHARDED]["model.safetensors.index.json"] = index
    with pytest.raises(HubError, match="refusing|lacks"):
        download(SHARDED, base_url=fake_hub.url, progress=False)
    outside = [p for p in tree(tmp_path) if not p.startswith("sandbox/weights")]
    assert outside == ["sandbox"]


def test_symlinked_subfolder_cannot_lead_outside(fake_hub, tmp_path):
    dest, elsewhere = tmp_path / "m", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "1_Pooling").symlink_to(elsewhere)  # the check is made after resolving links
    with pytest.raises(HubError, match="refusing.*1_Pooling/config.json.*outside"):
        download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("entry", [{"type": "file", "size": 3}, {"type": "file", "path": 5}, "config.json"])
def test_malformed_listing_is_one_clear_error(fake_hub, tmp_path, entry):
    fake_hub.extra_entries.append(entry)
    with pytest.raises(HubError, match="malformed entry"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert not (tmp_path / "m").exists()


def test_non_string_repo_id_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="Hub model id is a str"):
        download(tmp_path, progress=False)  # the classic mix-up: a folder where an id belongs


def test_mistyped_relative_path_speaks_of_folder_and_hub(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    monkeypatch.setenv(hub.HUB_URL_ENV, fake_hub.url)
    with pytest.raises(HubError) as info:
        resolve_model_path("models/my-model")  # no such folder here, and no such model on the Hub
    message = str(info.value)
    assert f"no folder {tmp_path / 'models' / 'my-model'}" in message
    assert "as a Hub id: model 'models/my-model' not found on the Hub" in message
    with pytest.raises(HubError, match=r"no folder .*models/my-model, and as a Hub id, .* not downloaded yet"):
        resolve_model_path("models/my-model", download_if_missing=False)
    assert all_files(tmp_path) == []


def test_load_model_takes_a_hub_id_like_load_embedder(tmp_path, monkeypatch):
    import torch

    import minibge
    from conftest import TINY

    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(hub.HUB_URL_ENV, dead_url())  # already in the weights folder: no network needed
    torch.manual_seed(0)
    model = minibge.BertModel(minibge.BertConfig(**TINY))
    minibge.save_pretrained(model, tmp_path / "tiny-bge")
    loaded = minibge.load_model(REPO)  # "test-org/tiny-bge"
    for (name, ours), theirs in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_no_progress_bars_in_logs_by_default(fake_hub, tmp_path, capsys):
    download(REPO, tmp_path / "m", base_url=fake_hub.url)  # stderr is captured: not a terminal
    assert capsys.readouterr().err == ""
    download(SHARDED, tmp_path / "s", base_url=fake_hub.url, progress=True)
    assert "model-00001-of-00002" in capsys.readouterr().err  # the bar, when asked for


# ---------------------------------------------------------------- hostile servers (issue 23: 6, 7, 8, 11)
def test_trickling_server_is_given_up_by_the_stall_guard(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_HUB_SPEED_LIMIT", "1000")
    monkeypatch.setenv("MINIBGE_HUB_SPEED_TIME", "1")
    fake_hub.trickle["vocab.txt"] = 0.1  # ~10 B/s, and it would take 3 s to finish
    # the stall error itself is the proof: a transfer that ran to its end raises nothing (no wall-clock
    # bound here: on a busy machine the time says more about the machine than about the guard)
    with pytest.raises(HubError, match=r"vocab.txt stalled: .*MINIBGE_HUB_SPEED_LIMIT"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert not (tmp_path / "m" / "config.json").exists()


def test_slow_but_steady_server_still_finishes(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_HUB_SPEED_LIMIT", "5")
    monkeypatch.setenv("MINIBGE_HUB_SPEED_TIME", "0.5")
    fake_hub.trickle["tokenizer_config.json"] = 0.02  # 50 B/s: slow, but above the floor
    dest = download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert (dest / "tokenizer_config.json").read_bytes() == FILES["tokenizer_config.json"]


def test_default_limits():
    limits = hub.Limits.from_env()
    assert (limits.speed_limit, limits.speed_time, limits.listing_timeout) == (1024, 60, 60)
    assert (limits.max_pages, limits.max_file_size) == (100, 2 << 30)


def test_bad_limit_setting_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIBGE_HUB_SPEED_TIME", "soon")
    with pytest.raises(HubError, match=r"\$MINIBGE_HUB_SPEED_TIME='soon' is not a float"):
        download(REPO, tmp_path / "m", base_url=dead_url(), progress=False)


@pytest.mark.parametrize("link", ["<{url}/api/models/test-org/tiny-bge/tree/main?recursive=true>; rel=\"next\"",
                                  "</api/models/test-org/tiny-bge/tree/main?recursive=true>; rel=\"next\""])
def test_next_page_pointing_at_itself_is_an_error_not_a_loop(fake_hub, tmp_path, link):
    fake_hub.link = link.format(url=fake_hub.url)
    with pytest.raises(HubError, match="as its next page again"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert len(fake_hub.requests) == 1


def test_trickling_listing_meets_its_deadline(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_HUB_LISTING_TIMEOUT", "1")
    fake_hub.trickle_listing = 0.05  # the listing would take minutes at this rate
    # the deadline's error is the proof that it, not the end of the listing, stopped the download
    with pytest.raises(HubError, match=r"listing 'test-org/tiny-bge' at .* took over 1s \(\$MINIBGE_HUB_LISTING_TIMEOUT\)"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)


def test_page_cap(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_HUB_MAX_PAGES", "3")
    cursors = iter(range(1000))  # a fresh cursor for every page, so only the cap can stop it
    fake_hub.link = lambda: f"<?recursive=true&cursor={next(cursors)}>; rel=\"next\""
    with pytest.raises(HubError, match=r"more than 3 pages \(\$MINIBGE_HUB_MAX_PAGES\)"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert len(fake_hub.requests) == 3


def test_next_page_on_another_host_is_refused_and_gets_no_token(fake_hub, tmp_path, monkeypatch):
    other = FakeHub()
    try:
        monkeypatch.setenv("HF_TOKEN", "secret")
        fake_hub.link = f"<{other.url}/api/models/{REPO}/tree/main?recursive=true>; rel=\"next\""
        with pytest.raises(HubError, match="next page on another host"):
            download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
        assert other.requests == []
    finally:
        other.server.shutdown()
        other.server.server_close()


@pytest.mark.parametrize("no_length", [False, True])
def test_reads_stop_at_the_listed_size(fake_hub, tmp_path, no_length):
    fake_hub.extra_bytes["vocab.txt"] = b"x" * 100_000
    if no_length:
        fake_hub.no_length.add("vocab.txt")
    with pytest.raises(HubError, match="vocab.txt (announces|sent more than).*the %d bytes the listing gives"
                       % len(FILES["vocab.txt"])):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert not (tmp_path / "m" / "vocab.txt").exists()
    assert not (tmp_path / "m" / "vocab.txt.incomplete").exists()


def test_entry_without_size_has_a_cap(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_HUB_MAX_FILE_SIZE", "1000")
    fake_hub.entry_patch["vocab.txt"] = {"size": None, "oid": None}
    fake_hub.extra_bytes["vocab.txt"] = b"x" * 5000
    fake_hub.no_length.add("vocab.txt")
    with pytest.raises(HubError, match=r"vocab.txt sent more than the 1000 bytes allowed.*MINIBGE_HUB_MAX_FILE_SIZE"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert not (tmp_path / "m" / "vocab.txt.incomplete").exists()


@pytest.mark.parametrize("patch", [{"size": -1}, {"size": "abc"}, {"lfs": [1, 2]}, {"lfs": {"size": -5}},
                                   {"oid": 7}])
def test_bad_sizes_in_listing_are_one_clear_error(fake_hub, tmp_path, patch):
    fake_hub.entry_patch["model.safetensors"] = patch
    with pytest.raises(HubError, match=r"malformed entry.*'model.safetensors' has") as info:
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert "\n" not in str(info.value)
    assert fake_hub.content_gets() == []


def test_non_lfs_file_is_checked_against_its_git_blob_id(fake_hub, tmp_path):
    fake_hub.corrupt.add("vocab.txt")
    with pytest.raises(HubError, match="vocab.txt .*corrupt: its git blob id is"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert not (tmp_path / "m" / "vocab.txt").exists()
    assert not (tmp_path / "m" / "vocab.txt.incomplete").exists()


def test_redirect_to_ftp_is_an_error_not_retries(fake_hub, tmp_path):
    fake_hub.redirect["vocab.txt"] = "ftp://127.0.0.1/vocab.txt"
    with pytest.raises(HubError, match=r"vocab.txt redirected to ftp://.*only http\(s\) redirects"):
        download(REPO, tmp_path / "m", base_url=fake_hub.url, progress=False)
    assert len(fake_hub.content_gets("vocab.txt")) == 1


def test_planted_dangling_symlink_is_not_written_through(fake_hub, tmp_path):
    dest, outside = tmp_path / "m", tmp_path / "outside" / "x"
    dest.mkdir()
    outside.parent.mkdir()
    (dest / "vocab.txt.incomplete").symlink_to(outside)
    with pytest.raises(HubError, match="refusing to write through the symlink .*vocab.txt.incomplete"):
        download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert not outside.exists()


def test_symlinked_source_record_does_not_overwrite_its_target(fake_hub, tmp_path):
    dest, target = tmp_path / "m", tmp_path / "precious.txt"
    dest.mkdir()
    target.write_text("keep me")
    (dest / hub.SOURCE_FILE).symlink_to(target)
    download(REPO, dest, base_url=fake_hub.url, progress=False)
    assert target.read_text() == "keep me"
    assert not (dest / hub.SOURCE_FILE).is_symlink() and hub.recorded_source(dest) == REPO
    assert all_files(dest) == sorted(WANTED + [hub.SOURCE_FILE])  # no temporary left


def test_unrecorded_folder_answers_a_hub_id_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(hub.HUB_URL_ENV, dead_url())
    (tmp_path / "all-MiniLM-L6-v2").mkdir()
    (tmp_path / "all-MiniLM-L6-v2" / "config.json").write_text("{}")
    with caplog.at_level("WARNING", logger="minibge.hub"):
        assert resolve_model_path("someone/all-MiniLM-L6-v2") == tmp_path / "all-MiniLM-L6-v2"
    assert "records no source" in caplog.text and "someone/all-MiniLM-L6-v2" in caplog.text
