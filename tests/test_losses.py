"""Loss terms against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avalanche_imaginer.losses import (
    SEMANTIC_MODES,
    generator_loss,
    gram_matrix,
    less_forget_loss,
    less_forget_weight,
    margin_ranking_loss,
    semantic_consistency,
    semantic_vectors,
    style_consistency,
)

PROPERTY = settings(max_examples=25, deadline=None, database=None)


def _map_a() -> torch.Tensor:
    """One sample, two channels of 2x2: [[1, 2], [3, 4]] and [[0, 0], [0, 4]]."""
    return torch.tensor(
        [[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 4.0]]]]
    )  # (1, 2, 2, 2)


def _random_maps(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


map_shapes = st.tuples(
    st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)
)
seeds = st.integers(0, 2**31 - 1)
scales = st.floats(0.1, 10.0)  # factors of the scaling properties


# ------------------------------------------------------------------ less-forget


def test_less_forget_loss_by_hand():
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    old = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    # cosines 1 and 1/sqrt(2): mean of (1 - cos)
    expected = ((1 - 1) + (1 - 1 / math.sqrt(2))) / 2
    loss = less_forget_loss(features, old)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert features.grad is not None
    assert old.grad is None, "the old model's features must be detached"


def test_less_forget_loss_is_zero_for_equal_features():
    features = torch.randn(5, 7)
    assert less_forget_loss(features, features.clone()).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # the same directions at another scale are not penalised either
    assert less_forget_loss(features, 3 * features).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_less_forget_loss_empty_batch_and_shape_mismatch():
    assert less_forget_loss(torch.empty(0, 4), torch.empty(0, 4)).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        less_forget_loss(torch.zeros(2, 4), torch.zeros(2, 5))


@pytest.mark.parametrize(
    ("lambda_base", "n_old", "n_new", "expected"),
    [
        (5.0, 4, 2, 5.0 * math.sqrt(2.0)),
        (5.0, 2, 2, 5.0),
        (2.0, 1, 4, 1.0),
        (5.0, 0, 2, 0.0),
        (5.0, 2, 0, 0.0),
    ],
)
def test_less_forget_weight(lambda_base, n_old, n_new, expected):
    assert less_forget_weight(lambda_base, n_old, n_new) == pytest.approx(expected)


# ----------------------------------------------------------------- margin ranking


def _ranking_case():
    cosines = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # old class 0: hard new cosines 0.5, 0.2
            [0.0, 0.3, 0.4, 0.6],  # old class 1: hard new cosines 0.6, 0.4
            [0.0, 0.0, 0.9, 0.9],  # new class 2: ignored
        ]
    )
    targets = torch.tensor([0, 1, 2])
    return cosines, targets, torch.tensor([0, 1]), torch.tensor([2, 3])


def test_margin_ranking_loss_by_hand():
    cosines, targets, old, new = _ranking_case()
    # relu(0.5 - gt + hard) for each (sample, hard class), averaged:
    # sample 0: 0.5-0.9+0.5=0.1, 0.5-0.9+0.2<0 -> 0; sample 1: 0.8, 0.6
    expected = (0.1 + 0.0 + 0.8 + 0.6) / 4
    loss = margin_ranking_loss(cosines, targets, old, new, margin=0.5, top_k=2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # top_k=1 keeps the hardest new class only: 0.1 and 0.8
    loss = margin_ranking_loss(cosines, targets, old, new, margin=0.5, top_k=1)
    assert loss.item() == pytest.approx((0.1 + 0.8) / 2, abs=1e-6)
    # top_k above the number of new classes uses them all
    loss = margin_ranking_loss(cosines, targets, old, new, margin=0.5, top_k=5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_margin_ranking_loss_is_zero_when_the_margin_is_met():
    cosines = torch.tensor([[0.9, 0.0, 0.3, 0.35], [0.1, 0.8, 0.2, 0.25]])
    targets = torch.tensor([0, 1])
    loss = margin_ranking_loss(
        cosines, targets, torch.tensor([0, 1]), torch.tensor([2, 3]), margin=0.5
    )
    assert loss.item() == 0.0


def test_margin_ranking_loss_without_old_samples_or_new_classes():
    cosines, targets, old, new = _ranking_case()
    only_new = margin_ranking_loss(cosines[2:], targets[2:], old, new)
    assert only_new.item() == 0.0
    no_new = margin_ranking_loss(cosines, targets, old, torch.tensor([], dtype=int))
    assert no_new.item() == 0.0


# -------------------------------------------------------------- semantic vectors


def test_semantic_vectors_gap_by_hand():
    (gap,) = semantic_vectors(_map_a(), "gap")
    assert torch.allclose(gap, torch.tensor([[2.5, 1.0]]))


def test_semantic_vectors_pooled_by_hand():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    spatial, channel = semantic_vectors(maps, "pooled")
    # squares [[1, 4], [9, 16]]: sums over H per column 10, 20; over W per row 5, 25
    expected_spatial = torch.tensor([[10.0, 20.0, 5.0, 25.0]]) / math.sqrt(1150.0)
    expected_channel = torch.tensor([[1.0, 2.0, 3.0, 4.0]]) / math.sqrt(30.0)
    assert torch.allclose(spatial, expected_spatial)
    assert torch.allclose(channel, expected_channel)


def test_semantic_vectors_rejects_bad_input():
    with pytest.raises(ValueError, match="semantic mode"):
        semantic_vectors(_map_a(), "bogus")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        semantic_vectors(torch.zeros(2, 3), "gap")


def test_semantic_consistency_by_hand():
    a = torch.cat([_map_a(), torch.ones(1, 2, 2, 2)])  # (2, 2, 2, 2)
    b = torch.zeros(2, 2, 2, 2)
    # GAP of a: [2.5, 1] and [1, 1]; distances to 0 averaged over the batch
    expected = (math.sqrt(2.5**2 + 1.0) + math.sqrt(2.0)) / 2
    assert semantic_consistency(a, b, "gap").item() == pytest.approx(expected)


def test_semantic_consistency_pooled_sums_both_descriptors():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # b: squares [[1, 0], [0, 0]] -> spatial [1, 0, 1, 0]/sqrt(2), channel [1, 0, 0, 0]
    spatial_a = torch.tensor([10.0, 20.0, 5.0, 25.0]) / math.sqrt(1150.0)
    spatial_b = torch.tensor([1.0, 0.0, 1.0, 0.0]) / math.sqrt(2.0)
    channel_a = torch.tensor([1.0, 2.0, 3.0, 4.0]) / math.sqrt(30.0)
    channel_b = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected = (spatial_a - spatial_b).norm() + (channel_a - channel_b).norm()
    value = semantic_consistency(a, b, "pooled")
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------------ Gram


def test_gram_matrix_by_hand():
    # channels [1, 2, 3, 4] and [0, 0, 0, 4]: inner products 30, 16, 16 over 4 pixels
    raw = gram_matrix(_map_a())
    assert torch.allclose(raw, torch.tensor([[[7.5, 4.0], [4.0, 4.0]]]))
    cos = 4.0 / math.sqrt(30.0)  # (1*0 + 2*0 + 3*0 + 4*4) / (sqrt(30) * 4)
    normalised = gram_matrix(_map_a(), normalized=True)
    assert torch.allclose(normalised, torch.tensor([[[1.0, cos], [cos, 1.0]]]))


def test_style_consistency_by_hand():
    a = _map_a()
    b = torch.zeros_like(a)
    # Frobenius norm of [[7.5, 4], [4, 4]]
    expected = math.sqrt(7.5**2 + 3 * 4.0**2)
    assert style_consistency(a, b).item() == pytest.approx(expected)
    # normalised: the Gram of zero maps is zero, that of a has ones on the diagonal
    expected = math.sqrt(2 + 2 * 16.0 / 30.0)
    assert style_consistency(a, b, normalized=True).item() == pytest.approx(expected)


def test_style_consistency_averages_over_the_batch():
    a = torch.cat([_map_a(), torch.zeros(1, 2, 2, 2)])
    b = torch.zeros(2, 2, 2, 2)
    expected = (math.sqrt(7.5**2 + 3 * 4.0**2) + 0.0) / 2
    assert style_consistency(a, b).item() == pytest.approx(expected)


# ------------------------------------------------------------- generator loss


def _generator_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def maps():
        return torch.randn(3, 2, 2, 2, generator=gen)

    return {
        "logits": torch.randn(3, 4, generator=gen),
        "mix": maps(),
        "real": maps(),
        "unlabeled": maps(),
        "exemplar": maps(),
        "cycle": maps(),
        "other_mix": maps(),
    }


def test_generator_loss_is_the_weighted_sum_of_its_parts():
    t = _generator_inputs()
    lam, lam_cyc = 2.0, 0.3
    total, parts = generator_loss(
        target=1, lam=lam, lam_cyc=lam_cyc, semantic="gap", **t
    )
    # cross-entropy from its definition: -log softmax of the target class
    ce = (torch.logsumexp(t["logits"], dim=1) - t["logits"][:, 1]).mean()
    sc = semantic_consistency(t["real"], t["mix"])
    sdc = style_consistency(t["unlabeled"], t["mix"])
    sc_cyc = semantic_consistency(t["other_mix"], t["cycle"])
    sdc_cyc = style_consistency(t["exemplar"], t["cycle"])
    expected = ce + sc + lam * sdc + lam_cyc * (sc_cyc + lam * sdc_cyc)
    assert set(parts) == {"ce", "sc", "sdc", "cycle"}
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert parts["sc"] == pytest.approx(sc.item(), rel=1e-5)
    assert parts["sdc"] == pytest.approx(lam * sdc.item(), rel=1e-5)
    assert parts["cycle"] == pytest.approx(
        lam_cyc * (sc_cyc + lam * sdc_cyc).item(), rel=1e-5
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)


@pytest.mark.parametrize(
    ("use_sc", "use_sdc", "with_cycle", "keys"),
    [
        (False, False, False, {"ce"}),
        (True, False, False, {"ce", "sc"}),
        (True, True, False, {"ce", "sc", "sdc"}),
        (True, True, True, {"ce", "sc", "sdc", "cycle"}),
        (False, True, True, {"ce", "sdc", "cycle"}),
    ],
)
def test_generator_loss_parts(use_sc, use_sdc, with_cycle, keys):
    t = _generator_inputs()
    if not with_cycle:
        t["cycle"] = None
    total, parts = generator_loss(target=0, use_sc=use_sc, use_sdc=use_sdc, **t)
    assert set(parts) == keys
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)
    if with_cycle and not use_sc:
        # without SC the cycle holds only its style term
        expected = 0.3 * 2.0 * style_consistency(t["exemplar"], t["cycle"])
        assert parts["cycle"] == pytest.approx(expected.item(), rel=1e-5)


def test_generator_loss_cycle_without_other_mix_drops_its_semantic_term():
    t = _generator_inputs()
    t["other_mix"] = None
    _, parts = generator_loss(target=0, **t)
    expected = 0.3 * 2.0 * style_consistency(t["exemplar"], t["cycle"])
    assert parts["cycle"] == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ properties


@PROPERTY
@given(shape=map_shapes, seed=seeds, normalized=st.booleans())
def test_gram_matrix_is_symmetric_positive_semidefinite(shape, seed, normalized):
    gram = gram_matrix(_random_maps(seed, shape), normalized)
    b, c = shape[:2]
    assert gram.shape == (b, c, c)
    assert torch.allclose(gram, gram.transpose(1, 2))
    eigenvalues = torch.linalg.eigvalsh(gram)  # (B, C)
    scale = eigenvalues.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    assert (eigenvalues >= -1e-5 * scale).all(), eigenvalues


@PROPERTY
@given(shape=map_shapes, seed=seeds, mode=st.sampled_from(SEMANTIC_MODES))
def test_semantic_consistency_zero_for_identical_inputs(shape, seed, mode):
    maps = _random_maps(seed, shape)
    assert semantic_consistency(maps, maps.clone(), mode).item() == pytest.approx(
        0.0, abs=1e-9
    )


@PROPERTY
@given(shape=map_shapes, seed=seeds, normalized=st.booleans())
def test_style_consistency_zero_for_identical_inputs(shape, seed, normalized):
    maps = _random_maps(seed, shape)
    value = style_consistency(maps, maps.clone(), normalized)
    assert value.item() == pytest.approx(0.0, abs=1e-9)


@PROPERTY
@given(shape=map_shapes, seed=seeds, normalized=st.booleans())
def test_style_consistency_ignores_where_pixels_are(shape, seed, normalized):
    # A Gram matrix sums over pixels: any spatial permutation applied to both
    # maps leaves it, and so the loss, unchanged.
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    n, c, h, w = shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))

    def shuffle(x):
        return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)

    before = style_consistency(a, b, normalized)
    after = style_consistency(shuffle(a), shuffle(b), normalized)
    assert after.item() == pytest.approx(before.item(), rel=1e-9, abs=1e-12)


@PROPERTY
@given(shape=map_shapes, seed=seeds, normalized=st.booleans())
def test_style_consistency_ignores_channel_order(shape, seed, normalized):
    # Permuting channels permutes rows and columns of both Gram matrices alike.
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(seed))
    before = style_consistency(a, b, normalized)
    after = style_consistency(a[:, perm], b[:, perm], normalized)
    assert after.item() == pytest.approx(before.item(), rel=1e-9, abs=1e-12)


@PROPERTY
@given(shape=map_shapes, seed=seeds, s=scales, t=scales)
def test_style_consistency_scaling(shape, seed, s, t):
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    # raw Gram is quadratic in the maps: scaling both by s scales the loss by s^2
    raw = style_consistency(a, b)
    assert style_consistency(s * a, s * b).item() == pytest.approx(
        s * s * raw.item(), rel=1e-9, abs=1e-12
    )
    # the channel-normalised Gram is blind to the scale of each input
    normalised = style_consistency(a, b, normalized=True)
    assert style_consistency(s * a, t * b, normalized=True).item() == pytest.approx(
        normalised.item(), rel=1e-9, abs=1e-12
    )


@PROPERTY
@given(shape=map_shapes, seed=seeds)
def test_gap_semantic_consistency_ignores_where_pixels_are(shape, seed):
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    n, c, h, w = shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))

    def shuffle(x):
        return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)

    before = semantic_consistency(a, b, "gap")
    after = semantic_consistency(shuffle(a), shuffle(b), "gap")
    assert after.item() == pytest.approx(before.item(), rel=1e-9, abs=1e-12)


@PROPERTY
@given(shape=map_shapes, seed=seeds, mode=st.sampled_from(SEMANTIC_MODES))
def test_semantic_consistency_ignores_flips_and_channel_order(shape, seed, mode):
    # Pooled descriptors keep rows and columns (not any pixel permutation), but
    # a flip, applied to both maps, only permutes their coordinates alike.
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(seed))
    before = semantic_consistency(a, b, mode).item()
    for dims in ((2,), (3,), (2, 3)):
        flipped = semantic_consistency(a.flip(dims), b.flip(dims), mode).item()
        assert flipped == pytest.approx(before, rel=1e-9, abs=1e-12)
    permuted = semantic_consistency(a[:, perm], b[:, perm], mode).item()
    assert permuted == pytest.approx(before, rel=1e-9, abs=1e-12)


@PROPERTY
@given(shape=map_shapes, seed=seeds, s=scales, t=scales)
def test_semantic_consistency_scaling(shape, seed, s, t):
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    # GAP keeps the scale: the loss is homogeneous of degree 1
    gap = semantic_consistency(a, b, "gap").item()
    assert semantic_consistency(s * a, s * b, "gap").item() == pytest.approx(
        s * gap, rel=1e-9, abs=1e-12
    )
    # the pooled descriptors are L2-normalised: blind to each input's scale
    pooled = semantic_consistency(a, b, "pooled").item()
    assert semantic_consistency(s * a, t * b, "pooled").item() == pytest.approx(
        pooled, rel=1e-9, abs=1e-12
    )


@PROPERTY
@given(shape=map_shapes, seed=seeds, mode=st.sampled_from(SEMANTIC_MODES))
def test_consistency_losses_are_symmetric(shape, seed, mode):
    a, b = _random_maps(seed, shape), _random_maps(seed + 1, shape)
    assert semantic_consistency(a, b, mode).item() == pytest.approx(
        semantic_consistency(b, a, mode).item(), rel=1e-12
    )
    assert style_consistency(a, b).item() == pytest.approx(
        style_consistency(b, a).item(), rel=1e-12
    )
