"""Eq. 3, Eq. 4, the dW norm and the nearest-token search against plain float64 computations."""

import math

import pytest
import torch

from datencoder_core import LoRAFactors, embedding_l2_loss, nearest_neighbor_contrastive_loss, nearest_tokens


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _eq3_float64(v_all, vocab, k, tau, exclude=(), similarity=_cos):
    """Eq. 3 written out term by term in float64, neighbours found by a Python sort (by cosine) among the rows
    of ``vocab`` not in ``exclude``, negatives = all other rows of ``v_all``; averaged over all rows."""
    v_all, vocab = v_all.double(), vocab.double()
    candidates = [t for j, t in enumerate(vocab) if j not in exclude]
    losses = []
    for i in range(len(v_all)):
        v = v_all[i]
        nearest = sorted(candidates, key=lambda t: _cos(v, t), reverse=True)[:k]
        pos = sum(math.exp(similarity(v, t) / tau) for t in nearest)
        neg = sum(math.exp(similarity(v, w) / tau) for j, w in enumerate(v_all) if j != i)
        losses.append(-math.log(pos / (pos + neg)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("k,tau", [(1, 0.07), (5, 0.2), (3, 1.0)])
def test_contrastive_loss_matches_eq3(k, tau):
    g = torch.Generator().manual_seed(k)
    v_star, vocab = torch.randn(6, 16, generator=g), torch.randn(50, 16, generator=g)
    loss = nearest_neighbor_contrastive_loss(v_star, vocab, k=k, temperature=tau, exclude=())
    assert loss.item() == pytest.approx(_eq3_float64(v_star, vocab, k, tau), rel=1e-5)


def test_contrastive_loss_with_the_papers_dot_product():
    """``similarity="dot"``: Eq. 3 as the paper writes it, e^{v* . T / tau}; its logits, unlike the cosine's,
    depend on the norms (a doubled v* changes the loss)."""
    g = torch.Generator().manual_seed(0)
    v_star, vocab = torch.randn(6, 16, generator=g) * 0.3, torch.randn(50, 16, generator=g) * 0.3
    loss = nearest_neighbor_contrastive_loss(v_star, vocab, k=3, temperature=0.5, exclude=(), similarity="dot")
    dot = lambda a, b: float(a @ b)  # noqa: E731
    assert loss.item() == pytest.approx(_eq3_float64(v_star, vocab, 3, 0.5, similarity=dot), rel=1e-5)
    assert loss.item() != pytest.approx(_eq3_float64(v_star, vocab, 3, 0.5), rel=1e-2)  # not the cosine's
    with pytest.raises(ValueError, match="similarity must be one of"):
        nearest_neighbor_contrastive_loss(v_star, vocab, k=3, temperature=0.5, exclude=(), similarity="l2")


def test_contrastive_loss_over_a_gathered_batch():
    """The multi-process form (training/pretrain/objective.py): Eq. 3 over all 8 gathered rows, where only
    rows 4..7 are this process's live tensors, has the value of Eq. 3 over the 8 rows, and gives those rows
    the gradient of the all-live loss. There is no separate list of negatives to pass."""
    g = torch.Generator().manual_seed(0)
    everything, vocab = torch.randn(8, 16, generator=g), torch.randn(40, 16, generator=g)
    local = everything[4:].clone().requires_grad_(True)
    gathered = nearest_neighbor_contrastive_loss(torch.cat([everything[:4], local]), vocab, k=2, temperature=0.1,
                                                 exclude=())
    assert gathered.item() == pytest.approx(_eq3_float64(everything, vocab, 2, 0.1), rel=1e-5)
    gathered.backward()
    live = everything.clone().requires_grad_(True)
    nearest_neighbor_contrastive_loss(live, vocab, k=2, temperature=0.1, exclude=()).backward()
    torch.testing.assert_close(local.grad, live.grad[4:])
    with pytest.raises(TypeError, match="unexpected keyword argument 'negatives'"):
        nearest_neighbor_contrastive_loss(local, vocab, k=2, temperature=0.1, exclude=(), negatives=everything,
                                          self_index=torch.arange(4, 8))


def test_contrastive_loss_pulls_toward_nearest_tokens_and_apart():
    """A gradient step lowers the loss: v* moves toward its neighbours and away from the others."""
    g = torch.Generator().manual_seed(1)
    v_star = torch.randn(4, 16, generator=g).requires_grad_(True)
    vocab = torch.randn(30, 16, generator=g)
    before = nearest_neighbor_contrastive_loss(v_star, vocab, k=3, temperature=0.1, exclude=())
    before.backward()
    with torch.no_grad():
        after = nearest_neighbor_contrastive_loss(v_star - 0.5 * v_star.grad, vocab, k=3, temperature=0.1, exclude=())
    assert after < before


def test_contrastive_positives_are_never_start_or_end_tokens():
    """Rows 0 and 1 play <|startoftext|> and <|endoftext|>, made the nearest rows of every v*: excluded,
    the loss is Eq. 3 over the other rows; included, it would differ by far more than rounding."""
    g = torch.Generator().manual_seed(5)
    v_star, vocab = torch.randn(4, 16, generator=g), torch.randn(30, 16, generator=g)
    vocab[0], vocab[1] = v_star[:2].sum(0), v_star[2:].sum(0)
    assert set(nearest_tokens(v_star, vocab, k=1)[:, 0].tolist()) == {0, 1}
    loss = nearest_neighbor_contrastive_loss(v_star, vocab, k=3, temperature=0.1, exclude=(0, 1))
    assert loss.item() == pytest.approx(_eq3_float64(v_star, vocab, 3, 0.1, exclude=(0, 1)), rel=1e-5)
    with_them = nearest_neighbor_contrastive_loss(v_star, vocab, k=3, temperature=0.1, exclude=())
    assert with_them.item() < loss.item() - 0.1


def test_contrastive_loss_gives_no_gradient_to_the_vocabulary():
    """The token table may be a trainable parameter elsewhere; Eq. 3 must move v* only."""
    g = torch.Generator().manual_seed(6)
    v_star = torch.randn(4, 16, generator=g).requires_grad_(True)
    vocab = torch.randn(30, 16, generator=g).requires_grad_(True)
    nearest_neighbor_contrastive_loss(v_star, vocab, k=3, temperature=0.1, exclude=(0, 1)).backward()
    assert vocab.grad is None
    assert v_star.grad.abs().sum() > 0


def test_embedding_l2_matches_eq4():
    v_star = torch.randn(5, 12)
    expected = sum(float((v.double() ** 2).sum()) for v in v_star) / 5
    assert embedding_l2_loss(v_star).item() == pytest.approx(expected, rel=1e-6)


def test_lora_squared_norms_match_explicit_delta_w():
    g = torch.Generator().manual_seed(2)
    down = {"a": torch.randn(3, 4, 7, generator=g), "b": torch.randn(3, 4, 5, generator=g)}
    up = {"a": torch.randn(3, 6, 4, generator=g), "b": torch.randn(3, 9, 4, generator=g)}
    lora, ref = LoRAFactors(down, up, 0.5), LoRAFactors({k: v[0] for k, v in down.items()},
                                                         {k: v[0] for k, v in up.items()}, 0.5)
    explicit = sum(((0.5 * (up[s].double() @ down[s].double())) ** 2).sum(dim=(-1, -2)) for s in down)
    assert torch.allclose(lora.squared_norms().double(), explicit, rtol=1e-5)
    explicit_ref = sum(((0.5 * (up[s].double() @ down[s].double() - up[s][0].double() @ down[s][0].double())) ** 2)
                       .sum(dim=(-1, -2)) for s in down)
    assert torch.allclose(lora.squared_norms(ref).double(), explicit_ref, rtol=1e-5, atol=1e-9)
    assert lora.squared_norms(ref)[0].abs().item() < 1e-9  # row 0 is the reference itself


def test_lora_delta_equals_merged_weight():
    g = torch.Generator().manual_seed(3)
    a, b, x = torch.randn(4, 7, generator=g), torch.randn(6, 4, generator=g), torch.randn(2, 5, 7, generator=g)
    lora = LoRAFactors({"s": a}, {"s": b}, 0.25)
    assert torch.allclose(lora.delta("s", x), x @ (0.25 * b @ a).T, atol=1e-6)


def test_nearest_tokens_is_cosine_top_k_and_skips_excluded():
    g = torch.Generator().manual_seed(4)
    vocab, v_star = torch.randn(100, 8, generator=g), torch.randn(3, 8, generator=g)
    ids = nearest_tokens(v_star, vocab, k=4)
    for row, v in zip(ids, v_star, strict=True):
        expected = sorted(range(100), key=lambda j: -_cos(v.double(), vocab[j].double()))[:4]
        assert row.tolist() == expected
    excluded = nearest_tokens(v_star, vocab, k=1, exclude=ids[:, 0].tolist())
    assert not set(excluded[:, 0].tolist()) & set(ids[:, 0].tolist())
    assert torch.equal(nearest_tokens(vocab[[7, 42]] * 3.0, vocab, k=1)[:, 0], torch.tensor([7, 42]))
