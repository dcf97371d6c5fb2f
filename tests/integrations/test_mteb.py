"""minibge.integrations.mteb: mteb.evaluate runs on minibge, offline, and scores what `minibge eval` scores.

The tasks are mteb tasks whose data come from ../shared/eval/data instead of the Hub (STS-B's test
split; SciFact's test split). Each main score must equal minibge.evaluate's on the same data to 1e-4;
mteb rounds retrieval metrics to 5 decimals of a fraction (0.001 on the x100 scale), so there the
check is that minibge's score, rounded the same way, is mteb's.
"""
import logging

import numpy as np
import pytest
import torch

import minibge
from conftest import require_module
from minibge.evaluate import evaluate_task, load_beir, load_sts_csv, retrieval

mteb = require_module("mteb")
datasets = require_module("datasets")
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from minibge.integrations import mteb as minibge_mteb  # noqa: E402

COMMON = dict(description="a local copy for minibge's tests", reference="https://example.org",
              dataset={"path": "local/none", "revision": "local"}, category="t2t", eval_splits=["test"],
              eval_langs=["eng-Latn"], date=("2020-01-01", "2020-01-01"), dialect=[], domains=[],
              task_subtypes=[], license="not specified", annotations_creators="human-annotated",
              modalities=["text"], sample_creation="found", bibtex_citation="")


def sts_task(path):
    class LocalSTSBenchmark(AbsTaskSTS):
        metadata = TaskMetadata(type="STS", name="LocalSTSBenchmark", main_score="cosine_spearman", **COMMON)
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs):
            s1, s2, scores = load_sts_csv(path)
            self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
                {"sentence1": s1, "sentence2": s2, "score": scores})})
            self.data_loaded = True

    return LocalSTSBenchmark()


def retrieval_task(corpus, queries, qrels):
    class LocalSciFact(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="LocalSciFact", main_score="ndcg_at_10", **COMMON)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=datasets.Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
                corpus=datasets.Dataset.from_list([{"id": d, "title": doc["title"], "text": doc["text"]}
                                                   for d, doc in corpus.items()]),
                relevant_docs=qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalSciFact()


def main_score(results) -> float:
    [task_result] = results.task_results
    return 100 * task_result.get_score()


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    torch.set_num_threads(1)
    return minibge_mteb.model(minilm_dir)


def test_metadata_and_instruction(encoder, fake_bge):
    meta = encoder.mteb_model_meta
    assert meta.name == "local/all-MiniLM-L6-v2" and meta.embed_dim == 384 and meta.max_tokens == 256
    assert meta.similarity_fn_name == minibge_mteb.ScoringFunction.COSINE and meta.use_instructions is False
    folder = fake_bge()
    (folder / "minibge_source.json").write_text('{"repo_id": "BAAI/bge-small-en-v1.5", "revision": "abc123"}')
    bge = minibge_mteb.model(minibge.load_embedder(folder))
    assert (bge.mteb_model_meta.name, bge.mteb_model_meta.revision) == ("BAAI/bge-small-en-v1.5", "abc123")
    assert bge.instruction("query") == minibge.embedder.INSTRUCTION_EN
    assert bge.instruction("document") == "" and bge.instruction(None) == ""


@pytest.mark.slow  # STS-B test split: ~2,700 sentences
def test_mteb_sts_equals_minibge_eval(encoder, shared_data):
    task = sts_task(shared_data / "stsbenchmark" / "sts-test.csv")
    ours = evaluate_task(encoder.embedder, "stsb", shared_data)["main_score"]
    theirs = main_score(mteb.evaluate(encoder, task, cache=None, show_progress_bar=False))
    assert abs(ours - theirs) < 1e-4, f"mteb {theirs:.6f} vs minibge eval {ours:.6f}"
    assert abs(theirs - 82.03) < 0.01, f"STS-B with mteb: {theirs:.4f}, published 82.03"
    print(f"STS-B cosine Spearman: minibge eval {ours:.6f}, mteb {theirs:.6f}")


def scifact_subset(shared_data, n_queries=None, n_extra_docs=None):
    corpus, queries, qrels = load_beir(shared_data / "scifact", split="test")
    if n_queries is not None:
        keep = sorted(queries)[:n_queries]
        queries = {q: queries[q] for q in keep}
        qrels = {q: qrels[q] for q in keep if q in qrels}
        relevant = {d for rels in qrels.values() for d in rels}
        others = [d for d in corpus if d not in relevant][:n_extra_docs]
        corpus = {d: corpus[d] for d in corpus if d in relevant or d in set(others)}
    return corpus, queries, qrels


@pytest.mark.slow  # 30 queries, 152 abstracts, embedded twice: ~35 s on one core
def test_mteb_retrieval_equals_minibge_on_a_scifact_subset(encoder, shared_data, caplog):
    corpus, queries, qrels = scifact_subset(shared_data, n_queries=30, n_extra_docs=120)
    ours = retrieval(encoder.embedder, corpus, queries, qrels)["ndcg_at_10"]
    with caplog.at_level(logging.INFO, logger="minibge.integrations.mteb"):
        theirs = main_score(mteb.evaluate(encoder, retrieval_task(corpus, queries, qrels), cache=None,
                                          show_progress_bar=False))
    assert abs(round(ours / 100, 5) * 100 - theirs) < 1e-6, f"mteb nDCG@10 {theirs:.6f} vs minibge {ours:.6f}"
    assert any("prompt type query" in r.message or "prompt type PromptType.query" in r.message
               for r in caplog.records), "mteb never asked for queries"


class OnceEmbedder:
    """The embedder, remembering each text's vector: minibge eval and mteb then share one pass over
    SciFact's 5,183 abstracts. Both still call encode / encode_queries / encode_corpus with their own
    texts (the instruction, title + " " + text), so what is compared is everything around the model."""

    def __init__(self, embedder):
        self.embedder, self.vectors = embedder, {}

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def encode(self, texts, **kwargs):
        new = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if new:
            options = {k: v for k, v in kwargs.items() if k in ("batch_size", "normalize_embeddings")}
            self.vectors.update(zip(new, self.embedder.encode(new, **options)))
        return np.stack([self.vectors[t] for t in texts])

    def encode_queries(self, queries, **kwargs):
        return self.encode([(self.embedder.query_instruction or "") + q for q in queries], **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        return self.encode(list(corpus), **kwargs)


@pytest.mark.slow  # all of SciFact: 5,183 abstracts, embedded once (~10 min on one core)
def test_mteb_scifact_equals_minibge_eval(encoder, shared_data):
    once = OnceEmbedder(encoder.embedder)
    corpus, queries, qrels = scifact_subset(shared_data)
    ours = evaluate_task(once, "scifact", shared_data)["main_score"]
    assert abs(ours - 64.508) < 0.1, f"minibge eval SciFact nDCG@10 {ours:.4f}, published 64.508"
    embedded = len(once.vectors)
    theirs = main_score(mteb.evaluate(minibge_mteb.MiniBGEEncoder(once, encoder_folder(encoder)),
                                      retrieval_task(corpus, queries, qrels), cache=None, show_progress_bar=False))
    assert len(once.vectors) == embedded, f"mteb embedded {len(once.vectors) - embedded} texts minibge eval did not"
    assert abs(round(ours / 100, 5) * 100 - theirs) < 1e-6, f"mteb nDCG@10 {theirs:.6f} vs minibge eval {ours:.6f}"
    print(f"SciFact nDCG@10: minibge eval {ours:.6f}, mteb {theirs:.6f}")


def encoder_folder(encoder):
    from pathlib import Path
    return Path(encoder.embedder.name)
