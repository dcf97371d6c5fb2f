"""InfoNCE, distillation and cross-device negatives (minibge/losses.py) against independent computations."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minibge.losses import contrastive_loss, distillation_loss, info_nce


def reference_info_nce(q, p, temperature, in_batch_negatives):
    """The loss written as a loop over queries, in float64 numpy: −log of the positive's softmax share."""
    q, p = q.detach().double().numpy(), p.detach().double().numpy()
    B, G = q.shape[0], p.shape[0] // q.shape[0]
    total = 0.0
    for i in range(B):
        candidates = p if in_batch_negatives else p[i * G:(i + 1) * G]
        positive = i * G if in_batch_negatives else 0
        logits = candidates @ q[i] / temperature
        total += -(logits[positive] - (logits.max() + np.log(np.exp(logits - logits.max()).sum())))
    return total / B


def random_pairs(B, G, D, seed, normalize=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, p = torch.randn(B, D, generator=gen, dtype=dtype), torch.randn(B * G, D, generator=gen, dtype=dtype)
    return (F.normalize(q, dim=-1), F.normalize(p, dim=-1)) if normalize else (q, p)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), G=st.sampled_from([1, 2, 8]), D=st.integers(2, 16), seed=st.integers(0, 10_000),
       temperature=st.sampled_from([0.01, 0.02, 0.05, 0.5]), in_batch=st.booleans())
def test_info_nce_matches_a_loop(B, G, D, seed, temperature, in_batch):
    q, p = random_pairs(B, G, D, seed)
    ours = info_nce(q, p, temperature, in_batch_negatives=in_batch).item()
    ref = reference_info_nce(q, p, temperature, in_batch)
    assert math.isclose(ours, ref, rel_tol=1e-5, abs_tol=1e-5), f"ours {ours}, reference {ref}, |diff| {abs(ours - ref):.3e}"


def test_in_batch_negatives_only_add_candidates():
    """With one query, in-batch and group-only losses coincide; with more, in-batch is never smaller."""
    q, p = random_pairs(1, 4, 8, seed=1)
    assert torch.allclose(info_nce(q, p, in_batch_negatives=True), info_nce(q, p, in_batch_negatives=False))
    q, p = random_pairs(5, 4, 8, seed=2)
    assert info_nce(q, p, in_batch_negatives=True) >= info_nce(q, p, in_batch_negatives=False)


def test_perfect_separation_gives_zero_loss():
    eye = torch.eye(4)
    q, p = eye, eye  # G = 1: each query's positive is itself, every other passage is orthogonal
    assert info_nce(q, p, temperature=0.01).item() < 1e-30


@pytest.mark.parametrize("in_batch", [True, False])
def test_gradient_matches_finite_differences(in_batch):
    q, p = random_pairs(3, 2, 5, seed=3, normalize=False, dtype=torch.float64)
    q.requires_grad_(True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, p: info_nce(q, p, 0.7, in_batch), (q, p), eps=1e-6, atol=1e-6)
    teacher = torch.randn(3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, p: distillation_loss(q, p, teacher, 0.7), (q, p), eps=1e-6, atol=1e-6)


def test_distillation_is_soft_cross_entropy_over_the_group():
    q, p = random_pairs(3, 4, 6, seed=4)
    teacher = torch.randn(3, 4)
    scores = torch.stack([p[i * 4:(i + 1) * 4] @ q[i] for i in range(3)]) / 0.05  # (B, G)
    expected = -(teacher.softmax(-1) * scores.log_softmax(-1)).sum(-1).mean()
    ours = distillation_loss(q, p, teacher, 0.05)
    assert torch.allclose(ours, expected, atol=1e-6), f"|diff| {(ours - expected).abs().item():.3e}"
    # a teacher that agrees with a one-hot positive gives the group-only InfoNCE
    one_hot = torch.tensor([[1e4, 0, 0, 0]]).repeat(3, 1)
    assert torch.allclose(distillation_loss(q, p, one_hot, 0.05), info_nce(q, p, 0.05, in_batch_negatives=False))
    losses = contrastive_loss(q, p, 0.05, teacher_scores=teacher)
    assert torch.allclose(losses["loss"], losses["info_nce"] + losses["distill"])
    assert set(contrastive_loss(q, p, 0.05)) == {"loss", "info_nce"}


@pytest.mark.parametrize("q_shape, p_shape, message", [
    ((4,), (8, 4), "q must be"),
    ((2, 4), (5, 4), "not a multiple"),
    ((2, 4), (4, 3), "same dimension"),
    ((0, 4), (0, 4), "B ≥ 1"),
])
def test_malformed_shapes_are_value_errors(q_shape, p_shape, message):
    with pytest.raises(ValueError, match=message):
        info_nce(torch.randn(q_shape), torch.randn(p_shape))


def test_temperature_guard_on_normalised_embeddings():
    q, p = random_pairs(2, 2, 4, seed=5)
    with pytest.raises(ValueError, match="too high for normalised"):
        info_nce(q, p, temperature=0.6)
    with pytest.raises(ValueError, match="positive"):
        info_nce(q, p, temperature=0.0)
    info_nce(q * 3, p * 3, temperature=1.0)  # raw inner products may use any temperature
    with pytest.raises(ValueError, match=r"teacher_scores must be \(B, G\)"):
        distillation_loss(q, p, torch.randn(2, 3))


# -----------------------------------------------------------------------------
# Cross-device negatives: 2 gloo processes vs one process on the concatenated batch

B, G, D_IN, D = 3, 4, 6, 5


def _encoder_and_inputs():
    """A tiny linear 'encoder' (whose gradient we compare) and inputs for 2 ranks × B queries."""
    gen = torch.Generator().manual_seed(0)
    x_q = torch.randn(2 * B, D_IN, generator=gen, dtype=torch.float64)
    x_p = torch.randn(2 * B * G, D_IN, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2 * B, G, generator=gen, dtype=torch.float64)
    encoder = torch.nn.Linear(D_IN, D, bias=False, dtype=torch.float64)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(D, D_IN, generator=gen, dtype=torch.float64))
    return encoder, x_q, x_p, teacher


def _step(encoder, x_q, x_p, teacher, cross_device):
    q, p = F.normalize(encoder(x_q), dim=-1), F.normalize(encoder(x_p), dim=-1)
    losses = contrastive_loss(q, p, 0.05, cross_device=cross_device, teacher_scores=teacher)
    losses["loss"].backward()
    return losses["info_nce"].item()


def _rank_main(rank, init_file, results):
    import torch.distributed as dist

    from minibge.train import average_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    encoder, x_q, x_p, teacher = _encoder_and_inputs()
    mine = slice(rank * B, (rank + 1) * B)
    loss = _step(encoder, x_q[mine], x_p[rank * B * G:(rank + 1) * B * G], teacher[mine], cross_device=True)
    average_gradients(encoder)  # what train.py does after every backward: the mean over ranks
    torch.save({"loss": loss, "grad": encoder.weight.grad}, results / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Same loss on every rank as one process on the concatenated batch, and the same averaged
    gradient (the world-size factor in losses.gather_across_ranks is what makes this hold)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    encoder, x_q, x_p, teacher = _encoder_and_inputs()
    single_loss = _step(encoder, x_q, x_p, teacher, cross_device=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(got["loss"] - single_loss) < 1e-6, f"rank {rank}: loss {got['loss']} vs one process {single_loss}"
        diff = (got["grad"] - encoder.weight.grad).abs()
        assert diff.max() < 1e-6, f"rank {rank}: averaged gradient max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
