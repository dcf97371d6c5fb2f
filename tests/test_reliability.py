"""Reliability round 2 (issue 23): each fault injected for real, each answer checked.

    two writers to one output       two real `minibge encode` processes (and two torchrun groups)
    code execution on --resume      an evil pickled trainer_state.pt that would create a marker file
    a full disk                     RLIMIT_FSIZE in a subprocess, and a 1 MB tmpfs where mount works
    a last step that blows up       `finetune --lr 1e9 --max-steps 1`
    a folder from a cut-short save  run.json "finished": false, broken side files
    a changed training file         --resume after the file was edited
    the small ones of item 11       closed stdin/stdout, invalid UTF-8 on stdin, --output = --input,
                                    hostile config.json / tokenizer.json, broken checkpoints

docs/reliability.md lists every class tried (both rounds) with the test that proves it. Random-weight
tiny models keep each test quick; the ones that start several processes are marked slow.
"""
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minibge import load_embedder
from minibge.cli import main
from minibge.common import atomic_folder, atomic_path, file_fingerprint
from minibge.train import loop as train_module
from minibge.train import Batches, TrainConfig, train
from minibge.weights import load_model

from conftest import REPO_ROOT

MARKER = "evil-pickle-ran"


@pytest.fixture(autouse=True)
def no_model_env(monkeypatch):
    monkeypatch.delenv("MINIBGE_MODEL", raising=False)


@pytest.fixture
def tiny(fake_bge):
    """A random-weight 2-layer BERT (hidden 32) with the real MiniLM tokenizer: loads and embeds in moments."""
    return fake_bge("tiny-bert")


def lines(n, what):
    return [f"{what} number {i}: " + "a few more words " * (i % 5) for i in range(n)]


def environment():
    env = {k: v for k, v in os.environ.items() if k != "MINIBGE_MODEL"}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def minibge(*args, **kwargs):
    """`python -m minibge ARGS` as a real process (Popen keyword arguments pass through)."""
    return subprocess.Popen([sys.executable, "-m", "minibge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=environment(), **kwargs)


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, out, err


def read_vectors(path):
    if path.suffix == ".npy":
        return np.load(path)
    return np.array([json.loads(line)["embedding"] for line in path.read_text().splitlines()], dtype=np.float32)


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".partial"))


# -----------------------------------------------------------------------------
# Item 1: two writers to one output

def test_atomic_path_leaves_the_old_file_on_failure_and_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert out.read_text() == "old" and leftovers(tmp_path) == []
    with atomic_path(out) as first, atomic_path(out) as second:  # two writers: two names, last rename wins
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert out.read_text() == "first" and leftovers(tmp_path) == []


