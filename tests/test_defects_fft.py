"""FFT automatic labelling (Maksov et al. 2019) on the real MoS2 HAADF frames shipped with beamlens."""
from __future__ import annotations

import numpy as np
import pytest

from beamlens.models.defect_net import REAL_FRAMES_DIR
from beamlens.models.fft_labels import MAX_RADIUS_FRACTION, bragg_radius, fft_defect_labels

REAL = sorted(REAL_FRAMES_DIR.glob("*.npy"))
#: first Bragg ring radius in px of frequency space: 512 px / d100 (16.2 px and 21.5 px, MANIFEST.md)
EXPECTED_RING = {"MoS2_stem_Exp-000-2.npy": 512 / 16.2, "MoS2_stem_Exp-001-5.npy": 512 / 21.5}


def test_real_frames_are_shipped():
    assert [p.name for p in REAL] == sorted(EXPECTED_RING)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_fft_labels_mark_half_to_five_percent_of_real_frames(path):
    img = np.load(path)
    labels = fft_defect_labels(img)
    assert labels.bragg_radius_px == pytest.approx(EXPECTED_RING[path.name], abs=1.5)
    assert labels.mask_radius_px < MAX_RADIUS_FRACTION * labels.bragg_radius_px
    assert labels.maskratio > 1.4 * img.shape[0] / labels.bragg_radius_px  # 1.4 x lattice period
    assert 0.005 <= labels.fraction <= 0.05


def test_paper_default_maskratio_is_refused_on_real_frames():
    img = np.load(REAL[0])
    with pytest.raises(ValueError, match="reaches the first Bragg ring"):
        fft_defect_labels(img, maskratio=10)


def test_bragg_radius_of_a_synthetic_lattice():
    yy, xx = np.indices((256, 256))
    period = 16.0
    img = sum(np.cos(2 * np.pi * (np.cos(t) * xx + np.sin(t) * yy) / period) for t in (0, np.pi / 3, 2 * np.pi / 3))
    assert bragg_radius(img) == pytest.approx(256 / period, abs=1)
