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


# ---------------------------------------------------------------- an index of a BGE-M3 model: lexical weights
M3_DOCS = ["the cat sat on the mat", "The giant panda is a bear species endemic to China.",
           "pandas eat bamboo in the mountains of China", "hello world, hello again", "机器学习很有趣",
           "emoji 😀 🎉 are fun, naïve café", "BGE rerankers are cross-encoders", "a bear is not a cat",
           "query passage score the the the", "BM25 is a bag-of-words retrieval function"]
M3_QUERIES = ["what is a panda?", "the cat", "retrieval with bag of words"]


@pytest.fixture(scope="module")
def m3_index(tmp_path_factory):
    """A random M3 checkpoint in the official layout (tests/test_m3.py), and an --m3 index of M3_DOCS built by the CLI."""
    from test_m3 import write_m3_folder
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("m3-index")
    (root / "model").mkdir()
    write_m3_folder(root / "model")
    (root / "docs.txt").write_text("\n".join(M3_DOCS) + "\n", encoding="utf-8")
    code, out, err = run_cli("index", "--m3", "-m", root / "model", "--corpus", root / "docs.txt", "--out", root / "ix")
    assert code == 0, err
    assert "lexical weights" in out
    return root, minibge.load_m3(root / "model", device="cpu")


@pytest.mark.parametrize("mode,weights", [("dense", None), ("sparse", None), ("sparse+dense", None),
                                          ("sparse+dense", [0.4, 0.2, 0.4]), ("sparse+dense", [1.0, 0.3])])
def test_m3_index_scores_equal_compute_score(m3_index, mode, weights):
    root, m3 = m3_index
    index = saved_index.open(root / "ix")
    assert index.sparse is not None and index.info["model"]["m3"] is True
    results = index.search(m3, M3_QUERIES, k=len(M3_DOCS), mode=mode, weights=weights)
    flag = minibge.BGEM3FlagModel(str(root / "model"), use_fp16=False, devices="cpu")
    pairs = [(q, d) for q in M3_QUERIES for d in M3_DOCS]
    three = None if weights is None else [*weights, 1.0][:3]  # compute_score takes all three
    expected = np.array(flag.compute_score(pairs, weights_for_different_modes=three)[mode]).reshape(len(M3_QUERIES), -1)
    for i, hits in enumerate(results):
        assert [h.rank for h in hits] == list(range(1, len(M3_DOCS) + 1))
        assert sorted(h.row for h in hits) == list(range(len(M3_DOCS))) and hits[0].text == M3_DOCS[hits[0].row]
        ours = np.array([h.score for h in sorted(hits, key=lambda h: h.row)])
        diff = np.abs(ours - expected[i])
        assert diff.max() <= 1e-5, f"{mode} {weights}, query {i}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:])), "hits are not best first"
    if mode == "sparse":
        assert len({round(h.score, 6) for hits in results for h in hits}) > 3, "lexical scores all alike: a vacuous test"


def test_m3_index_stores_encodes_lexical_weights(m3_index):
    root, m3 = m3_index
    index = saved_index.open(root / "ix")
    expected = m3.encode(M3_DOCS, return_dense=True, return_sparse=True)
    indptr = np.load(root / "ix" / "sparse.indptr.npy")
    indices, values = np.load(root / "ix" / "sparse.indices.npy"), np.load(root / "ix" / "sparse.values.npy")
    for i, weights in enumerate(expected["lexical_weights"]):
        stored = {str(t): float(w) for t, w in zip(indices[indptr[i]:indptr[i + 1]], values[indptr[i]:indptr[i + 1]])}
        assert stored.keys() == weights.keys(), f"document {i}: token ids differ"
        assert max(abs(stored[t] - w) for t, w in weights.items()) <= 1e-7
    diff = np.abs(np.asarray(index.vectors) - expected["dense_vecs"]).max()
    assert diff <= 1e-5, f"dense vectors: max |diff| {diff:.3e}"
    assert index.info["sparse"] == {"vocab_size": m3.model.config.vocab_size, "nnz": len(indices)}


def test_cli_search_modes_on_an_m3_index(m3_index):
    root, m3 = m3_index
    code, out, err = run_cli("search", "--index", root / "ix", "--mode", "sparse+dense", "--weights", "0.4,0.2",
                             "-k", 3, "--format", "jsonl", *M3_QUERIES)
    assert code == 0, err
    cli = [json.loads(line) for line in out.splitlines()]
    api = saved_index.open(root / "ix").search(m3, M3_QUERIES, k=3, mode="sparse+dense", weights=[0.4, 0.2])
    assert [(h["rank"], h["id"]) for h in cli] == [(h.rank, h.id) for hits in api for h in hits]
    assert max(abs(h["score"] - a.score) for h, a in zip(cli, [h for hits in api for h in hits])) <= 1e-6
    for argv, message in [(["--mode", "sparse", "--weights", "1,1"], "add --mode sparse+dense"),
                          (["--mode", "sparse", "--backend", "faiss-flat"], "needs backend 'exact'"),
                          (["--mode", "sparse+dense", "--weights", "1"], "weights must be"),
                          (["--weights", "a,b"], "numbers separated by commas")]:
        code, out, err = run_cli("search", "--index", root / "ix", *argv, "q")
        assert code in (1, 2) and message in err and out == "", err
    code, _, err = run_cli("search", "--corpus", root / "docs.txt", "--mode", "sparse", "q")
    assert code == 2 and "--index only" in err


