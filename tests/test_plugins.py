"""Plugins on hand-made strategy states: the imagined replay's loss by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_diagnostics import Doubler, gap_model
from torch.utils.data import TensorDataset

from avalanche_imaginer import GeneratorBank
from avalanche_imaginer.data import UnlabeledPool
from avalanche_imaginer.plugins import REPLAY_WEIGHTINGS, ImaginedReplayPlugin


def replay_state() -> SimpleNamespace:
    """A batch of 4 real maps: one exemplar of old class 0, three of class 1.

    The gap model's head has unit weights along the axes and scale 10; class
    0 has a generator that doubles the content.
    """
    model = gap_model()
    model.classifier.frozen_mask = torch.tensor([True, False])  # class 0 is old
    bank = GeneratorBank()
    bank.add(0, Doubler())
    maps = torch.tensor(
        [
            [[[1.0, 3.0]], [[1.0, 1.0]]],  # GAP (2, 1): the exemplar
            [[[0.0, 0.0]], [[1.0, 1.0]]],
            [[[0.0, 0.0]], [[2.0, 2.0]]],
            [[[0.0, 0.0]], [[3.0, 1.0]]],
        ]
    )  # (4, 2, 1, 2)
    return SimpleNamespace(
        model=model,
        generators=bank,
        mb_y=torch.tensor([0, 1, 1, 1]),
        mb_maps=maps,
        unlabeled_pool=UnlabeledPool(TensorDataset(torch.zeros(8, 2, 1, 2))),
        device="cpu",
        loss=torch.tensor(0.0),
    )


@pytest.mark.parametrize("weighting", REPLAY_WEIGHTINGS)
def test_replay_loss_by_hand(weighting):
    state = replay_state()
    replay = ImaginedReplayPlugin(n_generated=2, weight=0.5, weighting=weighting)
    replay.before_backward(state)
    # Both counterparts are twice the exemplar's map, GAP (4, 2): cosines
    # 2/sqrt(5) and 1/sqrt(5) to the two class weights, logits 10 times these.
    ce = math.log1p(math.exp(-10.0 / math.sqrt(5.0)))
    # "batch": their mean CE; "sample": their summed CE over the 4 real samples
    expected = 0.5 * (ce if weighting == "batch" else 2 * ce / 4)
    assert replay.last_count == 2
    assert float(state.loss) == pytest.approx(expected, rel=1e-4)


def test_sample_weighting_counts_each_counterpart_as_one_batch_sample():
    losses = {}
    for weighting in REPLAY_WEIGHTINGS:
        state = replay_state()
        ImaginedReplayPlugin(n_generated=3, weighting=weighting).before_backward(state)
        losses[weighting] = float(state.loss)
    # 3 counterparts in a batch of 4 real samples
    assert losses["sample"] == pytest.approx(losses["batch"] * 3 / 4, rel=1e-6)


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="replay_weighting must be one of .*'mean'"):
        ImaginedReplayPlugin(weighting="mean")


def test_copies_replay_the_exemplar_maps_themselves():
    state = replay_state()
    state.generators = GeneratorBank()  # none needed
    replay = ImaginedReplayPlugin(n_generated=2, weight=1.0, copies=True)
    replay.before_backward(state)
    # the exemplar's map, GAP (2, 1), is classified as it is: cosines 2/sqrt(5)
    # and 1/sqrt(5), as for its doubled counterparts above
    ce = math.log1p(math.exp(-10.0 / math.sqrt(5.0)))
    assert replay.last_count == 2
    assert float(state.loss) == pytest.approx(ce, rel=1e-4)
