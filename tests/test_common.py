"""minibge/common.py: the one line reader (text, jsonl, .gz, stdin) and the rank/world helpers."""
import gzip
import io
import sys

import pytest

from minibge import common


def test_lines_keep_their_numbers_and_lose_their_endings(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufefffirst\r\n\n  \nsecond\rstill second\nlast".encode("utf-8"))
    assert list(common.iter_lines(path)) == [(1, "first"), (2, ""), (3, "  "), (4, "second\rstill second"),
                                             (5, "last")]
    assert list(common.iter_lines(path, skip_blank=True)) == [(1, "first"), (4, "second\rstill second"),
                                                              (5, "last")]


def test_gzip_files_read_like_plain_ones(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"text": "a"}\n\n{"text": "b"}\n')
    assert list(common.iter_lines(path, skip_blank=True)) == [(1, '{"text": "a"}'), (3, '{"text": "b"}')]


def test_bad_utf8_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nbad \xff byte\nfine again\n")
    with pytest.raises(common.LineError, match=r"bad\.txt line 2: not valid UTF-8") as caught:
        list(common.iter_lines(path))
    assert isinstance(caught.value, ValueError) and caught.value.number == 2
    with pytest.raises(ValueError, match=r"^short line 2:"):
        list(common.iter_lines(path, name="short"))
    skipped = []
    assert list(common.iter_lines(path, on_error=skipped.append)) == [(1, "fine"), (3, "fine again")]
    assert [e.number for e in skipped] == [2]


def test_dash_reads_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\ny\n"))  # no .buffer: encoded back
    assert list(common.iter_lines("-")) == [(1, "x"), (2, "y")]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xffx\n")))
    with pytest.raises(common.LineError, match="stdin line 1"):
        list(common.iter_lines("-"))


def test_one_process_is_rank_zero_of_one():
    assert common.rank_and_world() == (0, 1)
    assert common.is_main_process()


def test_train_re_exports_the_distributed_helpers():
    from minibge.train import is_main_process, rank_and_world, setup_distributed

    assert (is_main_process, rank_and_world, setup_distributed) == \
        (common.is_main_process, common.rank_and_world, common.setup_distributed)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_refused_only_on_a_cpu_that_emulates_it(native, monkeypatch):
    import torch
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    if native:
        common.require_native_bf16(torch.device("cpu"), "bfloat16")
    else:
        with pytest.raises(ValueError, match="bfloat16 on this CPU would be emulated"):
            common.require_native_bf16(torch.device("cpu"), "bfloat16")
    common.require_native_bf16(torch.device("cuda"), "bfloat16")  # a GPU is not this function's business
