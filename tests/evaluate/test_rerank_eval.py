"""Retrieve, then rerank (issue 20, item 5): evaluate.rerank_results, `minibge eval --rerank` and
`minibge search --rerank`, with a tiny random embedder and a tiny random cross-encoder on a tiny BEIR
folder. The expected orders are rebuilt here pair by pair (one reranker.score call per pair), so the
batching, the length sort and the bookkeeping of the real path are what is checked."""
import json
from pathlib import Path

import pytest
import torch
from rerank_fixtures import WORDS, bert_folder

from minibge import load_embedder, load_reranker
from minibge.cli import main
from minibge.evaluate import rerank_results
from minibge.evaluate.tasks import _trec_order, retrieval_metrics


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(embedder folder, cross-encoder folder): the same tiny BERT, the second with a fresh (seeded) head."""
    root = tmp_path_factory.mktemp("models")
    embedder = bert_folder(root / "embedder")
    torch.manual_seed(3)
    load_reranker(embedder, device="cpu").save_pretrained(root / "reranker")
    return embedder, root / "reranker"


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    """data_dir/scifact: 30 documents, 6 queries, 2 relevant documents each."""
    data = tmp_path_factory.mktemp("data")
    folder = data / "scifact"
    (folder / "qrels").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=gen).tolist())
    docs = [{"_id": f"d{i}", "title": words(2), "text": words(12)} for i in range(30)]
    queries = [{"_id": f"q{i}", "text": words(4)} for i in range(6)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{(5 * i + j) % 30}\t1" for i in range(6) for j in (0, 7)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return data


def one_by_one(reranker, query, docs, corpus):
    """Each (query, document) pair scored alone: the reference order of a shortlist."""
    scores = [reranker.score([(query, (corpus[d]["title"] + " " + corpus[d]["text"]).strip())])[0] for d in docs]
    return [docs[i] for i in sorted(range(len(docs)), key=lambda i: -scores[i])]


def test_rerank_results_reorders_the_shortlist_only(models, beir):
    from minibge.evaluate import load_beir

    corpus, queries, qrels = load_beir(beir / "scifact")
    reranker = load_reranker(models[1], device="cpu")
    gen = torch.Generator().manual_seed(1)
    results = {q: {f"d{i}": float(s) for i, s in enumerate(torch.randn(30, generator=gen).tolist())} for q in queries}
    reranked = rerank_results(reranker, corpus, queries, results, top=10, batch_size=4)
    for q in queries:
        before, after = _trec_order(results[q]), _trec_order(reranked[q])
        assert after[10:] == before[10:], "below the shortlist, the embedder's order stays"
        assert after[:10] == one_by_one(reranker, queries[q], before[:10], corpus)
        assert after[:10] != before[:10]  # a random head does reorder: the check above can fail


def test_eval_with_rerank_matches_the_pair_by_pair_order(models, beir, tmp_path, capsys):
    embedder_dir, reranker_dir = models
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "scifact", "--data-dir", str(beir), "-m", str(embedder_dir), "--device", "cpu",
                 "--rerank", str(reranker_dir), "--rerank-top", "8", "--output", str(out)]) == 0
    result, = json.loads(out.read_text())
    assert result["reranker"] == str(reranker_dir) and result["rerank_top"] == 8
    assert result["rerank_max_length"] == load_reranker(reranker_dir).max_length  # the folder's own by default
    assert main(["eval", "--task", "scifact", "--data-dir", str(beir), "-m", str(embedder_dir), "--device", "cpu",
                 "--output", str(tmp_path / "plain.json")]) == 0
    plain, = json.loads((tmp_path / "plain.json").read_text())
    assert plain["recall_at_5"] != result["recall_at_5"] or plain["ndcg_at_10"] != result["ndcg_at_10"]
    assert plain["recall_at_100"] == result["recall_at_100"], "reranking the top 8 cannot change recall@100"

    # the same numbers from the embedder's top 1000 and the reranker's pair-by-pair order
    from minibge.evaluate import load_beir
    from minibge.evaluate.tasks import _search

    corpus, queries, qrels = load_beir(beir / "scifact")
    embedder, reranker = load_embedder(embedder_dir, device="cpu"), load_reranker(reranker_dir, device="cpu")
    results = _search(embedder, corpus, queries, 1000, 32, 50_000, False)
    expected = {}
    for q in queries:
        order = _trec_order(results[q])
        final = one_by_one(reranker, queries[q], order[:8], corpus) + order[8:]
        expected[q] = {d: float(len(final) - i) for i, d in enumerate(final)}
    reference = retrieval_metrics(qrels, expected, (1, 3, 5, 10, 100, 1000))
    for name in ("ndcg_at_10", "map_at_10", "recall_at_5", "recall_at_100"):
        assert result[name] == pytest.approx(reference[name], abs=1e-9), name


def test_eval_rerank_max_length_reaches_the_reranker(models, beir, tmp_path, monkeypatch):
    import minibge.reranker as reranker_module
    embedder_dir, reranker_dir = models
    seen = []
    real = reranker_module.Reranker.score
    monkeypatch.setattr(reranker_module.Reranker, "score",
                        lambda self, pairs, **kw: seen.append(self.max_length) or real(self, pairs, **kw))
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "scifact", "--data-dir", str(beir), "-m", str(embedder_dir), "--device", "cpu",
                 "--rerank", str(reranker_dir), "--rerank-top", "4", "--rerank-max-length", "12",
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text())[0]["rerank_max_length"] == 12
    assert seen and set(seen) == {12}, seen


def test_eval_rerank_refuses_sts_tasks(models, beir, capsys):
    embedder_dir, reranker_dir = models
    assert main(["eval", "--task", "stsb", "--data-dir", str(beir), "-m", str(embedder_dir),
                 "--rerank", str(reranker_dir)]) == 2
    assert "--rerank applies to retrieval tasks only" in capsys.readouterr().err


def test_search_with_rerank_prints_the_cross_encoders_order(models, beir, tmp_path, capsys):
    embedder_dir, reranker_dir = models
    corpus_lines = [json.loads(line) for line in (beir / "scifact" / "corpus.jsonl").read_text().splitlines()]
    passages = [d["title"] + " " + d["text"] for d in corpus_lines]
    corpus_file = tmp_path / "passages.txt"
    corpus_file.write_text("\n".join(passages) + "\n")
    query = "cat dog river"
    assert main(["search", "-m", str(embedder_dir), "--device", "cpu", "--corpus", str(corpus_file), query,
                 "--top-k", "3", "--rerank-top", "10", "--rerank", str(reranker_dir)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "[line" in line]
    shown = [line.split("] ", 1)[1] for line in printed]

    embedder, reranker = load_embedder(embedder_dir, device="cpu"), load_reranker(reranker_dir, device="cpu")
    q = torch.from_numpy(embedder.encode_queries([query]))
    p = torch.from_numpy(embedder.encode_corpus(passages))
    shortlist = [passages[j] for j in (q @ p.T)[0].topk(10).indices.tolist()]
    scores = [reranker.score([(query, text)])[0] for text in shortlist]
    expected = [shortlist[i] for i in sorted(range(10), key=lambda i: -scores[i])[:3]]
    assert shown == expected
    assert [float(line.split()[1]) for line in printed] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-4)
    assert main(["search", "-m", str(embedder_dir), "--corpus", str(corpus_file), query, "--top-k", "5",
                 "--rerank-top", "3", "--rerank", str(reranker_dir)]) == 2
    assert "--rerank-top 3 is below --top-k 5" in capsys.readouterr().err
