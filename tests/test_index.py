"""The saved index (minibge/index.py, `minibge index`, `minibge search --index`).

- index once, then `search --index` returns exactly `search --corpus`'s top 10, and embeds the queries only;
- faiss-flat returns the exact backend's results; hnsw / ivf run;
- an index is refused to any other model; a jsonl / BEIR corpus keeps its ids and title + text;
- the folder appears whole or not at all;
- searching a 1M x 384 index read from disk keeps peak memory flat (a subprocess, ru_maxrss).
"""
import contextlib
import gzip
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import minibge
import minibge.index as saved_index
from minibge import BertConfig, BertModel, Embedder, Tokenizer
from minibge.cli import main
from minibge.evaluate.data import document_text

QUERIES = ["how do vaccines train the immune system?", "what causes cancer cells to grow?",
           "effect of exercise on the heart", "gene expression in bacteria", "sleep and memory"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """90 SciFact abstracts, one per line, with blank lines between some (their numbers still count)."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = []
    with gzip.open(shared_data / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) == 90:
                break
    lines = []
    for i, doc in enumerate(docs):
        lines.append(" ".join(document_text(doc).split()))
        if i % 17 == 0:
            lines.append("")
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc["_id"], "title": doc["title"], "text": doc["text"]}) + "\n")
    return folder, docs


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    torch.set_num_threads(1)
    return minibge.load_embedder(minilm_dir)


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class CountTexts:
    """Counts the texts every Embedder embeds (iter_batches is where encode's texts go in)."""

    def __init__(self, monkeypatch):
        self.texts = []
        original = Embedder.iter_batches

        def spy(embedder, sentences, *args, **kwargs):
            self.texts += list(sentences)
            return original(embedder, sentences, *args, **kwargs)

        monkeypatch.setattr(Embedder, "iter_batches", spy)


def test_search_index_equals_search_corpus_and_embeds_only_queries(corpus, minilm_dir, tmp_path, monkeypatch):
    folder, _ = corpus
    code, out, err = run_cli("index", "-m", minilm_dir, "--corpus", folder / "corpus.txt", "--out", tmp_path / "ix")
    assert code == 0, err
    spy = CountTexts(monkeypatch)
    code, from_index, err = run_cli("search", "--index", tmp_path / "ix", "-k", 10, "--format", "jsonl", *QUERIES)
    assert code == 0, err
    assert len(spy.texts) == len(QUERIES), f"search --index embedded {len(spy.texts)} texts for {len(QUERIES)} queries"
    code, from_corpus, err = run_cli("search", "-m", minilm_dir, "--corpus", folder / "corpus.txt", "-k", 10,
                                     "--format", "jsonl", *QUERIES)
    assert code == 0, err
    a = [json.loads(line) for line in from_index.splitlines()]
    b = [json.loads(line) for line in from_corpus.splitlines()]
    assert len(a) == len(b) == 10 * len(QUERIES)
    assert [(h["query"], h["rank"], h["id"], h["text"]) for h in a] == \
           [(h["query"], h["rank"], h["id"], h["text"]) for h in b]
    worst = max(abs(x["score"] - y["score"]) for x, y in zip(a, b))
    assert worst < 1e-5, f"scores differ by up to {worst}"
    # the text output names the ids too
    code, text, _ = run_cli("search", "--index", tmp_path / "ix", "-k", 2, QUERIES[0])
    assert code == 0 and text.startswith(f"query: {QUERIES[0]}\n   1  ") and f"[{a[0]['id']}]" in text


def test_faiss_backends(corpus, embedder, tmp_path):
    pytest.importorskip("faiss")
    folder, _ = corpus
    index = saved_index.build(embedder, folder / "corpus.jsonl", tmp_path / "ix", faiss=("hnsw",))
    assert (tmp_path / "ix" / "faiss-hnsw.faiss").is_file()
    exact = index.search(embedder, QUERIES, k=10)
    flat = index.search(embedder, QUERIES, k=10, backend="faiss-flat")
    assert [[h.id for h in hits] for hits in flat] == [[h.id for h in hits] for hits in exact]
    worst = max(abs(x.score - y.score) for xs, ys in zip(flat, exact) for x, y in zip(xs, ys))
    assert worst < 1e-5, f"faiss-flat scores differ from exact by up to {worst}"
    for backend in ("faiss-hnsw", "faiss-ivf"):  # approximate: the best hit at least, on 90 documents
        hits = index.search(embedder, QUERIES, k=10, backend=backend)
        assert [h[0].id for h in hits] == [h[0].id for h in exact], backend


def test_jsonl_and_beir_corpora_keep_ids_and_title_text(corpus, embedder, tmp_path):
    folder, docs = corpus
    beir = tmp_path / "beir"
    beir.mkdir()
    with gzip.open(beir / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in docs[:20]:
            f.write(json.dumps(doc) + "\n")
    index = saved_index.build(embedder, beir, tmp_path / "ix")
    assert len(index) == 20 and index.info["corpus"]["format"] == "jsonl"
    assert index.ids[range(20)] == [doc["_id"] for doc in docs[:20]]
    assert index.texts[[3]] == [document_text(docs[3])]
    expected = embedder.encode_corpus([document_text(d) for d in docs[:20]])
    cos = (np.asarray(index.vectors) * expected).sum(axis=1)
    assert cos.min() > 0.99999, f"stored vectors vs encode_corpus: min cosine {cos.min()}"
    no_texts = saved_index.build(embedder, folder / "corpus.jsonl", tmp_path / "ids-only", store_texts=False)
    assert no_texts.texts is None and no_texts.search(embedder, QUERIES[:1], k=1)[0][0].text is None


def test_bad_corpora_are_refused(embedder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        saved_index.build(embedder, bad, tmp_path / "ix")
    bad.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: bad JSON"):
        saved_index.build(embedder, bad, tmp_path / "ix")
    bad.write_text('{"text": "no id"}\n')
    with pytest.raises(ValueError, match='line 1: expected a JSON object with an "id"'):
        saved_index.build(embedder, bad, tmp_path / "ix")
    assert not (tmp_path / "ix").exists() and not list(tmp_path.glob(".ix.*")), "a failed build left files"


def test_folder_is_written_whole_or_not_at_all(corpus, embedder, tmp_path, monkeypatch):
    folder, _ = corpus
    out = tmp_path / "ix"
    first = saved_index.build(embedder, folder / "corpus.txt", out)
    with pytest.raises(FileExistsError, match="overwrite"):
        saved_index.build(embedder, folder / "corpus.txt", out)
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileExistsError, match="not a minibge index"):
        saved_index.build(embedder, folder / "corpus.txt", tmp_path / "notes", overwrite=True)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Embedder, "iter_batches", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        saved_index.build(embedder, folder / "corpus.txt", out, overwrite=True)
    assert saved_index.open(out).info == first.info, "a failed rebuild damaged the existing index"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "notes"], "a failed build left files behind"


def test_another_models_index_is_refused(corpus, embedder, minilm_dir, tmp_path):
    folder, _ = corpus
    saved_index.build(embedder, folder / "corpus.txt", tmp_path / "ix")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=embedder.model.config.vocab_size, hidden_size=384, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64)
    other = Embedder(BertModel(config).eval(), Tokenizer.from_pretrained(minilm_dir), pooling="mean")
    other.save_pretrained(tmp_path / "other-model")
    code, out, err = run_cli("search", "--index", tmp_path / "ix", "-m", tmp_path / "other-model", "query")
    assert code == 1 and out == ""
    assert "was built with model all-MiniLM-L6-v2" in err and "not other-model" in err, err
    assert len(err.strip().splitlines()) == 2, f"not a one-line error: {err}"  # the 'model ... from' line + the error
    with pytest.raises(ValueError, match="sha256"):
        saved_index.open(tmp_path / "ix").search(minibge.load_embedder(tmp_path / "other-model"), ["q"])


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    import minibge.index as saved_index
    torch.set_num_threads(1)
    peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    index = saved_index.open(sys.argv[1])
    queries = np.random.default_rng(1).standard_normal((8, index.info["dimension"])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # warm torch up on one chunk's worth of random rows (its first matmul and topk allocate workspaces);
    # not a search of the index, which would already have reached the peak this test measures
    (torch.from_numpy(queries) @ torch.randn(saved_index.SEARCH_ROWS, queries.shape[1]).T).topk(10, dim=1)
    before = peak_mb()
    scores, rows = index.search_vectors(queries, k=10)
    hits = index.hits(scores, rows)
    print(json.dumps({"before": before, "after": peak_mb(), "rows": rows.tolist(), "ids": [h.id for h in hits[0]]}))
""")


@pytest.mark.slow  # writes 1.5 GB and reads it back: ~20 s
def test_searching_a_1m_vector_index_keeps_memory_flat(tmp_path):
    n, dim, block = 1_000_000, 384, 50_000
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(0)
    planted = {123_456: 0, 987_654: 3}  # rows that equal query 0 and query 3: they must come first
    queries = np.random.default_rng(1).standard_normal((8, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with open(folder / "vectors.npy", "wb") as f:  # written block by block: never 1.5 GB in this process
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, block):
            rows = rng.standard_normal((block, dim), dtype=np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            for row, query in planted.items():
                if start <= row < start + block:
                    rows[row - start] = queries[query]
            f.write(rows.tobytes())
    ids = "".join(f'"doc{i}"\n' for i in range(n)).encode()
    (folder / "ids.jsonl").write_bytes(ids)
    lengths = np.array([len(f'"doc{i}"\n') for i in range(n)], dtype=np.int64)
    np.save(folder / "ids.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    (folder / "index.json").write_text(json.dumps({
        "format": "minibge-index", "version": 1, "count": n, "dimension": dim, "texts": False,
        "model": {"name": "synthetic"}, "corpus": {}}))

    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"][0][0] == 123_456 and report["rows"][3][0] == 987_654 and report["ids"][0] == "doc123456"
    growth = report["after"] - report["before"]
    size_mb = n * dim * 4 / 2**20
    print(f"searching {size_mb:.0f} MB of vectors: peak RSS {report['before']:.0f} MB -> {report['after']:.0f} MB")
    # one 16,384-row chunk is 24 MB; reading through a memory map instead grows RSS by the whole 1,465 MB
    assert growth < 150, f"peak RSS grew by {growth:.0f} MB searching a {size_mb:.0f} MB index ({report['before']:.0f} MB before)"
