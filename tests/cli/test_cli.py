"""The `minibge` command line, run in-process through main() (plus real subprocesses where a
signal or a fresh interpreter is the point).

Model-using tests run the real all-MiniLM-L6-v2 (the `minilm_dir` fixture); the error-path
tests need no model at all. The hardening tests check that a mistake is one line on stderr,
found before any work, and leaves nothing on disk that was not there before.
"""
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from minibge.cli import main
from minibge.cli.io import format_matrix
from minibge.evaluate import format_markdown

from conftest import REPO_ROOT
from test_hub import FILES, FakeHub, dead_url

TEXTS = ["A man is eating food.", "Un homme mange du pain — très bon.", "The stock market fell sharply today."]


@pytest.fixture(autouse=True)
def no_model_env(monkeypatch):
    monkeypatch.delenv("MINIBGE_MODEL", raising=False)


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    from minibge import load_embedder

    return load_embedder(minilm_dir, device="cpu")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("minibge: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- help and usage
def test_python_m_minibge_help():
    proc = subprocess.run([sys.executable, "-m", "minibge", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("encode", "similarity", "search", "download", "info", "eval"):
        assert command in proc.stdout


def test_user_error_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minibge", "encode", "-m", str(tmp_path / "missing"), "hello"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "MINIBGE_MODEL"})
    assert proc.returncode == 1
    assert "no such model folder" in one_error_line(proc.stderr)
    assert proc.stdout == ""


@pytest.mark.parametrize("command", ["encode", "similarity", "search", "index", "download", "info", "export", "eval"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minibge {command}")
    assert "examples:" in out and f"minibge {command}" in out.split("examples:")[1]
    if command != "download":
        assert "--model" in out
    # info embeds nothing, so it offers no batching options it would ignore
    assert ("--batch-size" in out and "--max-length" in out) == (command not in ("download", "info", "export"))


def test_bad_command_line_is_one_line_and_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in one_error_line(capsys.readouterr().err)
    assert main(["encode", "--batch-size", "0", "hi"]) == 2
    assert "--batch-size" in one_error_line(capsys.readouterr().err)
    assert main(["encode", "--output", "out.txt", "hi"]) == 2
    assert ".npy or .jsonl" in one_error_line(capsys.readouterr().err)
    assert main([]) == 2  # no command: the overview
    assert "encode" in capsys.readouterr().out


def test_eval_unknown_task(capsys):
    assert main(["eval", "--task", "nonsense"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown task 'nonsense'" in line and "stsb" in line


# ---------------------------------------------------------------- user mistakes at run time
def test_missing_model_path(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "nowhere")]) == 1
    assert "no such model folder" in one_error_line(capsys.readouterr().err)


def test_no_model_anywhere_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIBGE_WEIGHTS_DIR", str(tmp_path))  # an empty weights folder
    assert main(["encode", "hello"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "python weights/fetch_minilm.py" in line and "minibge download BAAI/bge-small-en-v1.5" in line


def test_missing_input_file(tmp_path, capsys):
    assert main(["encode", "--input", str(tmp_path / "missing.txt")]) == 1
    assert "not found" in one_error_line(capsys.readouterr().err)
    assert main(["search", "--corpus", str(tmp_path / "missing.txt"), "query"]) == 1
    assert "not found" in one_error_line(capsys.readouterr().err)


def test_download_with_unreachable_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIBGE_HUB_URL", dead_url())
    assert main(["download", "BAAI/bge-small-en-v1.5", "--dest", str(tmp_path / "bge")]) == 1
    captured = capsys.readouterr()
    assert "could not reach the Hub" in one_error_line(captured.err)
    assert captured.out == ""


# ---------------------------------------------------------------- encode
def test_encode_npy_matches_embedder(minilm_dir, embedder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("minibge.cli.embed.CHUNK_TEXTS", 2)  # 3 texts: two chunks, as a big file would go
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    assert main(["encode", "-m", str(minilm_dir), "--input", str(source), "--output", str(out),
                 "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "all-MiniLM-L6-v2" in captured.err  # says which model it used
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (3, 384)
    np.testing.assert_allclose(array, embedder.encode(TEXTS), atol=1e-6)
    assert not (tmp_path / "vectors.npy.partial").exists()
    # --plain: the plain model instead of the fast path, the same vectors
    plain = tmp_path / "plain.npy"
    fast_calls = []
    monkeypatch.setattr("minibge.fast.encoder.FastEncoder.forward", lambda *a, **k: fast_calls.append(1) or 1 / 0)
    assert main(["encode", "-m", str(minilm_dir), "--input", str(source), "--output", str(plain), "--plain"]) == 0
    assert not fast_calls, "--plain ran the fast path"
    diff = np.abs(np.load(plain) - array)
    assert diff.max() < 1e-6, f"--plain vs fast: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}"


def test_encode_int8_with_a_calibration_file_of_texts(minilm_dir, embedder, tmp_path, monkeypatch, capsys):
    # compile=False keeps this quick; the compiled int8 path is tests/fast's (speed_options' default)
    from minibge.fast import encoder as fast_encoder
    speed_options = fast_encoder.speed_options
    asked = []
    monkeypatch.setattr("minibge.fast.speed_options",
                        lambda e, **kw: asked.append(kw) or speed_options(e, compile=False, **kw))
    source, calibration = tmp_path / "texts.txt", tmp_path / "calibration.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    calibration.write_text("A man is playing a flute.\n\nSome other sentence, longer than the first one.\n", encoding="utf-8")
    out = tmp_path / "int8.npy"
    assert main(["encode", "-m", str(minilm_dir), "--input", str(source), "--output", str(out),
                 "--int8", "--int8-calibration", str(calibration)]) == 0
    assert asked and asked[0]["precision"] == "int8"
    assert asked[0]["calibration"] == ["A man is playing a flute.", "Some other sentence, longer than the first one."]
    got, ref = np.load(out), embedder.encode(TEXTS)
    cos = (got * ref).sum(axis=1)
    assert cos.min() > 0.995 and np.abs(got - ref).max() > 1e-6, f"int8 vs float32: min cosine {cos.min():.6f}"
    capsys.readouterr()
    for argv, message in ((["--int8-calibration", str(calibration)], "--int8-calibration goes with --int8"),
                          (["--int8", "--plain"], "leave out --plain and --dtype"),
                          (["--int8", "--m3", "--output", str(tmp_path / "m3.npy")], "--int8 is for dense embedders")):
        assert main(["encode", "-m", str(minilm_dir), "one text", *argv]) == 2
        assert message in one_error_line(capsys.readouterr().err)


def test_encode_jsonl_query_instruction_and_no_normalize(minilm_dir, embedder, tmp_path, monkeypatch):
    monkeypatch.setattr("minibge.cli.embed.CHUNK_TEXTS", 2)
    out = tmp_path / "vectors.jsonl"
    assert main(["encode", "-m", str(minilm_dir), *TEXTS, "--output", str(out),
                 "--query", "--instruction", "query: ", "--no-normalize"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["text"] for row in rows] == TEXTS
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    expected = embedder.encode_queries(TEXTS, instruction="query: ", normalize_embeddings=False)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_encode_stdin_and_summary(minilm_dir, embedder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS).encode("utf-8"))))
    out = tmp_path / "stdin.npy"
    assert main(["encode", "-m", str(minilm_dir), "--input", "-", "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), embedder.encode(TEXTS), atol=1e-6)

    capsys.readouterr()
    assert main(["encode", "-m", str(minilm_dir), TEXTS[0], TEXTS[2]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 embeddings of dimension 384")
    first = embedder.encode(TEXTS[0])
    assert f"{first[0]:+.4f}" in out


# ---------------------------------------------------------------- similarity, search, info
def test_similarity_matrix(minilm_dir, capsys):
    assert main(["similarity", "-m", str(minilm_dir), *TEXTS]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # header + one row per sentence
    matrix = np.array([[float(x) for x in line.split()[-3:]] for line in lines[1:]])
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-4)
    np.testing.assert_allclose(matrix, matrix.T)
    assert matrix[0, 1] > matrix[0, 2]  # eating food vs eating bread, above eating vs stocks


def test_search_ranks_the_relevant_passage_first(minilm_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Paris is the capital and largest city of France.\n"
                      "Mitochondria produce most of the chemical energy a cell needs.\n\n"
                      "Python is a popular programming language.\n", encoding="utf-8")
    assert main(["search", "-m", str(minilm_dir), "--corpus", str(corpus), "--top-k", "2",
                 "What is the capital of France?", "Which language should I learn to write code?"]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    assert len(blocks) == 2
    first, second = (block.splitlines() for block in blocks)
    assert first[0] == "query: What is the capital of France?" and len(first) == 3
    assert "[line 1] Paris" in first[1]
    assert "[line 4] Python" in second[1]  # line numbers count the blank line
    assert float(first[1].split()[1]) > float(first[2].split()[1])


def test_info(minilm_dir, capsys):
    assert main(["info", "-m", str(minilm_dir)]) == 0
    out = capsys.readouterr().out
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.strip().splitlines())
    assert fields["parameters"].startswith("22,713,216")  # incl. the pooler
    assert fields["hidden size"] == "384" and fields["layers"] == "6"
    assert fields["pooling"] == "mean" and fields["max length"] == "256 tokens"
    assert fields["folder"] == str(minilm_dir.resolve())
    # the kernels encode runs on this machine, each with the timings that chose it (minibge/fast/kernels.py)
    assert fields["encode runs"] == "the fast backend"
    assert fields["fp32 matmuls"].split()[0] in ("onednn", "mkl", "F.linear")
    assert fields["attention route"].split()[0] in ("buckets", "padded", "nested") and " ms" in fields["attention route"]


def test_info_remeasure_forgets_this_machines_kernel_choices(minilm_dir, tmp_path, monkeypatch, capsys):
    from minibge.fast import encoder, kernels, onednn
    monkeypatch.setenv("MINIBGE_CACHE_DIR", str(tmp_path))
    # a choice this machine cached earlier (say, under load), and another machine's
    stale = {kernels.cache_key(384, 1536): {"route": "mkl", "seconds": {"mkl": 1.0, "onednn": 9.0}}}
    other = {"Another CPU | torch 0.0 | 2 threads | H=384 I=1536": {"route": "onednn", "seconds": {"mkl": 2.0, "onednn": 1.0}}}
    (tmp_path / "kernels.json").write_text(json.dumps({**stale, **other}))
    # the measurement itself is faked (its fresh answer is then known, and no clock is read)
    fresh = {"mkl": 2.0, "onednn": 1.0}
    monkeypatch.setattr(kernels, "time_routes", lambda h, i: dict(fresh))
    choosers = (kernels.choose_matmul, encoder.choose_attention, encoder.choose_short_attention)
    for chooser in choosers:  # what a new process starts with
        chooser.cache_clear()
    try:
        assert main(["info", "-m", str(minilm_dir), "--remeasure"]) == 0
    finally:
        for chooser in choosers:
            chooser.cache_clear()
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.strip().splitlines())
    assert fields["kernel cache"].startswith("1 choice(s) of this machine forgotten"), fields["kernel cache"]
    if onednn.available(torch.empty(0)):
        assert "cached" not in fields["fp32 matmuls"], fields["fp32 matmuls"]
        entries = json.loads((tmp_path / "kernels.json").read_text())
        # the stale entry is replaced by the (fake) measurement's answer, not kept
        assert entries[kernels.cache_key(384, 1536)] == {"route": "onednn", "seconds": fresh}
        assert entries.items() >= other.items(), "another machine's choice was dropped"


def test_model_from_environment(minilm_dir, monkeypatch, capsys):
    monkeypatch.setenv("MINIBGE_MODEL", str(minilm_dir))
    assert main(["info"]) == 0
    assert "$MINIBGE_MODEL" in capsys.readouterr().err


# ---------------------------------------------------------------- eval
@pytest.mark.slow  # embeds all of STS-B: about a minute of CPU
def test_eval_stsb_matches_published(minilm_dir, shared_data, tmp_path, capsys):
    results_json, table_md = tmp_path / "results.json", tmp_path / "results.md"
    assert main(["eval", "-m", str(minilm_dir), "--task", "stsb", "--data-dir", str(shared_data),
                 "--batch-size", "64", "--output", str(results_json), "--markdown", str(table_md)]) == 0
    out = capsys.readouterr().out
    results = json.loads(results_json.read_text())
    assert len(results) == 1 and results[0]["task"] == "stsb"
    assert results[0]["main_score"] == pytest.approx(82.0325, abs=0.05)
    row = next(line for line in out.splitlines() if line.startswith("| STSBenchmark"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "82.03" and cells[3] == "82.03"  # measured, published
    assert table_md.read_text().strip() == out.strip()


def test_tables_never_print_negative_zero():
    text = format_matrix(np.array([[1.0, -0.00001], [-0.0, 1.0]]), ["a", "b"])
    assert "-0.0000" not in text and text.count("0.0000") == 2
    row = format_markdown([{"task": "stsb", "main_score": 82.0297, "reference": {"m": 82.0325}}], "m")
    assert row.splitlines()[-1] == "| stsb | main_score | 82.03 | 82.03 | +0.00 |"


# ---------------------------------------------------------------- hardening: ids, paths, outputs, signals
@pytest.mark.parametrize("repo_id", ["org/..", "org/", "../x", "/etc/x", "a/../../x"])
def test_download_refuses_hostile_ids_before_asking_the_hub(repo_id, tmp_path, monkeypatch, capsys):
    mirror = FakeHub()
    mirror.repos[repo_id] = dict(FILES)  # it would serve them, if asked
    try:
        weights = tmp_path / "weights"
        weights.mkdir()
        monkeypatch.setenv("MINIBGE_WEIGHTS_DIR", str(weights))
        monkeypatch.setenv("MINIBGE_HUB_URL", mirror.url)
        assert main(["download", repo_id]) == 2
        assert "is not a Hub model id" in one_error_line(capsys.readouterr().err)
        assert mirror.requests == [] and list(tmp_path.rglob("*")) == [weights]
    finally:
        mirror.server.shutdown()
        mirror.server.server_close()


def test_mistyped_model_path_speaks_of_folder_and_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIBGE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("MINIBGE_HUB_URL", dead_url())
    assert main(["info", "-m", "models/my-model"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"no folder {tmp_path / 'models' / 'my-model'}, and as a Hub id: could not reach the Hub" in line
    assert list(tmp_path.rglob("*")) == []


def test_relative_path_from_elsewhere_says_how_it_was_read(minilm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # weights/all-MiniLM-L6-v2 does not exist here...
    monkeypatch.setenv("MINIBGE_WEIGHTS_DIR", str(minilm_dir.parent))  # ...but a model of that name is cached
    assert main(["info", "-m", "weights/all-MiniLM-L6-v2"]) == 0
    err = capsys.readouterr().err
    assert (f"no folder {tmp_path / 'weights' / 'all-MiniLM-L6-v2'}, so Hub id 'weights/all-MiniLM-L6-v2', "
            f"found in the weights folder {minilm_dir.parent}") in err


@pytest.mark.parametrize("command", [["encode", "hello"], ["eval", "--data-dir", "."]])
def test_output_that_is_a_folder_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "isdir.npy"
    folder.mkdir()
    # a missing model: had the output been checked after loading, the error would be about the model
    assert main([*command, "-m", str(tmp_path / "no-model"), "--output", str(folder)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"--output {folder} is a folder" in line and ".partial" not in line
    assert list(tmp_path.rglob("*")) == [folder]


@pytest.mark.parametrize("command, output", [(["encode", "hello"], "out.npy"),
                                             (["eval", "--data-dir", "."], "results.json")])
def test_read_only_output_folder_is_refused_before_any_work(command, output, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the OS's answer to a normal user be simulated
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr("minibge.cli.io.tempfile.TemporaryFile", refuse)
    try:
        assert main([*command, "-m", str(tmp_path / "no-model"), "--output", str(locked / output)]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"--output: cannot write to folder {locked} (Permission denied)" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_encode_keeps_the_old_output_and_leaves_no_partial(minilm_dir, tmp_path, sig, status):
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"sentence number {i} of a long file\n" for i in range(50_000)))
    out = tmp_path / "out.npy"
    out.write_bytes(b"the previous results")
    def partial():  # the unique temporary name common.atomic_path gives the output while it is written
        return next(tmp_path.glob(".out.npy.*.partial"), None)

    proc = subprocess.Popen([sys.executable, "-m", "minibge", "encode", "-m", str(minilm_dir),
                             "--input", str(source), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            # a child of a shell that ignores SIGINT would inherit that; undo it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while partial() is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert partial() is not None, f"encode ended before it could be interrupted: {proc.poll()}"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == f"minibge: {'terminated' if sig == signal.SIGTERM else 'interrupted'}"
    assert "Traceback" not in stderr and stdout == ""
    assert out.read_bytes() == b"the previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "texts.txt"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_python_api_shows_no_progress_bar_in_logs(embedder, monkeypatch, capsys):
    monkeypatch.setattr("minibge.embedder.PROGRESS_BAR_MIN_TEXTS", 4)  # "a big input", cheaply
    texts = ["a", "b", "c", "d", "e"]
    embedder.encode(texts, batch_size=2)  # stderr is captured here: not a terminal
    assert "Batches" not in capsys.readouterr().err
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    embedder.encode(texts, batch_size=2)  # a person at a terminal sees the bar
    assert "Batches" in terminal.getvalue()
    monkeypatch.undo()
    logger = logging.getLogger("minibge")
    old = logger.level
    logger.setLevel(logging.INFO)  # as sentence-transformers: INFO logging asks for bars, wherever they go
    try:
        embedder.encode(texts[:2], batch_size=2)
    finally:
        logger.setLevel(old)
    assert "Batches" in capsys.readouterr().err
