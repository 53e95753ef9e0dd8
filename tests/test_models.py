"""SplitModel, the backbones and the cosine classifier."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.models.dynamic_optimizers import update_optimizer
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from avalanche_imaginer import (
    CosineClassifier,
    SplitModel,
    resnet18,
    resnet32,
    split_torchvision_resnet,
)


def experience(*classes: int) -> SimpleNamespace:
    """The part of an Avalanche experience that model adaptation reads."""
    return SimpleNamespace(classes_in_this_experience=list(classes))


def adapted(model: nn.Module, *classes: int) -> nn.Module:
    avalanche_model_adaptation(model, experience(*classes))
    return model


def _linear_split_model(classifier: nn.Module | None = None) -> SplitModel:
    lower = nn.Conv2d(1, 3, 3, padding=1)
    upper = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    return SplitModel(lower, upper, classifier)


# ------------------------------------------------------------------ SplitModel


def test_forward_is_classifier_of_upper_of_lower(model_builder):
    model = adapted(model_builder(), 0, 1, 2).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model.classifier(model.upper(model.lower(x)))
        assert torch.equal(model(x), expected)


def test_partial_paths_agree_with_forward(model_builder):
    model = adapted(model_builder(), 0, 1).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        maps = model.feature_map(x)
        assert maps.shape == (3, 32, 2, 2)
        features = model.features(x)
        assert features.shape == (3, model.feature_size)
        assert torch.allclose(model.features_of_map(maps), features)
        assert torch.allclose(model.logits_of_map(maps), model(x))


def test_split_model_with_a_given_classifier():
    classifier = nn.Linear(5, 4)
    model = _linear_split_model(classifier).eval()
    x = torch.randn(2, 1, 6, 6)
    assert model.classifier is classifier
    assert model.feature_size == 5  # inferred from the Linear of upper
    with torch.no_grad():
        assert torch.allclose(model(x), classifier(model.upper(model.lower(x))))


def test_split_model_builds_a_cosine_classifier_of_the_inferred_size():
    model = _linear_split_model()
    assert isinstance(model.classifier, CosineClassifier)
    assert model.classifier.in_features == 5


def test_feature_size_given_wins_over_inference():
    lower = nn.Conv2d(1, 3, 1)
    upper = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SplitModel(lower, upper, feature_size=3)
    assert model.feature_size == 3
    assert model.classifier.in_features == 3


def test_feature_size_that_cannot_be_inferred():
    upper = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="feature_size"):
        SplitModel(nn.Conv2d(1, 3, 1), upper)


@pytest.mark.parametrize("name", ["lower", "upper", "classifier"])
def test_split_model_rejects_non_modules(name):
    parts = {
        "lower": nn.Conv2d(1, 3, 1),
        "upper": nn.Sequential(nn.Flatten(), nn.Linear(3, 4)),
        "classifier": None,
    }
    parts[name] = "not a module"
    with pytest.raises(TypeError, match=name):
        SplitModel(**parts, feature_size=4)


@pytest.mark.parametrize("width", [2, 4])
def test_resnet32_shapes(width):
    torch.manual_seed(0)
    model = resnet32(width=width, blocks_per_stage=2)
    assert model.feature_size == 4 * width
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert model.feature_map(x).shape == (2, 4 * width, 4, 4)
        assert model.features(x).shape == (2, 4 * width)


def test_resnet32_rejects_too_few_blocks():
    with pytest.raises(ValueError, match="blocks_per_stage"):
        resnet32(blocks_per_stage=1)


def test_resnet32_lower_ends_before_the_relu():
    # The generators work on the pre-ReLU map: it must take negative values.
    torch.manual_seed(0)
    model = resnet32(in_channels=1, width=2, blocks_per_stage=2).eval()
    with torch.no_grad():
        maps = model.feature_map(torch.randn(4, 1, 8, 8))
    assert (maps < 0).any()


def test_split_torchvision_resnet18():
    model = split_torchvision_resnet(tv_resnet18(weights=None)).eval()
    assert model.feature_size == 512  # inferred from layer4
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert model.feature_map(x).shape == (1, 256, 2, 2)
        assert model.features(x).shape == (1, 512)


def test_resnet18_small_inputs():
    model = resnet18(weights=None, small_inputs=True).eval()
    assert model.feature_size == 512
    with torch.no_grad():
        # no stride in the stem and no max-pooling: 8 -> 8 -> 4 -> 2 after layer3
        assert model.feature_map(torch.randn(1, 3, 8, 8)).shape == (1, 256, 2, 2)


def test_split_torchvision_resnet_rejects_other_networks():
    with pytest.raises(TypeError, match="resnet"):
        split_torchvision_resnet(nn.Linear(3, 3))


# ------------------------------------------------------------ CosineClassifier


def test_cosine_classifier_grows_with_new_classes():
    clf = CosineClassifier(4)
    assert clf.out_features == 0
    adapted(clf, 0, 1)
    assert clf.out_features == 2
    assert clf.seen_classes == [0, 1]
    assert not clf.frozen_mask.any()
    first_rows = clf.weight.detach().clone()
    adapted(clf, 2, 3)
    assert clf.out_features == 4
    assert clf.seen_classes == [0, 1, 2, 3]
    assert clf.frozen_mask.tolist() == [True, True, False, False]
    assert torch.equal(clf.weight[:2].detach(), first_rows), "old rows must be kept"


def test_cosine_classifier_grows_inside_a_split_model(model_builder):
    model = model_builder()
    adapted(model, 3, 1)
    assert model.classifier.out_features == 4
    assert model.classifier.seen_classes == [1, 3]


def test_cosine_classifier_takes_real_experiences(digits_benchmark):
    clf = CosineClassifier(4)
    for exp in digits_benchmark.train_stream[:2]:
        avalanche_model_adaptation(clf, exp)
    assert clf.seen_classes == [0, 1, 2, 3]


def test_cosine_classifier_needs_class_information():
    with pytest.raises(ValueError, match="classes_in_this_experience"):
        avalanche_model_adaptation(CosineClassifier(4), SimpleNamespace())


def test_optimizer_follows_the_grown_weight(model_builder):
    model = model_builder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # as Avalanche's make_optimizer: first call before any adaptation
    optimized = update_optimizer(
        optimizer, dict(model.named_parameters()), None, reset_state=True
    )
    for classes in ((0, 1), (2, 3)):
        old_weight = model.classifier.weight
        adapted(model, *classes)
        optimized = update_optimizer(
            optimizer, dict(model.named_parameters()), optimized
        )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        assert any(p is model.classifier.weight for p in params)
        assert not any(p is old_weight for p in params)
        assert len(params) == len(list(model.parameters()))

    # a step moves the new rows of the weight the model uses
    before = model.classifier.weight.detach().clone()
    loss = model(torch.randn(4, 1, 8, 8)).logsumexp(dim=1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.classifier.weight.detach()
    assert not torch.equal(after[2:], before[2:])
    assert torch.equal(after[:2], before[:2]), "frozen old rows must not move"


def test_cosine_logits_are_bounded_by_the_scale():
    torch.manual_seed(0)
    clf = adapted(CosineClassifier(6, scale=3.0), *range(5))
    features = torch.randn(50, 6) * torch.logspace(-3, 3, 50).unsqueeze(1)
    logits = clf(features)
    assert logits.abs().max().item() <= 3.0 + 1e-5
    # reached for a feature along a class weight
    logit = clf(clf.weight[2:3].detach() * 7.0)[0, 2]
    assert logit.item() == pytest.approx(3.0, abs=1e-5)


def test_inactive_classes_are_masked():
    clf = adapted(CosineClassifier(4, mask_value=-123.0), 0, 1)
    clf.eval()
    # eval adaptation makes room for classes of a test experience, unseen in training
    adapted(clf, 4)
    assert clf.out_features == 5
    assert clf.seen_classes == [0, 1]
    logits = clf(torch.randn(3, 4))
    assert (logits[:, 2:] == -123.0).all()
    assert (logits[:, :2].abs() <= clf.scale).all()
    # cosine() itself is unmasked
    assert (clf.cosine(torch.randn(3, 4)).abs() <= 1.0 + 1e-6).all()


@pytest.mark.parametrize("freeze_old", [True, False])
def test_old_rows_get_no_gradient_when_frozen(freeze_old):
    clf = CosineClassifier(4, freeze_old=freeze_old)
    adapted(clf, 0, 1)
    adapted(clf, 2, 3)
    clf(torch.randn(5, 4)).sum().backward()
    grad = clf.weight.grad
    assert grad[2:].abs().sum() > 0
    if freeze_old:
        assert torch.equal(grad[:2], torch.zeros_like(grad[:2]))
    else:
        assert grad[:2].abs().sum() > 0


def test_scale_is_learnable_or_fixed():
    learned = CosineClassifier(4, scale=5.0)
    assert any(p is learned.scale for p in learned.parameters())
    fixed = CosineClassifier(4, scale=5.0, learn_scale=False)
    assert not any(p is fixed.scale for p in fixed.parameters())
    assert fixed.scale.item() == 5.0


def test_imprint_without_old_classes_sets_unit_rows():
    clf = adapted(CosineClassifier(3), 0, 1)
    features = torch.tensor([[3.0, 0.0, 4.0], [0.0, -2.0, 0.0]])
    clf.imprint([0, 1], features)
    expected = torch.tensor([[0.6, 0.0, 0.8], [0.0, -1.0, 0.0]])
    assert torch.allclose(clf.weight.detach(), expected)


def test_imprint_matches_the_norm_of_old_rows():
    clf = adapted(CosineClassifier(2), 0, 1)
    with torch.no_grad():
        clf.weight[:2] = torch.tensor([[2.0, 0.0], [0.0, 4.0]])  # mean norm 3
    adapted(clf, 2)
    clf.imprint([2], torch.tensor([[1.0, 1.0]]))
    row = clf.weight[2].detach()
    assert torch.allclose(row, torch.tensor([3.0, 3.0]) / 2**0.5)
    assert torch.equal(clf.weight[:2].detach(), torch.tensor([[2.0, 0.0], [0.0, 4.0]]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4"])
def test_cosine_classifier_rejects_bad_in_features(bad):
    with pytest.raises(ValueError, match="in_features"):
        CosineClassifier(bad)
