"""`minibge encode` under torchrun (minibge/cli_shard.py): each rank embeds a slice, rank 0 joins them.

The quick tests check the pieces in this process: how texts are cut into slices, how parts are
written and joined, and the command lines refused under torchrun. The slow ones launch two real
CPU processes with torchrun (gloo), as test_finetune's torchrun test does, and compare the output
with one process's row for row: an odd count (unequal slices), a single line (one rank gets
nothing), and a rank that fails (no output, no parts left behind).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minibge.cli import main
from minibge.cli.io import CliError, join_parts, part_paths, write_npy, write_jsonl, write_part
from minibge.cli.shard import slice_bounds

from conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def no_model_env(monkeypatch):
    monkeypatch.delenv("MINIBGE_MODEL", raising=False)


# ---------------------------------------------------------------- slices
@pytest.mark.parametrize("total, world", [(301, 2), (1, 2), (2, 2), (10, 3), (3, 8), (100_000, 7)])
def test_slices_are_contiguous_balanced_and_in_order(total, world):
    bounds = [slice_bounds(total, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:])), bounds
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), sizes


def test_slice_of_a_rank_outside_the_group_is_refused():
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\), got 2"):
        slice_bounds(10, 2, 2)


def test_the_ranks_wait_long_for_slow_work(monkeypatch):
    """Rank 0 may download a model for longer than torch.distributed's 30 minutes while the others wait."""
    import datetime

    import torch.distributed as dist

    from minibge.cli import shard as cli_shard
    created = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: created.update(options, backend=backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    cli_shard.Ranks()
    assert created["timeout"] == cli_shard.SYNC_TIMEOUT >= datetime.timedelta(hours=2), created


# ---------------------------------------------------------------- parts, joined
def fake_embed(chunk):
    """Rows that say which text they belong to: text 'k' -> [k, k + 0.5, -k]."""
    k = np.array([float(text) for text in chunk], dtype=np.float32)
    return np.stack([k, k + 0.5, -k], axis=1)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_joined_parts_are_the_file_one_process_writes(suffix, tmp_path, capsys):
    texts = [str(i) for i in range(7)]
    one = tmp_path / f"one{suffix}"
    if suffix == ".npy":
        write_npy(one, [texts[:4], texts[4:]], fake_embed, len(texts), 3)
    else:
        write_jsonl(one, [texts[:4], texts[4:]], fake_embed, 3)

    output = tmp_path / f"joined{suffix}"
    parts = []
    for rank in range(3):  # 7 texts over 3 ranks: 3, 2, 2
        start, stop = slice_bounds(len(texts), rank, 3)
        part = part_paths(output, 3, run=7)[rank]
        assert write_part(part, output, [texts[start:stop]], fake_embed) == stop - start
        parts.append((part, stop - start))
    join_parts(output, parts, 3)
    assert output.read_bytes() == one.read_bytes()
    expected = (f"wrote 7 x 3 float32 embeddings to {output}" if suffix == ".npy"
                else f"wrote 7 embeddings of dimension 3 to {output}")
    assert capsys.readouterr().out.splitlines()[-1] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.name, output.name] + [p.name for p, _ in parts])


def test_a_part_of_the_wrong_size_writes_nothing(tmp_path):
    output = tmp_path / "out.npy"
    output.write_bytes(b"the previous results")
    part = part_paths(output, 1, run=7)[0]
    write_part(part, output, [["1", "2"]], fake_embed)
    with pytest.raises(CliError, match=r"holds 24 bytes, not 3 rows of 3 float32 \(36 bytes\)"):
        join_parts(output, [(part, 3)], 3)
    assert output.read_bytes() == b"the previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.npy", part.name])


def test_a_failed_part_is_deleted(tmp_path):
    output = tmp_path / "out.npy"
    part = part_paths(output, 2, run=7)[1]

    def failing_embed(chunk):
        if chunk[0] == "bad":
            raise RuntimeError("out of luck")
        return fake_embed(chunk)

    with pytest.raises(RuntimeError, match="out of luck"):
        write_part(part, output, [["1"], ["bad"]], failing_embed)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- command lines refused under torchrun
def test_what_cannot_be_sharded_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the group is never joined here
    missing_model = str(tmp_path / "no-model")
    assert main(["encode", "-m", missing_model, "--input", "-", "--output", str(tmp_path / "v.npy")]) == 2
    assert "under torchrun, --input must be a file" in capsys.readouterr().err
    assert main(["encode", "-m", missing_model, "hello"]) == 2
    assert "under torchrun, give --output FILE.npy or FILE.jsonl" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- two real processes
