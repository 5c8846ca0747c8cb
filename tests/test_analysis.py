"""Tests of analysis.py: effective rank, LSVR, activation maps and concentration IoU on features
whose answers are derived by hand."""
import math

import pytest
import torch

from llm4seg import analysis

FLOAT32_TOL = 1e-5  # float32 ratios of pixel counts up to a few hundred: error well below 1e-6

# Singular values of float32 rank-deficient maps leave ~1e-7 residues that add ~1e-5 of entropy.
SPECTRUM_TOL = 1e-4


def spectrum_features():
    """(1, 4, 8, 8): rank 1, rank 2 with equal singular values, rank 8 (identity), and an all-zero channel."""
    u, v = torch.arange(1.0, 9.0), torch.linspace(-1, 2, 8)
    rank2 = torch.zeros(8, 8)
    rank2[0, 0] = rank2[1, 1] = 3.0
    return torch.stack([torch.outer(u, v), rank2, torch.eye(8) * 5, torch.zeros(8, 8)])[None]


def test_effective_rank_of_rank_one_and_identity_maps():
    features = spectrum_features()
    assert analysis.effective_rank(features[:, :1]).item() == pytest.approx(1.0, abs=SPECTRUM_TOL)
    assert analysis.effective_rank(features[:, 2:3]).item() == pytest.approx(8.0, abs=SPECTRUM_TOL)
    # The zero channel has no spectrum and is left out: mean of 1, 2, 8.
    assert analysis.effective_rank(features).item() == pytest.approx(11 / 3, abs=SPECTRUM_TOL)


def test_lsvr_grows_as_the_largest_singular_value_dominates_less():
    """The paper: a smaller LSVR means a more dominant largest singular value. Rank 1: -log 1 = 0;
    two equal singular values: log 2; identity 8x8: log 8."""
    values = [analysis.lsvr(spectrum_features()[:, c:c + 1]).item() for c in range(3)]
    assert values == pytest.approx([0.0, math.log(2), math.log(8)], abs=SPECTRUM_TOL)


def test_activation_map_is_a_min_max_scaled_channel_mean_of_magnitudes():
    features = torch.zeros(2, 3, 4, 4)
    features[0, :, 1, 2] = torch.tensor([-3.0, 3.0, 0.0])  # mean |f| = 2 at (1, 2)
    features[0, 0, 0, 0] = 3.0  # mean |f| = 1 at (0, 0)
    maps = analysis.activation_map(features)
    assert maps[0, 1, 2].item() == 1.0 and maps[0, 0, 0].item() == 0.5 and maps[0, 3, 3].item() == 0.0
    assert maps[1].abs().max().item() == 0.0  # a constant map becomes zeros, not NaN


def test_concentration_iou_on_a_crafted_map():
    """4x4 map: 0.9 on the top-left 2x2 (the lesion), 0.5 at (3, 3), 0.3 elsewhere; thresholded at 0.4
    it highlights 5 pixels, 4 of them the lesion: IoU = 4/5. Bilinear upsampling keeps values in range."""
    activation = torch.full((1, 4, 4), 0.3)
    activation[0, :2, :2] = 0.9
    activation[0, 3, 3] = 0.5
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    assert analysis.concentration_iou(activation, mask).item() == pytest.approx(0.8, abs=FLOAT32_TOL)
    with pytest.raises(ValueError, match="upsample_map"):
        analysis.concentration_iou(activation, torch.zeros(1, 1, 16, 16))
    upsampled = analysis.upsample_map(activation, (16, 16))
    assert upsampled.shape == (1, 16, 16) and 0.3 <= upsampled.min() and upsampled.max() <= 0.9
