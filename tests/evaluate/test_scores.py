"""Published MTEB scores, reproduced with the real all-MiniLM-L6-v2 on the real evaluation sets.

Published (MTEB results repository, ×100): STSBenchmark 82.03, SICK-R 77.58, SciFact nDCG@10 64.51.
Slow tier: SciFact encodes 5,183 abstracts of up to 256 tokens. How long that takes belongs in
`minibge bench` and docs/evaluation.md, not in an assertion (a busy machine is not a bug).
"""
import pytest

import minibge
from minibge.evaluate import evaluate_task


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return minibge.load_embedder(minilm_dir)


@pytest.mark.slow
@pytest.mark.parametrize("task, published, tolerance", [
    ("stsb", 82.0325, 0.05),   # the text issue asks ±0.05 for STS-B; the evaluation issue ±0.1
    ("sickr", 77.5825, 0.1),   # train + trial + test, 9,927 pairs, as MTEB uses
])
def test_sts_scores(minilm, shared_data, task, published, tolerance):
    result = evaluate_task(minilm, task, shared_data, show_progress_bar=False)
    assert result["reference"]["all-MiniLM-L6-v2"] == pytest.approx(published)
    assert abs(result["main_score"] - published) <= tolerance, \
        f"{task}: measured {result['main_score']:.4f}, published {published} (±{tolerance})"


@pytest.mark.slow
def test_scifact_ndcg(minilm, shared_data):
    result = evaluate_task(minilm, "scifact", shared_data, show_progress_bar=False)
    assert result["n_queries"] == 300 and result["n_docs"] == 5183
    assert abs(result["ndcg_at_10"] - 64.508) <= 0.1, f"nDCG@10 measured {result['ndcg_at_10']:.3f}, published 64.508"