def torchrun(*args, timeout=300, run_number=None, tmp_path=None, popen=False):
    """`torchrun --standalone --nproc_per_node 2 -m minibge encode ARGS` on the CPU, one thread per rank.

    run_number: the number that names the run's parts, fixed (through a small launcher script in
    tmp_path that sets cli.shard.new_run_number) so a test can plant something where a part goes.
    popen: start it and return the Popen rather than wait."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k != "MINIBGE_MODEL"}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    entry = ["-m", "minibge"]
    if run_number is not None:
        script = tmp_path / "launch_with_run_number.py"
        script.write_text("import sys\nimport minibge.cli.shard as shard\nfrom minibge.cli import main\n"
                          f"shard.new_run_number = lambda: {run_number}\nsys.exit(main())\n")
        entry = [str(script)]
    command = [launcher, "--standalone", "--nproc_per_node", "2", *entry, "encode", *args]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=REPO_ROOT)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)


def sentences(n):
    """n lines, some blank (they are embedded as empty texts, and keep their row)."""
    lines = [f"sentence {i}: {'a cat sleeps on the mat' if i % 3 else 'the stock market fell sharply today'}"
             + " and more words" * (i % 7) for i in range(n)]
    for i in range(5, n, 97):
        lines[i] = ""
    return lines


def read_output(path):
    """(texts or None, (N, D) float32) from a .npy or .jsonl output."""
    if path.suffix == ".npy":
        return None, np.load(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [row["text"] for row in rows], np.array([row["embedding"] for row in rows], dtype=np.float32)


@pytest.mark.slow  # two processes, each importing torch and loading the model: ~5-15 s each run
@pytest.mark.parametrize("lines, suffix, extra", [(301, ".npy", []), (1, ".jsonl", ["--query"])],
                         ids=["301-lines-npy", "1-line-jsonl"])
def test_two_ranks_write_what_one_process_writes(lines, suffix, extra, minilm_dir, tmp_path, capsys):
    texts = sentences(lines)
    source = tmp_path / "texts.txt"
    source.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    one, two = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    assert main(["encode", "-m", str(minilm_dir), "--input", str(source), "--output", str(one), *extra]) == 0
    capsys.readouterr()

    result = torchrun("-m", str(minilm_dir), "--input", str(source), "--output", str(two), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    one_texts, expected = read_output(one)
    two_texts, got = read_output(two)
    assert got.shape == expected.shape == (lines, 384)
    diff = np.abs(got.astype(np.float64) - expected)
    assert diff.max() <= 1e-6, f"max |diff| {diff.max():.3e}, mean |diff| {diff.mean():.3e}"
    if suffix == ".jsonl":
        assert two_texts == one_texts == texts  # input order, text by text
    # Row i is line i+1: each row is closest to its own line's row in the one-process output
    # (the blank lines are all the same empty text, so they are checked as a group).
    nearest = np.argmax(got @ expected.T, axis=1)
    assert all(texts[j] == texts[i] for i, j in enumerate(nearest)), "rows out of input order"

    assert result.stdout.strip().splitlines() == [
        f"wrote {lines} x 384 float32 embeddings to {two}" if suffix == ".npy"
        else f"wrote {lines} embeddings of dimension 384 to {two}"]  # printed once, by rank 0
    assert result.stderr.count("minibge: model all-MiniLM-L6-v2 from") == 1  # announced by rank 0 only
    blank = sum(1 for text in texts if not text)
    assert result.stderr.count("blank line(s) were embedded") == (1 if blank else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, one.name, two.name])  # no parts


@pytest.mark.slow
def test_a_failing_rank_leaves_the_old_output_and_no_parts(minilm_dir, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("".join(text + "\n" for text in sentences(41)), encoding="utf-8")
    out = tmp_path / "out.npy"
    out.write_bytes(b"the previous results")
    # A folder where rank 1's part should go: rank 1 alone fails, after rank 0 began its slice.
    blocker = part_paths(out, 2, run=12345)[1]
    blocker.mkdir()
    result = torchrun("-m", str(minilm_dir), "--input", str(source), "--output", str(out), run_number=12345,
                      tmp_path=tmp_path)
    assert result.returncode != 0
    assert f"minibge: error: {blocker}: Is a directory" in result.stderr
    assert out.read_bytes() == b"the previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, out.name, blocker.name,
                                                                 "launch_with_run_number.py"])