def test_lexical_modes_are_refused_where_they_cannot_work(m3_index, tmp_path):
    root, m3 = m3_index
    dense_only = saved_index.build(m3.embedder, root / "docs.txt", tmp_path / "dense")  # no m3: dense vectors only
    with pytest.raises(ValueError, match="m3=True needs a BGE-M3 folder"):
        saved_index.build(m3.embedder, root / "docs.txt", tmp_path / "x", m3=True)
    assert dense_only.sparse is None and "m3" not in dense_only.info["model"]
    with pytest.raises(ValueError, match="holds dense vectors only.*minibge index --m3"):
        dense_only.search(m3, ["q"], mode="sparse")
    code, _, err = run_cli("search", "--index", tmp_path / "dense", "--mode", "sparse+dense", "q")
    assert code == 1 and "holds dense vectors only" in err, err
    index = saved_index.open(root / "ix")
    with pytest.raises(ValueError, match="needs the lexical weights of the queries"):
        index.search(m3.embedder, ["q"], mode="sparse")  # a plain Embedder has no sparse head
    assert index.search(m3.embedder, ["q"], k=1)[0][0].id, "dense mode works with the dense Embedder of the same folder"
    with pytest.raises(ValueError, match="mode must be one of"):
        index.search(m3, ["q"], mode="colbert")
    with pytest.raises(ValueError, match="apply to mode 'sparse\\+dense' only"):
        index.search(m3, ["q"], mode="sparse", weights=[1, 1])
    with pytest.raises(ValueError, match="must not be 0"):
        index.search(m3, ["q"], mode="sparse+dense", weights=[0, 0])
    # a changed sparse head changes the stored weights' meaning: the record's sha256 covers it
    import shutil
    shutil.copytree(root / "model", tmp_path / "model")
    head = torch.load(tmp_path / "model" / "sparse_linear.pt", weights_only=True)
    torch.save({k: v + 0.1 for k, v in head.items()}, tmp_path / "model" / "sparse_linear.pt")
    with pytest.raises(ValueError, match="sha256"):
        index.search(minibge.load_m3(tmp_path / "model", device="cpu"), ["q"], mode="sparse")


def _damage(folder, name, array):
    (folder / f"sparse.{name}.npy").unlink()
    np.save(folder / f"sparse.{name}.npy", array, allow_pickle=True)


@pytest.mark.parametrize("damage,message,when", [
    (lambda f, a: _damage(f, "indices", a["indices"].astype(np.int64)), "holds int64", "open"),
    (lambda f, a: _damage(f, "values", np.array([{"x": 1}] * len(a["values"]), dtype=object)), "holds object", "open"),
    (lambda f, a: _damage(f, "values", a["values"][:-1]), "but index.json says", "open"),
    (lambda f, a: (f / "sparse.values.npy").write_bytes((f / "sparse.values.npy").read_bytes()[:-4]), "truncated", "open"),
    (lambda f, a: (f / "sparse.indptr.npy").unlink(), "is missing", "open"),
    (lambda f, a: _damage(f, "indptr", a["indptr"][::-1].copy()), "row pointers must rise", "search"),
    (lambda f, a: _damage(f, "indices", np.full_like(a["indices"], 10**6)), "a token id outside", "search"),
    (lambda f, a: _damage(f, "indices", np.full_like(a["indices"], -3)), "a token id outside", "search"),
    (lambda f, a: _damage(f, "values", np.full_like(a["values"], np.nan)), "finite and ≥ 0", "search"),
    (lambda f, a: _damage(f, "values", -a["values"]), "finite and ≥ 0", "search"),
])
def test_malformed_or_hostile_sparse_files_are_refused(m3_index, tmp_path, damage, message, when):
    import shutil
    root, m3 = m3_index
    folder = tmp_path / "ix"
    shutil.copytree(root / "ix", folder)
    arrays = {name: np.load(folder / f"sparse.{name}.npy") for name in ("indptr", "indices", "values")}
    damage(folder, arrays)
    if when == "open":
        with pytest.raises(ValueError, match=message):
            saved_index.open(folder)
        return
    index = saved_index.open(folder)
    assert index.search(m3, M3_QUERIES[:1], k=2)[0], "dense mode never reads the sparse files"
    with pytest.raises(ValueError, match=message):
        index.search(m3, M3_QUERIES[:1], mode="sparse")
