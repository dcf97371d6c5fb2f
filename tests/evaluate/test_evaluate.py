"""Tests for minibge.evaluate and minibge.eval_data, with fake embedders (no real model).

Metric values are worked out by hand in the comments; where pytrec_eval, scipy or
scikit-learn are importable they are used as independent references (skipped otherwise).
"""
import gzip
import json
import logging
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import require_module

from minibge.evaluate.data import load_beir, load_pairs_table, load_sick, load_sts_csv
from minibge.evaluate.tasks import (classification, evaluate_task, format_markdown, per_query_metrics, rank_average,
                              retrieval, retrieval_metrics, spearman, sts)
from minibge.evaluate.search import top_k


# ---------------------------------------------------------------- fake embedders
class HashEmbedder:
    """Bag of words: each lower-cased word gets a fixed pseudo-random vector; a text is their sum."""

    def __init__(self, dim=64, query_prefix=""):
        self.dim, self.query_prefix, self.cache, self.calls = dim, query_prefix, {}, []

    def _word(self, w):
        if w not in self.cache:
            self.cache[w] = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(self.dim)
        return self.cache[w]

    def encode(self, texts, batch_size=32, normalize_embeddings=True, convert_to_tensor=False,
               show_progress_bar=None):
        self.calls.append(("encode", list(texts), show_progress_bar))
        out = np.stack([sum((self._word(w) for w in t.lower().split()), np.full(self.dim, 1e-3))
                        for t in texts]).astype(np.float32)
        if normalize_embeddings:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return torch.from_numpy(out) if convert_to_tensor else out

    def encode_queries(self, queries, **kw):
        return self.encode([self.query_prefix + q for q in queries], **kw)

    def encode_corpus(self, passages, **kw):
        return self.encode(passages, **kw)


class LookupEmbedder(HashEmbedder):
    """Returns the vector stored for each text in a table (KeyError for anything else)."""

    def __init__(self, table, query_prefix=""):
        super().__init__(query_prefix=query_prefix)
        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in table.items()}

    def encode(self, texts, batch_size=32, normalize_embeddings=True, convert_to_tensor=False,
               show_progress_bar=None):
        self.calls.append(("encode", list(texts), show_progress_bar))
        out = np.stack([self.table[t] for t in texts])
        if normalize_embeddings:
            out = out / np.linalg.norm(out, axis=1, keepdims=True)
        return out


# ---------------------------------------------------------------- retrieval metrics by hand
QRELS = {
    "q1": {"a": 2, "c": 1, "e": 1, "x": 0},  # "e" is never retrieved; "x" is judged non-relevant
    "q2": {"a": 0, "b": -1},                 # no relevant document: not scored
    "q3": {"d": 1},
}
RESULTS = {
    "q1": {"a": 0.5, "b": 0.5, "c": 0.9, "d": 0.1},  # trec order: c, then the tie b before a, then d
    "q2": {"a": 0.9},
    "q3": {"a": 0.3, "b": 0.3, "d": 0.3},            # all tied: d, b, a (id descending) -> d first
}


def test_retrieval_metrics_by_hand():
    m = per_query_metrics(QRELS, RESULTS, k_values=(1, 3, 5))
    assert set(m) == {"q1", "q3"}  # q2 excluded
    q1 = m["q1"]
    # ranking gains c=1, b=0, a=2, d=0; ideal gains 2, 1, 1
    idcg3 = 2 + 1 / math.log2(3) + 1 / math.log2(4)          # = 3.1309297...
    assert q1["ndcg_at_1"] == pytest.approx(1 / 2)            # DCG 1/log2(2)=1, IDCG 2
    assert q1["ndcg_at_3"] == pytest.approx((1 + 2 / 2) / idcg3)  # DCG = 1 + 0 + 2/log2(4) = 2
    assert q1["ndcg_at_5"] == pytest.approx(2 / idcg3)        # d adds nothing, only 3 relevant
    assert q1["map_at_1"] == pytest.approx(1 / 3)             # P@1 = 1, divided by |R| = 3
    assert q1["map_at_3"] == pytest.approx((1 + 2 / 3) / 3)   # hits at ranks 1 and 3 -> 5/9
    assert q1["recall_at_3"] == pytest.approx(2 / 3)          # e is relevant but never retrieved
    assert q1["precision_at_3"] == pytest.approx(2 / 3)
    assert q1["precision_at_5"] == pytest.approx(2 / 5)       # P@k always divides by k
    assert q1["mrr_at_1"] == 1.0
    q3 = m["q3"]
    # with ascending ids d would be 3rd (MRR 1/3); trec_eval puts it first
    assert q3["mrr_at_1"] == 1.0 and q3["ndcg_at_1"] == 1.0 and q3["precision_at_3"] == pytest.approx(1 / 3)

    avg = retrieval_metrics(QRELS, RESULTS, k_values=(1, 3, 5))
    assert avg["n_queries"] == 2
    assert avg["ndcg_at_1"] == pytest.approx(100 * (0.5 + 1) / 2)           # 75
    assert avg["ndcg_at_3"] == pytest.approx(100 * (2 / idcg3 + 1) / 2)     # 81.94
    assert avg["map_at_3"] == pytest.approx(100 * (5 / 9 + 1) / 2)          # 77.78
    assert avg["recall_at_3"] == pytest.approx(100 * (2 / 3 + 1) / 2)       # 83.33
    assert avg["precision_at_3"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)  # 50