def test_atomic_path_replaces_a_symlink_rather_than_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out.txt").symlink_to(victim)
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("new")
    assert victim.read_text() == "keep me" and not (tmp_path / "out.txt").is_symlink()


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed halfway")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError, match="created by another writer"):
        with atomic_folder(target) as first:
            (first / "a").write_text("first")
            (first / "b").write_text("first")
            with atomic_folder(target) as second:
                (second / "a").write_text("second")
            # the second writer created it meanwhile: the first is refused, nothing of it mixed in
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "second"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_folder_into_an_existing_folder_replaces_files_and_keeps_others(tmp_path):
    target = tmp_path / "run"
    (target / "1_Pooling").mkdir(parents=True)
    (target / "1_Pooling" / "stale.json").write_text("old")
    (target / "run.json").write_text("mine")
    (target / "config.json").write_text("old")
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new" and (target / "run.json").read_text() == "mine"
    assert sorted(p.name for p in (target / "1_Pooling").iterdir()) == ["config.json"], "a subfolder is replaced whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_save_pretrained_interrupted_leaves_no_folder(tiny, tmp_path, monkeypatch):
    embedder = load_embedder(tiny, device="cpu")
    monkeypatch.setattr(embedder.tokenizer, "save_pretrained", lambda d: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        embedder.save_pretrained(tmp_path / "saved")
    assert list(tmp_path.iterdir()) == [tiny], "neither the folder nor its temporary is left"


@pytest.mark.slow  # two processes, each importing torch
@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_two_writers_to_one_output_leave_one_of_them_whole(suffix, tiny, tmp_path):
    texts = {"A": lines(3000, "cat"), "B": lines(3000, "stock market")}
    for name, t in texts.items():
        (tmp_path / f"{name}.txt").write_text("".join(x + "\n" for x in t))
    out = tmp_path / f"o{suffix}"
    procs = {name: minibge("encode", "-m", tiny, "--input", tmp_path / f"{name}.txt", "--output", out)
             for name in texts}
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, (code, stdout, stderr) in results.items():
        assert code == 0, f"writer {name}: {stderr}"
        assert stdout.strip().startswith("wrote 3000 "), stdout
    got = read_vectors(out)
    embedder = load_embedder(tiny, device="cpu")
    matches = []
    for name, t in texts.items():
        expected = embedder.encode(t)
        if got.shape == expected.shape and np.abs(got - expected).max() < 1e-4:
            matches.append(name)
    assert len(matches) == 1, f"the output is neither A's nor B's vectors entirely (shape {got.shape})"
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # two torchrun groups of two ranks: six processes
def test_two_sharded_writers_to_one_output_leave_one_of_them_whole(tiny, tmp_path):
    from test_cli_shard import torchrun

    texts = {"A": lines(600, "cat"), "B": lines(600, "stock market")}
    for name, t in texts.items():
        (tmp_path / f"{name}.txt").write_text("".join(x + "\n" for x in t))
    out = tmp_path / "o.npy"
    procs = {name: torchrun("-m", str(tiny), "--input", str(tmp_path / f"{name}.txt"), "--output", str(out), popen=True)
             for name in texts}
    for name, proc in procs.items():
        code, _, stderr = finish(proc, timeout=600)
        assert code == 0, f"group {name}: {stderr[-2000:]}"
    got = np.load(out)
    embedder = load_embedder(tiny, device="cpu")
    matches = [name for name, t in texts.items() if np.abs(got - embedder.encode(t)).max() < 1e-4]
    assert len(matches) == 1, "the output mixes the two runs' rows"
    assert leftovers(tmp_path) == [], "no part file is left"


# -----------------------------------------------------------------------------
# Item 2: --resume runs no code from the checkpoint; item 11: broken checkpoints are one line

def toy_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


class Crash(Exception):
    pass


def toy_run(out, resume=False, crash_after=None, run_info=None):
    model = toy_model()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    examples = list(zip(x, x.sum(1, keepdim=True)))
    calls = []

    def loss_fn(batch):
        if crash_after is not None and len(calls) == crash_after:
            raise Crash
        calls.append(1)
        return {"loss": ((model(batch[0]) - batch[1]) ** 2).mean()}

    def collate(rows, generator):
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    batches = Batches(examples, collate, batch_size=4)
    train(model, loss_fn, batches, TrainConfig(epochs=2, batch_size=4, save_steps=2, lr=1e-2), out,
          resume=resume, run_info=run_info or {"task": "toy"})
    return model


class Evil:
    """Unpickling this creates a file: what a hostile trainer_state.pt could do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def crashed_run(tmp_path, run_info=None):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        toy_run(out, crash_after=9, run_info=run_info)
    (checkpoint,) = train_module.checkpoints(out)
    return out, checkpoint / train_module.STATE_FILE


def test_resume_never_runs_code_from_an_evil_checkpoint(tmp_path):
    out, state_file = crashed_run(tmp_path)
    marker = tmp_path / MARKER
    state = torch.load(state_file, weights_only=True)
    state["rng"] = Evil(marker)
    torch.save(state, state_file)  # a real pickle: loading it without weights_only creates the marker
    with pytest.raises(ValueError, match=rf"cannot resume from {state_file}: it asks to build \S+, which is not a "
                                         "tensor or a plain value, so it was not loaded"):
        toy_run(out, resume=True)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists(), "the payload does work when unpickled freely (so the test can fail)"


def test_checkpoints_read_back_with_weights_only(tmp_path):
    out, state_file = crashed_run(tmp_path)
    torch.load(state_file, weights_only=True)  # the RNG states are tensors and lists
    toy_run(out, resume=True)
    assert json.loads((out / "run.json").read_text())["finished"] is True


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-state", "missing-field", "wrong-shapes"])
def test_a_broken_checkpoint_is_one_error_naming_the_file(damage, tmp_path):
    out, state_file = crashed_run(tmp_path)
    data = state_file.read_bytes()
    if damage == "truncated":
        state_file.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        state_file.write_bytes(bytes(range(256)) * 40)
    elif damage == "empty":
        state_file.write_bytes(b"")
    elif damage == "not-a-state":
        torch.save([1, 2, 3], state_file)
    else:
        state = torch.load(state_file, weights_only=True)
        if damage == "missing-field":
            del state["optimizer"]
        else:
            state["model"] = {name: torch.zeros(3) for name in state["model"]}
        torch.save(state, state_file)
    with pytest.raises(ValueError) as caught:
        toy_run(out, resume=True)
    message = str(caught.value)
    assert message.startswith(f"cannot resume from {state_file}: ") and "\n" not in message, message


# -----------------------------------------------------------------------------
# Item 3: a full disk

def set_file_size_limit(limit):
    def limit_it():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Python ignores it too; a write then fails with EFBIG
    return limit_it


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs (root with mount rights only; skipped otherwise)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE case covers the same path")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
@pytest.mark.parametrize("fault", ["RLIMIT_FSIZE", "tmpfs"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(fault, suffix, tiny, tmp_path, request):
    source = tmp_path / "texts.txt"
    source.write_text("".join(x + "\n" for x in lines(10_000, "line")))  # 1.28 MB as .npy, ~4 MB as .jsonl
    if fault == "tmpfs":
        folder, limit = request.getfixturevalue("small_tmpfs"), None
    else:
        folder, limit = tmp_path / "out", 512 * 1024
        folder.mkdir()
    out = folder / f"vectors{suffix}"
    proc = minibge("encode", "-m", tiny, "--input", source, "--output", out,
                   preexec_fn=set_file_size_limit(limit) if limit else None)
    code, stdout, stderr = finish(proc)
    assert code == 1, f"exit {code} (135 would be SIGBUS): {stderr}"
    error = stderr.strip().splitlines()[-1]
    assert error.startswith(f"minibge: error: {out}: ") and "nothing was written" in error, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert list(folder.iterdir()) == [], "no partial file is left"


# -----------------------------------------------------------------------------
# Item 4: a last step that blows up; item 5: a folder from a cut-short save; item 9: a changed file

def write_train_file(path, n=16):
    path.write_text("".join(json.dumps({"query": f"question {i} about cats", "pos": [f"cats answer {i}"],
                                        "neg": [f"dogs {i}", f"stocks {i}"]}) + "\n" for i in range(n)))
    return path


def finetune_args(model, train_file, out, *extra):
    return ["finetune", "-m", str(model), "--train", str(train_file), "--out", str(out), "--batch-size", "2",
            "--group-size", "2", "--max-steps", "1", *map(str, extra)]


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json")


def test_a_last_step_that_blows_up_writes_no_model(tiny, tmp_path, capsys):
    train_file = write_train_file(tmp_path / "train.jsonl")
    out = tmp_path / "ft"
    assert main(finetune_args(tiny, train_file, out, "--lr", "1e9")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("minibge: error: step 1: ") and "was not saved" in err, err
    assert not any((out / name).exists() for name in MODEL_FILES), sorted(p.name for p in out.iterdir())
    assert json.loads((out / "run.json").read_text())["finished"] is False
    with pytest.raises(ValueError, match="has not finished"):
        load_embedder(out)


def test_the_weights_check_refuses_non_finite_weights_and_keeps_the_checkpoint(tmp_path):
    model = toy_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 3: parameter 0.weight holds NaN or inf"):
        train_module.check_before_saving(model, lambda b: {"loss": torch.tensor(0.0)}, None,
                                         torch.device("cpu"), "fp32", 3)


def test_a_folder_whose_run_did_not_finish_is_refused(tiny, tmp_path, capsys):
    folder = tmp_path / "cut-short"
    shutil.copytree(tiny, folder)
    (folder / "run.json").write_text(json.dumps({"run": {}, "finished": False}))
    with pytest.raises(ValueError, match=r"has not finished .*--resume"):
        load_embedder(folder)
    assert main(["encode", "-m", str(folder), "hello"]) == 1
    assert "--resume" in capsys.readouterr().err
    (folder / "run.json").write_text(json.dumps({"run": {}, "finished": True}))
    assert load_embedder(folder, device="cpu").encode("hello").shape == (32,)


def test_a_killed_final_save_is_refused(tiny, tmp_path, monkeypatch):
    """The real sequence: the final save dies after the tokenizer files, before the ST files."""
    import minibge.embedder as embedder_module

    train_file = write_train_file(tmp_path / "train.jsonl")
    out = tmp_path / "ft"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT/SIGTERM do mid-save

    monkeypatch.setattr(embedder_module, "write_sentence_transformers_files", killed)
    assert main(finetune_args(tiny, train_file, out, "--lr", "1e-5")) == 130
    monkeypatch.undo()
    assert not (out / "config.json").exists(), "nothing of the interrupted save reached the folder"
    with pytest.raises(ValueError, match="has not finished"):
        load_embedder(out)
    assert leftovers(tmp_path) == [] and leftovers(out) == []


def test_resume_refuses_a_changed_training_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("one\ntwo\n")
    info = {"train_file": str(data), train_module.DATA_KEY: file_fingerprint(data)}
    out, _ = crashed_run(tmp_path, run_info=info)
    data.write_text("one\n")  # cut short
    changed = {"train_file": str(data), train_module.DATA_KEY: file_fingerprint(data)}
    with pytest.raises(ValueError, match=rf"the training file {data} has changed .*8 bytes, sha256 .* then, "
                                         rf"4 bytes, sha256 .* now"):
        toy_run(out, resume=True, run_info=changed)
    data.write_text("one\ntwo\n")  # put back: resumes
    toy_run(out, resume=True, run_info=info)


def test_finetune_records_the_training_file_and_checks_arguments_first(tiny, tmp_path, capsys):
    train_file = write_train_file(tmp_path / "train.jsonl")
    out = tmp_path / "ft"
    assert main(finetune_args(tiny, train_file, out, "--temperature", "1.0")) == 1
    assert "temperature 1.0 is too high" in capsys.readouterr().err
    assert not out.exists(), "a refused argument leaves no run folder behind"
    assert main(finetune_args(tiny, train_file, out, "--temperature", "0.05")) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())["run"]
    assert run[train_module.DATA_KEY] == file_fingerprint(train_file)
    assert run["temperature"] == 0.05 and run["config"]["max_steps"] == 1


# -----------------------------------------------------------------------------
# Item 5: side files validated at load

BAD_SIDE_FILES = [
    ("sentence_bert_config.json", {"max_seq_length": True}, "field 'max_seq_length'"),
    ("sentence_bert_config.json", {"max_seq_length": "256"}, "field 'max_seq_length'"),
    ("sentence_bert_config.json", [256], "must hold a JSON object"),
    ("modules.json", {"0": "Transformer"}, "must hold a JSON list"),
    ("modules.json", [{"type": "sentence_transformers.models.Pooling", "path": "../outside"}], "leads outside"),
    ("modules.json", [{"type": "sentence_transformers.models.Pooling", "path": "/etc"}], "leads outside"),
    ("modules.json", [{"type": 3, "path": "1_Pooling"}], "field 'type'"),
    ("1_Pooling/config.json", {"pooling_mode_cls_token": "yes"}, "field 'pooling_mode_cls_token'"),
    ("config_sentence_transformers.json", {"prompts": ["query: "]}, "field 'prompts'"),
    ("config_sentence_transformers.json", {"prompts": {"query": 1}}, "field 'prompts.query'"),
    ("tokenizer_config.json", ["not", "an", "object"], "must hold a JSON object"),
]


@pytest.mark.parametrize("name, content, problem", BAD_SIDE_FILES,
                         ids=[f"{n}-{p}" for n, _, p in BAD_SIDE_FILES])
def test_bad_side_files_are_refused_at_load_naming_file_and_field(name, content, problem, tiny):
    path = tiny / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as caught:
        load_embedder(tiny, device="cpu")
    assert str(caught.value).startswith(str(path)) and problem in str(caught.value), str(caught.value)


# -----------------------------------------------------------------------------
# Item 11: hostile files in a model folder, closed streams, bad command lines

def test_deeply_nested_config_json_is_one_error(tiny):
    (tiny / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{tiny / 'config.json'} is nested too deeply"):
        load_model(tiny)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder", "huge"])
def test_config_json_that_is_not_a_small_regular_file_is_refused_before_reading(kind, tiny):
    config = tiny / "config.json"
    config.unlink()
    if kind == "dev-zero":
        config.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(config)  # reading it would block forever: the check must come before the open
    elif kind == "folder":
        config.mkdir()
    else:
        with open(config, "wb") as f:
            f.truncate(65 << 20)  # sparse: 65 MB that take no disk
    with pytest.raises(ValueError, match=f"{config} (is not a regular file|is .* bytes, more than)"):
        load_model(tiny)


@pytest.mark.parametrize("content", [b"{not json", b'{"model": 3}', b"\xff\xfe", b""])
def test_malformed_tokenizer_json_is_one_error_naming_it(content, tiny):
    (tiny / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError) as caught:
        load_embedder(tiny, device="cpu")
    message = str(caught.value)
    assert message.startswith(str(tiny / "tokenizer.json")) and "\n" not in message, message


def test_closed_stdin_and_stdout_are_one_line(tiny, tmp_path):
    code, _, stderr = finish(minibge("encode", "-m", tiny, "--input", "-", "--output", tmp_path / "o.npy",
                                     stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0)))
    assert code == 1 and stderr.strip().splitlines()[-1] == \
        "minibge: error: stdin: stdin is closed; give a file, or pipe the texts in", stderr
    proc = subprocess.Popen([sys.executable, "-m", "minibge", "encode", "-m", str(tiny), "hello"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=environment(),
                            preexec_fn=lambda: os.close(1))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "stdout is closed" in stderr, stderr


def test_invalid_utf8_on_stdin_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import io

    data = b"".join(f"line {i}\n".encode() for i in range(50_000)) + b"bad \xff byte\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    # a model that does not exist: the UTF-8 error must come first, before any model is looked for
    assert main(["encode", "-m", str(tmp_path / "no-model"), "--input", "-", "--output", str(tmp_path / "o.jsonl")]) == 1
    assert capsys.readouterr().err.strip() == \
        "minibge: error: stdin line 50001: not valid UTF-8 (invalid start byte at byte 4)"
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    source = tmp_path / "texts.jsonl"
    source.write_text("hello\n")
    assert main(["encode", "-m", str(tmp_path / "any"), "--input", str(source), "--output", str(source)]) == 2
    assert "--output" in capsys.readouterr().err and source.read_text() == "hello\n"
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    assert main(["encode", "-m", str(tmp_path / "any"), "--input", str(source), "--output", str(link)]) == 2
    assert source.read_text() == "hello\n"


# -----------------------------------------------------------------------------
# Round 2's clean classes, kept clean: each was probed by hand in the issue, now with a test

def test_an_evil_pickled_bin_is_refused_and_runs_nothing(tiny, tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny / "model.safetensors")
    state["evil"] = Evil(tmp_path / MARKER)
    (tiny / "model.safetensors").unlink()
    torch.save(state, tiny / "pytorch_model.bin")
    with pytest.raises(ValueError, match="could not read .*pytorch_model.bin"):
        load_model(tiny)
    assert not (tmp_path / MARKER).exists()


def test_auto_map_in_config_json_is_ignored(tiny, tmp_path):
    (tiny / "evil_model.py").write_text(f"open({str(tmp_path / MARKER)!r}, 'w').close()\n")
    config = json.loads((tiny / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil_model.EvilModel"}
    (tiny / "config.json").write_text(json.dumps(config))
    assert load_embedder(tiny, device="cpu").encode("hello").shape == (32,)
    assert not (tmp_path / MARKER).exists(), "minibge never imports code from a model folder"


def test_nul_and_control_characters_embed_like_any_text(tiny):
    embedder = load_embedder(tiny, device="cpu")
    vectors = embedder.encode(["a\x00b", "\x00", "tab\there\x1b[31m"])
    assert vectors.shape == (3, 32) and np.isfinite(vectors).all()


def test_one_embedder_shared_by_threads_gives_each_its_own_vectors(tiny):
    from concurrent.futures import ThreadPoolExecutor

    embedder = load_embedder(tiny, device="cpu")
    jobs = [(lines(40, f"thread {i}"), 4 + 4 * i) for i in range(4)]  # different max_length per thread
    serial = [embedder.encode(texts, max_length=length) for texts, length in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: embedder.encode(job[0], max_length=job[1]), jobs * 3))
    for i, got in enumerate(threaded):
        assert np.abs(got - serial[i % 4]).max() < 1e-5, f"thread job {i} got another job's settings"


def test_a_checkpoint_cut_short_by_sigkill_is_ignored_and_resume_is_exact(tmp_path):
    straight = toy_run(tmp_path / "straight")
    out, state_file = crashed_run(tmp_path)
    # What SIGKILL during save_checkpoint leaves: a hidden temporary folder with half a state file
    half = out / ".checkpoint-6.k1ll3d.partial"
    half.mkdir()
    (half / train_module.STATE_FILE).write_bytes(state_file.read_bytes()[:1000])
    resumed = toy_run(out, resume=True)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max():.3e}"
    assert train_module.checkpoints(out) == []


@pytest.mark.slow  # a real process killed mid-write
def test_sigkill_during_encode_keeps_the_old_output(tiny, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("".join(x + "\n" for x in lines(200_000, "line")))
    out = tmp_path / "out.npy"
    out.write_bytes(b"the previous results")
    proc = minibge("encode", "-m", tiny, "--input", source, "--output", out)
    try:
        import time
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftovers(tmp_path), f"encode ended before it could be killed: {proc.poll()}"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert out.read_bytes() == b"the previous results"
    (temporary,) = leftovers(tmp_path)  # only SIGKILL can leave one, under a hidden name
    assert temporary.startswith(".out.npy.")


def test_the_reliability_page_names_only_tests_that_exist():
    """docs/reliability.md cites a test for each class; each name must be a test function (file::name
    where a file is given, else in the file cited last in that cell, else anywhere in tests/)."""
    import re

    page = (REPO_ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    sources = {path.name: path.read_text(encoding="utf-8") for path in (REPO_ROOT / "tests").rglob("test_*.py")}
    missing = []
    for row in page.splitlines():
        if not row.startswith("|"):
            continue
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)", row):
            current = file or current
            places = [sources[current]] if current else list(sources.values())
            if not any(re.search(rf"^def {name}\(", text, re.MULTILINE) for text in places):
                missing.append(f"{current or 'tests/'}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
