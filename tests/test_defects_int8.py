"""The int8 variant of the shipped defect network: its card, its held-out precision and recall beside
the fp32 network's on the same frames, and its selection in the consumer's config."""
from __future__ import annotations

import math

import numpy as np
import pytest

from beamlens.models.defect_net import (MODELS, DefectNet, available_cores, cgroup_cpu_limit, evaluate, load_card,
                                        load_session, provider_entries, sha256_file)
from beamlens.models.quantize_defects import MAX_LOSS

from defects_helpers import feed, make_consumer

HELD_OUT_SEED = 2025  # neither the calibration (random_params, seed 7) nor the card's evaluation (seed 1000)


def test_int8_model_matches_its_card_and_records_its_source():
    path, card_path = MODELS["int8"]
    card, fp32 = load_card(card_path), load_card(MODELS["fp32"][1])
    assert sha256_file(path) == card["sha256"] and path.stat().st_size == card["size_bytes"]
    assert card["quantisation"]["source"]["sha256"] == fp32["sha256"]
    assert card["input"] == fp32["input"] and card["postprocessing"] == fp32["postprocessing"]
    m8, m32 = card["metrics"]["held_out_simulated"], card["metrics"]["held_out_simulated_fp32"]
    assert m32["precision"] - m8["precision"] <= MAX_LOSS and m32["recall"] - m8["recall"] <= MAX_LOSS


def test_int8_keeps_precision_and_recall_of_fp32_on_fresh_held_out_frames():
    nets = {k: DefectNet(load_session(p, load_card(c), ["CPUExecutionProvider"], threads=1), load_card(c))
            for k, (p, c) in MODELS.items()}
    m = {k: evaluate(net, 12, HELD_OUT_SEED) for k, net in nets.items()}
    assert m["fp32"]["defects"] >= 100
    for figure in ("precision", "recall"):
        assert m["fp32"][figure] - m["int8"][figure] <= MAX_LOSS, m


def test_consumer_runs_the_int8_network_when_configured():
    from beamlens.models.stem_sim import Movie, MovieParams

    frames = np.stack([f for f, _ in Movie(MovieParams(), seed=HELD_OUT_SEED).frames(8)])
    results = {}
    for precision in ("fp32", "int8"):
        consumer, info = make_consumer(frames.shape[1:], len(frames), precision=precision, fit_after=20)
        assert consumer.model_sha256 == load_card(MODELS[precision][1])["sha256"]
        feed(consumer, info, frames)
        results[precision] = consumer.buffers.total.copy()
    np.testing.assert_allclose(results["int8"], results["fp32"], atol=1)  # a defect more or less per frame at most


def test_thread_count_follows_the_cores_this_process_may_use():
    import os

    quota = cgroup_cpu_limit()
    affinity = len(os.sched_getaffinity(0))
    assert available_cores() == (affinity if quota is None else max(1, min(affinity, math.ceil(quota - 1e-9))))
    session = load_session(providers=["CPUExecutionProvider"], threads=0)
    assert session.get_session_options().intra_op_num_threads == available_cores()
    assert load_session(providers=["CPUExecutionProvider"], threads=1).get_session_options().intra_op_num_threads == 1


def test_unknown_precision_is_a_config_error():
    from pydantic import ValidationError

    from beamlens.consumers.defects import DefectsConsumer
    with pytest.raises(ValidationError):
        DefectsConsumer.Params(precision="fp16")


def test_cgroup_cpu_quota_caps_the_cores(tmp_path):
    """cgroup v2 cpu.max and v1 cfs quota along the process's cgroup path: the smallest counts."""
    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "kubepods" / "cpu.max").write_text("400000 100000\n")
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "self_v2").write_text("0::/kubepods/pod1\n")
    assert cgroup_cpu_limit(v2, tmp_path / "self_v2") == 1.5
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, tmp_path / "self_v2") == 4.0
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "self_v1").write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_limit(v1, tmp_path / "self_v1") == 2.0
    (tmp_path / "self_none").write_text("2:cpu,cpuacct:/elsewhere\n")
    assert cgroup_cpu_limit(v1, tmp_path / "self_none") is None  # root unlimited, own cgroup not mounted here
    assert cgroup_cpu_limit(v1, tmp_path / "missing") is None


def test_the_openvino_provider_gets_the_sessions_thread_count():
    """OpenVINO's execution provider sizes its own thread pool to every core of the host unless
    told: it is given the same count as the CPU provider's intra-op threads; other providers go by
    name, in the order given."""
    entries = provider_entries(["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"], 3)
    assert entries == ["CUDAExecutionProvider", ("OpenVINOExecutionProvider", {"num_of_threads": "3"}),
                       "CPUExecutionProvider"]
    session = load_session(providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"], threads=1)
    assert session.get_providers()[-1] == "CPUExecutionProvider"  # this onnxruntime may lack OpenVINO: dropped