def test_mrr_outside_cutoff_and_ties_broken_by_id_descending():
    qrels = {"q": {"z": 1}}
    assert per_query_metrics(qrels, {"q": {"y": 0.9, "z": 0.8}}, (1, 2))["q"]["mrr_at_1"] == 0.0
    assert per_query_metrics(qrels, {"q": {"y": 0.9, "z": 0.8}}, (1, 2))["q"]["mrr_at_2"] == 0.5
    # tie: "z" > "y" as strings, so z comes first
    assert per_query_metrics(qrels, {"q": {"y": 0.5, "z": 0.5}}, (1,))["q"]["mrr_at_1"] == 1.0
    assert per_query_metrics({"q": {"y": 1}}, {"q": {"y": 0.5, "z": 0.5}}, (1,))["q"]["mrr_at_1"] == 0.0


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match="relevant"):
        retrieval_metrics({"q": {"a": 0}}, {"q": {"a": 1.0}}, (1,))
    with pytest.raises(ValueError, match="k_values"):
        per_query_metrics(QRELS, RESULTS, (0, 1))


pytrec_eval = None
try:
    import pytrec_eval  # noqa: F811  (test-only reference)
except ImportError:
    pass

if pytrec_eval is not None:
    from hypothesis import given, settings, strategies as st

    DOCS = [f"d{i}" for i in range(12)]

    @settings(max_examples=150, deadline=None)
    @given(st.dictionaries(st.sampled_from(["q1", "q2", "q3"]),
                           st.dictionaries(st.sampled_from(DOCS), st.integers(0, 3), max_size=8), min_size=1),
           st.dictionaries(st.sampled_from(["q1", "q2", "q3"]),
                           st.dictionaries(st.sampled_from(DOCS), st.sampled_from([0.1, 0.25, 0.5, 0.9]),
                                           min_size=1, max_size=12), min_size=1))
    def test_against_pytrec_eval(qrels, results):
        ks = (1, 3, 5, 10)
        cuts = ",".join(map(str, ks))
        ref = pytrec_eval.RelevanceEvaluator(
            qrels, {f"ndcg_cut.{cuts}", f"map_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}", "recip_rank"}
        ).evaluate(results)
        ours = per_query_metrics(qrels, results, ks)
        assert set(ours) == {q for q in ref if any(r > 0 for r in qrels[q].values())}
        for q, m in ours.items():
            rr = ref[q]["recip_rank"]
            for k in ks:
                assert m[f"ndcg_at_{k}"] == pytest.approx(ref[q][f"ndcg_cut_{k}"], abs=1e-9)
                assert m[f"map_at_{k}"] == pytest.approx(ref[q][f"map_cut_{k}"], abs=1e-9)
                assert m[f"recall_at_{k}"] == pytest.approx(ref[q][f"recall_{k}"], abs=1e-9)
                assert m[f"precision_at_{k}"] == pytest.approx(ref[q][f"P_{k}"], abs=1e-9)
                assert m[f"mrr_at_{k}"] == pytest.approx(rr if rr and 1 / rr <= k + 1e-9 else 0.0, abs=1e-9)
else:
    def test_against_pytrec_eval():
        pytest.skip("pytrec_eval not installed (pip install pytrec-eval-terrier)")


