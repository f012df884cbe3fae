"""stats and pca: results equal plain numpy / scikit-learn on the whole data, whatever the batching."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from beamlens.daemon.sim.datasets import corroding_steel_map, stxm_map
from helpers import map_run_documents, route_in_process

CONFIG = """
router: {{max_page_size: {page}}}
consumers:
  - {{name: stats, class: stats}}
  - {{name: pca, class: pca, params: {{n_components: 3, batch_size: 32}}}}
"""


@pytest.fixture(scope="module")
def steel():
    return corroding_steel_map()


def run_map(steel, *, page_size=256, doc_page=None):
    spectra = steel.spectra.reshape(-1, steel.spectra.shape[-1]).astype(np.float64)
    docs = map_run_documents(spectra, shape=steel.shape, energy=steel.energy, page=doc_page)
    _, store, metrics = route_in_process(CONFIG.format(page=page_size), docs)
    return docs[0][1]["uid"], store, metrics


def test_stats_equal_numpy_for_any_batching(steel):
    expected = steel.spectra.astype(np.float64)
    results = []
    for page_size, doc_page in [(1, None), (256, None), (256, 50)]:
        uid, store, _ = run_map(steel, page_size=page_size, doc_page=doc_page)
        total = store.snapshot(uid, "stats", "total").data
        np.testing.assert_allclose(total, expected.sum(-1), rtol=1e-12)
        np.testing.assert_allclose(store.snapshot(uid, "stats", "max").data, expected.max(-1), rtol=1e-12)
        np.testing.assert_allclose(store.snapshot(uid, "stats", "mean").data, expected.mean(-1), rtol=1e-12)
        results.append(store.snapshot(uid, "pca", "score_1").data)
    # IncrementalPCA batches are the consumer's own: page boundaries do not change the answer
    np.testing.assert_allclose(results[0], results[1], atol=1e-10)
    np.testing.assert_allclose(results[0], results[2], atol=1e-10)


def assert_scores_match_batch_pca(store, uid, x, n_components, min_corr):
    batch = PCA(n_components=n_components).fit(x)
    ref_scores = batch.transform(x)
    for i in range(n_components):
        got = store.snapshot(uid, "pca", f"score_{i + 1}").data.ravel()
        corr = abs(np.corrcoef(got, ref_scores[:, i])[0, 1])  # equal up to sign
        assert corr > min_corr, (i, corr)
    evr = store.snapshot(uid, "pca", "explained_variance_ratio").data
    np.testing.assert_allclose(evr[:n_components], batch.explained_variance_ratio_, atol=1e-3)
    return evr


def test_incremental_pca_matches_batch_pca_on_real_stxm():
    stxm = stxm_map().region(slice(50, 90), slice(30, 70))  # 1600 spectra, 3 significant components
    x = stxm.spectra.reshape(-1, stxm.spectra.shape[-1]).astype(np.float64)
    docs = map_run_documents(x, shape=stxm.shape, energy=stxm.energy)
    _, store, metrics = route_in_process(CONFIG.format(page=256), docs)
    uid = docs[0][1]["uid"]
    evr = assert_scores_match_batch_pca(store, uid, x, 3, min_corr=0.999)
    comps = store.snapshot(uid, "pca", "components")
    assert comps.axis is not None and comps.axis[1] == "eV" and comps.axis[0][0] == pytest.approx(700.0)
    value = metrics.registry.get_sample_value("beamlens_explained_variance_ratio", {"consumer": "pca", "index": "0"})
    assert value == pytest.approx(evr[0])


def test_incremental_pca_matches_batch_pca_on_three_phase_map(steel):
    # three phases with fractions summing to one span a 2-D centred subspace: the 3rd PC is noise
    uid, store, _ = run_map(steel)
    x = steel.spectra.reshape(-1, steel.spectra.shape[-1]).astype(np.float64)
    assert_scores_match_batch_pca(store, uid, x, 2, min_corr=0.9999)


def test_run_of_unknown_length_grows(steel):
    spectra = steel.spectra.reshape(-1, steel.spectra.shape[-1])[:1500 % 441 + 40].astype(np.float64)
    docs = map_run_documents(spectra)
    docs[0][1].pop("num_points")
    _, store, _ = route_in_process(CONFIG.format(page=16), docs)
    uid = docs[0][1]["uid"]
    total = store.snapshot(uid, "stats", "total").data
    assert total.shape == (len(spectra),)
    np.testing.assert_allclose(total, spectra.sum(-1), rtol=1e-12)
