"""Shared spectral preprocessing and reference loading; bad spectra are skipped and counted."""
from __future__ import annotations

import numpy as np
import pytest

from beamlens.consumers.spectral.preprocess import Preprocessor, PreprocessParams, normalize_edge
from beamlens.consumers.spectral.references import FE_K_DIR, read_reference_cached, resolve_reference_path
from beamlens.daemon.config import ConfigError, load_config
from beamlens.daemon.sim.datasets import corroding_steel_map

from spectral_replay import replay


@pytest.fixture(scope="module")
def steel():
    return corroding_steel_map(seed=0)


def test_page_normalisation_equals_per_spectrum_normalisation(steel):
    x = steel.spectra.reshape(-1, 400)[:50].astype(np.float64) * 2.5 + np.linspace(0.1, 0.3, 400)
    prep = Preprocessor(PreprocessParams(normalize="edge"), steel.energy, 400)
    y, ok, no_edge = prep(x)
    assert ok.all() and not no_edge.any()
    for i in (0, 17, 49):
        np.testing.assert_allclose(y[i], normalize_edge(steel.energy, x[i], e0=prep.e0)[0], atol=1e-12)
    # the same E0 for later pages: page boundaries do not change the result
    y2, _, _ = prep(x[25:])
    np.testing.assert_allclose(y2, y[25:], atol=1e-12)


def test_window_and_derivative(steel):
    x = steel.spectra.reshape(-1, 400)[:5].astype(np.float64)
    prep = Preprocessor(PreprocessParams(energy_window=(7100, 7180), derivative=True), steel.energy, 400)
    y, ok, _ = prep(x)
    sel = (steel.energy >= 7100) & (steel.energy <= 7180)
    assert y.shape == (5, sel.sum()) and np.array_equal(prep.energy, steel.energy[sel])
    np.testing.assert_allclose(y, np.gradient(x[:, sel], steel.energy[sel], axis=1))


def test_isolated_nonfinite_channels_are_repaired_and_bad_spectra_dropped(steel):
    x = steel.spectra.reshape(-1, 400)[:3].astype(np.float64)
    clean = x.copy()
    x[0, 100] = np.nan
    x[1, 50:200] = np.inf
    y, ok, _ = Preprocessor(PreprocessParams(max_nonfinite_fraction=0.01), steel.energy, 400)(x)
    assert list(ok) == [True, False, True]
    assert abs(y[0, 100] - clean[0, 100]) < 0.05  # interpolated from its neighbours


def test_preprocessing_needs_an_energy_axis():
    with pytest.raises(ValueError, match="energy axis"):
        Preprocessor(PreprocessParams(normalize="edge"), None, 100)


def test_bad_spectra_are_skipped_and_counted_by_the_daemon(steel):
    data = corroding_steel_map(seed=0)
    data.spectra[0, :5, 10] = np.nan  # five spectra with a NaN channel
    r = replay("consumers:\n  - {name: unmix, class: unmixing, params: {n_components: 3}}\n"
               "  - {name: emb, class: embedding}\n", data)
    for name in ("unmix", "emb"):
        skipped = r.metrics.registry.get_sample_value("beamlens_points_skipped_total", {"consumer": name, "reason": "nonfinite"})
        assert skipped == 5
    abundance = r.get("unmix", "abundance_1")
    assert np.isnan(abundance[0, :5]).all() and np.isfinite(abundance[1:]).all()


def test_reference_paths_relative_absolute_and_columns():
    rel = "hxn_library/FeLibNov2021.nor"
    assert resolve_reference_path(rel) == FE_K_DIR / rel
    assert resolve_reference_path(FE_K_DIR / rel) == FE_K_DIR / rel
    goethite = read_reference_cached(rel, "Goethite")
    assert goethite.normalized and goethite.energy[0] == pytest.approx(7090.0)
    with pytest.raises(ValueError, match="name a column"):
        read_reference_cached(rel)
    with pytest.raises(FileNotFoundError):
        resolve_reference_path("nowhere/missing.xdi")


def test_config_errors_name_the_yaml_path():
    with pytest.raises(ConfigError) as err:
        load_config(text="consumers:\n  - {name: u, class: unmixing, params: {preprocess: {derivative: true}}}\n", environ={})
    assert "consumers[0].params" in str(err.value) and "derivative" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(text="consumers:\n  - {name: e, class: embedding, params: {preprocess: {energy_window: [7200, 7100]}}}\n",
                    environ={})
    assert "consumers[0].params.preprocess" in str(err.value)


def test_a_reference_that_does_not_cover_the_window_sits_the_run_out(steel):
    r = replay("consumers:\n  - {name: unmix, class: unmixing, params: {n_components: 0, "
               "references: [{path: hxn_library/FeLibNov2021.nor, column: Goethite}]}}\n", steel)
    slot = r.store.get(r.uid).slots[0]
    assert not slot.active and "covers 7090.0-7199.7 eV" in slot.inactive_reason
    ok = replay("consumers:\n  - {name: unmix, class: unmixing, params: {n_components: 0, "
                "preprocess: {energy_window: [7100, 7190]}, "
                "references: [{path: hxn_library/FeLibNov2021.nor, column: Goethite}, "
                "{path: hxn_library/FeLibNov2021.nor, column: Magnetite}]}}\n", steel)
    assert np.isfinite(ok.get("unmix", "abundance_1")).all()


def test_energy_axis_from_config_when_the_descriptor_has_none(steel):
    from beamlens.consumers.base import Buffers, RunInfo, SignalInfo
    from beamlens.consumers.unmixing import UnmixingConsumer, UnmixingParams

    descriptor = {"data_keys": {"spectrum": {"dtype": "array", "shape": [400], "source": "sim"}}, "configuration": {}}
    info = SignalInfo("spectrum", "event", (400,), "float64", descriptor=descriptor)
    bare = UnmixingConsumer(UnmixingParams(n_components=2), RunInfo("u", (4,), {}))
    specs = bare.signal(info)
    assert bare.energy is None and [s.axis for s in specs if s.name == "components"] == ["pixel"]
    assert bare.run.axes["pixel"][1] == "px" and bare.prep.mode == "max"  # no axis: channel index, max-normalised
    given = UnmixingConsumer(UnmixingParams(n_components=2, preprocess={"energy_range": (7070, 7240)}), RunInfo("u", (4,), {}))
    given.buffers = Buffers.allocate(given.signal(info), 4)
    np.testing.assert_allclose(given.energy, steel.energy)
    assert given.run.axes["energy"][1] == "eV"