# ---------------------------------------------------------------- retrieval end to end
CORPUS = {
    "d1": {"title": "T1", "text": "one"},
    "d2": {"title": "", "text": "two"},
    "d3": {"title": "T3", "text": "three"},
    "d4": {"title": "T4", "text": "four"},
    "q9": {"title": "", "text": "self"},  # same id as a query: must never be returned for it
}
VECTORS = {"T1 one": [1, 0], "two": [0.8, 0.6], "T3 three": [0.6, 0.8], "T4 four": [0, 1], "self": [1, 0.01],
           "Q: alpha": [1, 0], "Q: beta": [0, 1], "Q: gamma": [1, 0.01]}


def test_retrieval_end_to_end():
    emb = LookupEmbedder(VECTORS, query_prefix="Q: ")
    queries = {"qa": "alpha", "qb": "beta", "q9": "gamma"}
    qrels = {"qa": {"d2": 1}, "qb": {"d4": 2, "d3": 1}, "q9": {"q9": 1, "d1": 1}}
    full = retrieval(emb, CORPUS, queries, qrels, k_values=(1, 3), show_progress_bar=False)
    # qa: d1 (1.0), q9, d2 (0.8) -> first relevant at rank 3
    # qb: d4, d3 -> perfect; q9: its own document is dropped, d1 first -> rank 1, recall 1/2
    assert full["n_queries"] == 3 and full["n_docs"] == 5
    assert full["mrr_at_3"] == pytest.approx(100 * (1 / 3 + 1 + 1) / 3)
    assert full["recall_at_100"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert {"ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100"} <= set(full)
    # queries went through encode_queries (with the instruction), documents did not
    assert ["Q: alpha", "Q: beta", "Q: gamma"] in [c[1] for c in emb.calls]
    assert all(not t.startswith("Q: ") for c in emb.calls[1:] for t in c[1])
    assert all(c[2] is False for c in emb.calls)  # show_progress_bar passed through
    chunked = retrieval(LookupEmbedder(VECTORS, "Q: "), CORPUS, queries, qrels, k_values=(1, 3), chunk_size=2)
    assert chunked == pytest.approx(full)


def test_top_k_over_chunks_equals_one_topk():
    torch.manual_seed(0)
    q, d = torch.randn(4, 8), torch.randn(23, 8)
    full_scores, full_index = (q @ d.T).topk(5, dim=1)
    scores, index = top_k(q, d.split(7), 5)  # chunks of 7, 7, 7, 2
    assert torch.equal(index, full_index)
    torch.testing.assert_close(scores, full_scores)
    # k above the corpus size gives every document; an excluded pair scores -inf and comes last
    best = int(full_index[0, 0])
    scores, index = top_k(q, d.split(7), 100, exclude=[(0, best)])
    assert scores.shape == index.shape == (4, 23)
    assert int(index[0, -1]) == best and scores[0, -1] == float("-inf") and int(index[1, 0]) == int(full_index[1, 0])


def test_retrieval_unknown_ids_and_errors(caplog):
    emb = LookupEmbedder(VECTORS, query_prefix="Q: ")
    qrels = {"qa": {"d1": 1, "ghost": 1}, "qz": {"d1": 1}}
    with caplog.at_level(logging.WARNING):
        r = retrieval(emb, CORPUS, {"qa": "alpha"}, qrels, k_values=(1,))
    assert r["unknown_qrels_docs"] == 1 and r["unknown_qrels_queries"] == 1
    assert "ghost" in caplog.text and "qz" in caplog.text
    assert r["recall_at_100"] == pytest.approx(50.0)  # the unknown document still counts as relevant
    with pytest.raises(ValueError, match="empty"):
        retrieval(emb, CORPUS, {}, qrels)
    with pytest.raises(ValueError, match="relevant"):
        retrieval(emb, CORPUS, {"qa": "alpha"}, {"qa": {"d1": 0}})


# ---------------------------------------------------------------- STS
def test_spearman_with_ties_by_hand():
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    assert rank_average(x).tolist() == [1, 2.5, 2.5, 4]
    # rank deviations dx = (-1.5, 0, 0, 1.5), dy = (-1.5, .5, -.5, 1.5):
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(22.5)
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(22.5))


