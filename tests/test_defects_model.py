"""The shipped network matches its model card; a tampered copy is refused."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from beamlens.consumers.defects import DefectsConsumer
from beamlens.consumers.base import RunInfo
from scipy import ndimage

from beamlens.models.defect_net import (CARD_PATH, MODEL_PATH, ModelIntegrityError, Tiling, find_defects, load_card,
                                        load_session, sha256_file)

from defects_helpers import frame_signal


def test_shipped_model_matches_its_card():
    card = load_card()
    assert sha256_file(MODEL_PATH) == card["sha256"]
    assert MODEL_PATH.stat().st_size == card["size_bytes"] < 4 * 2**20
    session = load_session(providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.shape[1:] == card["input"]["shape"][1:] and inp.type == "tensor(float)"
    assert (inp.name, out.name) == (card["input"]["name"], card["output"]["name"])
    prob = session.run(None, {inp.name: np.zeros((2, *inp.shape[1:]), np.float32)})[0]
    assert prob.shape == (2, *inp.shape[1:]) and ((prob >= 0) & (prob <= 1)).all()
    m = card["metrics"]["held_out_simulated"]
    assert m["precision"] >= 0.9 and m["recall"] >= 0.9


def test_tampered_model_is_refused(tmp_path):
    bad = tmp_path / "defect_net.onnx"
    data = bytearray(MODEL_PATH.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    shutil.copy(CARD_PATH, tmp_path / "defect_net.json")
    with pytest.raises(ModelIntegrityError, match="refusing to load .*sha256"):
        load_session(bad, load_card(tmp_path / "defect_net.json"))
    consumer = DefectsConsumer(DefectsConsumer.Params(model=str(bad)), RunInfo("u", (1,), {}))
    with pytest.raises(ModelIntegrityError):
        consumer.signal(frame_signal((256, 256), None))


def test_unavailable_providers_are_refused():
    with pytest.raises(ValueError, match="none of the execution providers"):
        load_session(providers=["NoSuchExecutionProvider"])


def test_find_defects_equals_ndimage_centre_of_mass_with_area_limits():
    rng = np.random.default_rng(1)
    prob = ndimage.gaussian_filter(rng.random((200, 180)), 3)
    prob = (prob - prob.min()) / np.ptp(prob)
    labels, n = ndimage.label(prob > 0.6, structure=np.ones((3, 3)))
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(prob), labels, index)
    expected = np.array(ndimage.center_of_mass(prob, labels, index))[(area >= 5) & (area <= 40)]
    np.testing.assert_allclose(find_defects(prob, 0.6, 5, 40), expected, rtol=0, atol=1e-9)
    assert find_defects(np.zeros((10, 10))).shape == (0, 2)


@pytest.mark.parametrize("shape", [(256, 256), (300, 512), (600, 257)])
def test_tiles_cover_the_frame_and_stitch_back_exactly(shape):
    tiling = Tiling(shape, 256, 32)
    frame = np.random.default_rng(0).random(shape).astype(np.float32)
    tiles = np.empty((len(tiling.origins), 1, 256, 256), np.float32)
    tiling.cut(frame, tiles)
    out = np.full(shape, np.nan, np.float32)
    tiling.stitch(tiles, out)
    np.testing.assert_array_equal(out, frame)
