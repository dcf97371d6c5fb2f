"""Published MTEB scores, reproduced with the real all-MiniLM-L6-v2 on the real evaluation sets.

Published (MTEB results repository, ×100): STSBenchmark 82.03, SICK-R 77.58, SciFact nDCG@10 64.51.
These take ~6 minutes together on 2 CPU cores, almost all of it SciFact's 5,183 documents.
"""
import time

import pytest

import minibge
from minibge.evaluate import evaluate_task

SCIFACT_TIME_LIMIT_S = 7 * 60  # sentence-transformers needs ~5.5 min for the corpus on this 2-core CPU


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return minibge.load_embedder(minilm_dir)


@pytest.mark.parametrize("task, published, tolerance", [
    ("stsb", 82.0325, 0.05),   # the text issue asks ±0.05 for STS-B; the evaluation issue ±0.1
    ("sickr", 77.5825, 0.1),   # train + trial + test, 9,927 pairs, as MTEB uses
])
def test_sts_scores(minilm, shared_data, task, published, tolerance):
    result = evaluate_task(minilm, task, shared_data, show_progress_bar=False)
    assert result["reference"]["all-MiniLM-L6-v2"] == pytest.approx(published)
    assert abs(result["main_score"] - published) <= tolerance, \
        f"{task}: measured {result['main_score']:.4f}, published {published} (±{tolerance})"


def test_scifact_ndcg_and_time(minilm, shared_data):
    start = time.perf_counter()
    result = evaluate_task(minilm, "scifact", shared_data)
    elapsed = time.perf_counter() - start
    assert result["n_queries"] == 300 and result["n_docs"] == 5183
    assert abs(result["ndcg_at_10"] - 64.508) <= 0.1, f"nDCG@10 measured {result['ndcg_at_10']:.3f}, published 64.508"
    assert elapsed < SCIFACT_TIME_LIMIT_S, f"SciFact took {elapsed:.0f} s (limit {SCIFACT_TIME_LIMIT_S} s)"
