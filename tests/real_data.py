"""Real third-party data from ``../shared/data`` (beside the checkout, as in CI; see its MANIFEST)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).absolute().parent.parent.parent / "shared" / "data"
BTO_DIR = SHARED_DATA / "batio3_xrd_ramp_cmf"
#: The ramp comes from a public repository (BSD-3) and can only enter ``shared/data`` through the
#: steering side; until it is there, the tests that need it say so instead of failing.
needs_batio3 = pytest.mark.skipif(not BTO_DIR.is_dir(), reason=f"BaTiO3 XRD ramp not in {BTO_DIR} (shared/data)")


def batio3_ramp() -> tuple[np.ndarray, np.ndarray]:
    """The BaTiO3 powder-diffraction temperature ramp of Maffettone et al., Appl. Phys. Rev. 8,
    041410 (2021) (NSLS-II ``constrained-matrix-factorization`` example data, BSD-3): 60 patterns
    of 3488 channels (a 2-theta grid the files do not carry), 150-445 K in 5 K steps.

    Returns:
        ``(T (60,) K, X (60, 3488) float64 intensities, raw)``.
    """
    files = sorted(BTO_DIR.glob("BTO_*K_tth.npy"))
    if len(files) != 60:
        pytest.fail(f"BaTiO3 XRD ramp missing: expected 60 BTO_*K_tth.npy files in {BTO_DIR} "
                    "(shared/data, see its MANIFEST)")
    temps = np.array([float(f.name.split("_")[1].rstrip("K")) for f in files])
    return temps, np.stack([np.load(f)[:, 0] for f in files])