def test_spearman_against_scipy():
    stats = require_module("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 300), rng.integers(0, 4, 300) + 0.5 * rng.integers(0, 6, 300)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_sts_with_fake_embedder():
    s1 = ["a cat sits", "a dog runs", "a cat sits", "the sky"]
    s2 = ["a cat sat", "dogs run fast", "the sky", "blue sky"]
    gold = [4.5, 3.0, 0.5, 2.0]
    emb = HashEmbedder()
    r = sts(emb, s1, s2, gold, show_progress_bar=True)
    assert r["n_pairs"] == 4
    # one call, each distinct sentence once ("a cat sits" and "the sky" repeat): 6 texts, not 8
    assert len(emb.calls) == 1 and len(emb.calls[0][1]) == 6 and emb.calls[0][2] is True
    e = HashEmbedder().encode(s1 + s2)
    cos = (e[:4] * e[4:]).sum(1) / np.linalg.norm(e[:4], axis=1) / np.linalg.norm(e[4:], axis=1)
    assert r["cosine_spearman"] == pytest.approx(100 * spearman(cos, gold), abs=1e-4)
    assert r["cosine_pearson"] == pytest.approx(100 * np.corrcoef(cos, gold)[0, 1], abs=1e-4)
    with pytest.raises(ValueError, match="lengths"):
        sts(emb, s1, s2[:3], gold)
    with pytest.raises(TypeError):
        sts(emb, "a cat", "a dog", [1.0])
    with pytest.raises(TypeError, match=r"sentences2: texts\[1\] is int, expected str"):
        sts(emb, ["a cat", "a dog"], ["the sky", 3], [1.0, 2.0])


# ---------------------------------------------------------------- classification
def _blobs(seed, n_classes=5, dim=16, n_train=300, n_test=300, spread=1.6):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim))
    table, data = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, n_classes, n)
        texts = [f"{split}{i}" for i in range(n)]
        for t, lab in zip(texts, labels):
            table[t] = centers[lab] + spread * rng.standard_normal(dim) / math.sqrt(dim) * 2
        data[split] = (texts, [f"label{lab}" for lab in labels])
    return LookupEmbedder(table), data


def test_classification_separable():
    emb, data = _blobs(0, spread=0.05)
    r = classification(emb, *data["train"], *data["test"], n_experiments=3)
    assert r["accuracy"] == pytest.approx(100.0) and r["f1"] == pytest.approx(100.0)
    assert r["accuracy_std"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="two labels"):
        classification(emb, ["train0"], ["x"], ["test0"], ["x"])


@pytest.mark.parametrize("n_classes", [2, 5])
def test_classification_matches_sklearn(n_classes):
    linear = require_module("sklearn.linear_model")
    metrics = require_module("sklearn.metrics")
    emb, data = _blobs(1, n_classes=n_classes, spread=3.5)  # hard enough: 65-90% accuracy
    ours = classification(emb, *data["train"], *data["test"])
    # The same protocol with sklearn doing the fit.
    (tr_t, tr_y), (te_t, te_y) = data["train"], data["test"]
    x_tr, x_te = emb.encode(tr_t), emb.encode(te_t)
    rng, idxs, acc, f1 = np.random.RandomState(42), np.arange(len(tr_t)), [], []
    for _ in range(10):
        rng.shuffle(idxs)
        count, chosen = {}, []
        for i in idxs:
            if count.get(tr_y[i], 0) < 8:
                count[tr_y[i]] = count.get(tr_y[i], 0) + 1
                chosen.append(i)
        clf = linear.LogisticRegression(max_iter=100).fit(x_tr[chosen], [tr_y[i] for i in chosen])
        pred = clf.predict(x_te)
        acc.append(metrics.accuracy_score(te_y, pred))
        f1.append(metrics.f1_score(te_y, pred, average="macro"))
    assert ours["accuracy"] == pytest.approx(100 * np.mean(acc), abs=1.0)
    assert ours["f1"] == pytest.approx(100 * np.mean(f1), abs=1.0)


