"""Signal axes of any kind from the descriptor, units carried into results, normalisations."""
from __future__ import annotations

import numpy as np
import pytest

from beamlens.consumers.base import NotApplicable, RunInfo, SignalInfo
from beamlens.consumers.spectral.preprocess import Preprocessor, PreprocessParams, axis_kind_of, signal_axis
from beamlens.consumers.unmixing import UnmixingConsumer, UnmixingParams
from beamlens.daemon.sim.datasets import SpectralMap

from spectral_replay import replay


def descriptor(axis_key: str | None, values: np.ndarray, units: str | None = None, dims: list[str] | None = None,
               extra: dict | None = None) -> dict:
    key = {"dtype": "array", "shape": [len(values)], "source": "sim", **({"dims": dims} if dims else {})}
    data = {} if axis_key is None else {axis_key: values.tolist()}
    meta = {} if axis_key is None else {axis_key: {"dtype": "array", "shape": [len(values)], "source": "sim",
                                                   **({"units": units} if units else {})}}
    data.update(extra or {})
    return {"data_keys": {"pattern": key}, "configuration": {"det": {"data": data, "data_keys": meta}}}


@pytest.mark.parametrize(("key", "kind", "units"), [
    ("xas_energy", "energy", "eV"), ("det_tth", "two_theta", "deg"), ("two_theta", "two_theta", "deg"),
    ("saxs_q", "q", "1/angstrom"), ("pdf_d", "d", "angstrom"), ("raman_wavelength", "wavelength", "nm"),
])
def test_axis_kind_from_the_key_and_its_units(key, kind, units):
    values = np.linspace(1, 2, 50)
    axis = signal_axis(descriptor(key, values), "pattern", 50)
    assert (axis.kind, axis.units, axis.source) == (kind, units, key)
    np.testing.assert_allclose(axis.values, values)
    assert axis_kind_of("frequency") is None  # ends in q's letter, not in _q


def test_dims_name_the_axis_and_units_are_converted():
    values = np.linspace(7.0, 7.2, 30)
    d = descriptor("mono_energy", values, units="keV", dims=["energy"], extra={"det_tth": np.arange(30.0).tolist()})
    axis = signal_axis(d, "pattern", 30)
    assert axis.kind == "energy" and axis.source == "mono_energy"
    np.testing.assert_allclose(axis.values, values * 1000)  # keV -> eV
    q = signal_axis(descriptor("det_q", np.linspace(1, 5, 30), units="1/nm"), "pattern", 30)
    np.testing.assert_allclose(q.values, np.linspace(0.1, 0.5, 30))
    with pytest.raises(ValueError, match="units 'furlong'"):
        signal_axis(descriptor("det_q", np.linspace(1, 5, 30), units="furlong"), "pattern", 30)
    assert signal_axis(descriptor(None, np.zeros(30)), "pattern", 30) is None
    assert signal_axis(descriptor("det_tth", np.arange(29.0)), "pattern", 30) is None  # wrong length


def test_normalisations_and_their_defaults():
    x = np.abs(np.random.default_rng(0).normal(size=(5, 40))) + 0.1
    tth = np.linspace(10, 50, 40)
    auto = Preprocessor(PreprocessParams(), tth, 40, "two_theta")
    assert auto.mode == "max"
    y, ok, _ = auto(x)
    assert ok.all() and np.allclose(y.max(axis=1), 1)
    y, _, _ = Preprocessor(PreprocessParams(normalize="area"), tth, 40, "two_theta")(x)
    np.testing.assert_allclose(np.trapezoid(y, tth, axis=1), 1.0)
    y, _, _ = Preprocessor(PreprocessParams(normalize="l2"), tth, 40, "two_theta")(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0)
    zero = x.copy()
    zero[2] = 0
    prep = Preprocessor(PreprocessParams(normalize="max"), tth, 40, "two_theta")
    _, ok, dropped = prep(zero)
    assert list(ok) == [True, True, False, True, True] and dropped[2] and prep.drop_reason == "no_signal"
    assert Preprocessor(PreprocessParams(), np.linspace(7000, 7200, 40), 40, "energy").mode == "none"
    with pytest.raises(ValueError, match="absorption spectra on an energy axis; this run's axis is two_theta"):
        Preprocessor(PreprocessParams(normalize="edge_step"), tth, 40, "two_theta")


def test_edge_step_on_a_diffraction_axis_sits_out_and_references_need_their_axis_kind():
    d = descriptor("det_tth", np.linspace(10, 50, 40))
    info = SignalInfo("pattern", "event", (40,), "float64", descriptor=d)
    c = UnmixingConsumer(UnmixingParams(n_components=2, preprocess={"normalize": "edge_step"}), RunInfo("u", (4,), {}))
    with pytest.raises(NotApplicable, match="energy axis"):
        c.signal(info)
    refs = [{"path": "xasdatalibrary/Hansel2001_goethite_xanes_003.xdi"}]
    c = UnmixingConsumer(UnmixingParams(n_components=1, references=refs), RunInfo("u", (4,), {}))
    with pytest.raises(NotApplicable, match="references are on a energy axis; this run's axis is two_theta"):
        c.signal(info)
    c = UnmixingConsumer(UnmixingParams(n_components=2), RunInfo("u", (4,), {}))
    c.signal(info)
    assert c.lib_names == []  # the Fe K-edge library is an energy library: no matching on 2-theta


def test_units_reach_the_published_buffers():
    rng = np.random.default_rng(1)
    tth = np.linspace(10, 50, 80)
    peaks = np.stack([np.exp(-0.5 * ((tth - c) / 0.4) ** 2) for c in (20, 30, 40)])
    f = rng.dirichlet(np.ones(3), size=60)
    data = SpectralMap("ramp", tth, (f @ peaks + 0.01)[None].astype(np.float32), np.arange(60.0), np.zeros(1), "K", "counts")
    r = replay("consumers:\n  - {name: unmix, class: unmixing, params: {n_components: 3}}\n", data, axis_key="det_tth",
               axis_units="deg")
    snap = r.store.snapshot(r.uid, "unmix", "components")
    assert snap.spec.axis == "two_theta" and snap.axis[1] == "deg"
    np.testing.assert_allclose(snap.axis[0], tth)
    assert snap.spec.description.startswith("component spectra (unit max)")
    assert r.store.snapshot(r.uid, "unmix", "abundance_1").spec.units == "unit-max pattern"