# ---------------------------------------------------------------- loaders: real files
def test_load_real_files(shared_data):
    s1, s2, scores = load_sts_csv(shared_data / "stsbenchmark" / "sts-test.csv")
    assert len(s1) == len(s2) == len(scores) == 1379
    assert (sum(map(len, s1)), sum(map(len, s2))) == (74107, 73779)  # MTEB's descriptive stats
    sick = [shared_data / "sick2014" / f for f in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt")]
    s1, s2, scores = load_sick(sick)
    assert len(scores) == 9927 and min(scores) >= 1 and max(scores) <= 5
    assert (sum(map(len, s1)), sum(map(len, s2))) == (462620, 452997)
    assert len(load_sick(sick[2])[0]) == 4927  # the CRLF file alone
    corpus, queries, qrels = load_beir(shared_data / "scifact", split="test")
    assert (len(corpus), len(queries), sum(map(len, qrels.values()))) == (5183, 300, 339)


def test_evaluate_task_and_markdown(shared_data):
    emb = HashEmbedder(dim=32)
    r = evaluate_task(emb, "stsb", shared_data)
    assert r["task"] == "stsb" and r["n_pairs"] == 1379 and r["main_score"] == r["cosine_spearman"]
    assert r["reference"]["bge-small-en-v1.5"] == pytest.approx(85.863)
    r2 = evaluate_task(emb, "scifact", shared_data, batch_size=256)
    assert r2["n_queries"] == 300 and r2["n_docs"] == 5183 and r2["main_score"] == r2["ndcg_at_10"]
    assert 0 < r2["ndcg_at_10"] < 100  # bag of random word vectors still matches some words
    table = format_markdown([r, r2], "BAAI/bge-small-en-v1.5")
    assert "| STSBenchmark | cosine_spearman |" in table and "85.86" in table and "71.27" in table
    assert "–" in format_markdown([r], None)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_task(emb, "mnist", shared_data)


# ---------------------------------------------------------------- loaders: malformed files
def _write(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def test_sts_csv_quotes_crlf_and_errors(tmp_path):
    ok = _write(tmp_path / "ok.csv", 'g\tf\t2012\t1\t2.5\tHe said "hi.\tShe said hi.\r\n'
                                     'g\tf\t2012\t2\t4\ta\tb\textra\tcols\n\n')
    assert load_sts_csv(ok) == (['He said "hi.', "a"], ["She said hi.", "b"], [2.5, 4.0])
    bad = _write(tmp_path / "sts-test.csv", "g\tf\t2012\t1\t2.5\ta\tb\n" * 16 + "g\tf\t2012\t1\t2.5\n")
    with pytest.raises(ValueError, match=r"sts-test.csv line 17: expected at least 7 tab-separated columns, got 5"):
        load_sts_csv(bad)
    with pytest.raises(ValueError, match=r"x.csv line 1: score 'five' is not a number"):
        load_sts_csv(_write(tmp_path / "x.csv", "g\tf\t2012\t1\tfive\ta\tb\n"))


def test_sick_and_pairs_table(tmp_path):
    sick = _write(tmp_path / "SICK.txt", "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\r\n"
                                         "1\tA \"man\tA woman\t3.5\tNEUTRAL\r\n")
    assert load_sick(sick) == (['A "man'], ["A woman"], [3.5])
    with pytest.raises(ValueError, match=r"bad.txt line 3: expected at least 4 columns, got 2"):
        load_sick(_write(tmp_path / "bad.txt", "pair_ID\tsentence_A\tsentence_B\trelatedness_score\n"
                                               "1\ta\tb\t1\n2\tc\n"))
    with pytest.raises(ValueError, match="missing column"):
        load_sick(_write(tmp_path / "nohdr.txt", "1\ta\tb\t1\n"))
    csv_file = _write(tmp_path / "p.csv", 's1,s2,score\n"a, b",c,1.5\nd,"e ""q""",2\n')
    assert load_pairs_table(csv_file, "s1", "s2", "score") == (["a, b", "d"], ["c", 'e "q"'], [1.5, 2.0])
    tsv_file = _write(tmp_path / "p.tsv", 'score\ts1\ts2\n1\t"a\tb\n')
    assert load_pairs_table(tsv_file, "s1", "s2", "score") == (['"a'], ["b"], [1.0])


def test_beir_loader(tmp_path):
    folder = tmp_path / "beir"
    docs = [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}]
    folder.mkdir()
    with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs) + "\n")
    _write(folder / "queries.jsonl", '{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    _write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    corpus, queries, qrels = load_beir(folder)
    assert corpus == {"d1": {"title": "T", "text": "one"}, "d2": {"title": "", "text": "two"}}
    assert queries == {"q1": "first"} and qrels == {"q1": {"d2": 1}}  # q2 is not in the test qrels
    _write(folder / "corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": \n')
    with pytest.raises(ValueError, match=r"corpus.jsonl line 2: bad JSON"):
        load_beir(folder)
    _write(folder / "corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"id": "d2"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl line 2: expected a JSON object with an '_id'"):
        load_beir(folder)
    _write(folder / "corpus.jsonl", '{"_id": "d1", "text": "x"}\n')
    _write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td2\n")
    with pytest.raises(ValueError, match=r"test.tsv line 2: expected 3 tab-separated columns"):
        load_beir(folder)
