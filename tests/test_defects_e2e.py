"""End to end: the simulated microscope streams a defect movie over ZeroMQ (array-1.0) into the
daemon; the shipped network finds the defects frame by frame, and the counts appear in /metrics."""
from __future__ import annotations

import numpy as np

from frame_helpers import defects_movie_daemon
from helpers import scrape

N = 24


def test_movie_streams_through_the_daemon_and_counts_reach_metrics(make_daemon):
    daemon, truth = defects_movie_daemon(make_daemon, N)
    (run,) = daemon.store.summaries()
    assert run["plan_name"] == "frame_series" and run["frames_done"] == N and run["nav_shape"] == [N]
    assert run["consumers"]["defects"]["active"]

    total = daemon.store.snapshot(run["uid"], "defects", "total").data
    true_counts = np.array([len(t.ids) for t in truth])
    # the network finds each frame's defects (precision/recall are tested on held-out frames elsewhere)
    assert np.abs(total - true_counts).max() <= max(2, 0.1 * true_counts.max())

    metrics = scrape(daemon.http.url)
    per_class = [v for (name, labels), v in metrics.items()
                 if name == "beamlens_defects" and ("consumer", "defects") in labels]
    assert len(per_class) == 3 and sum(per_class) == total[-1]
    density = metrics[("beamlens_defect_density_per_square_pixel", (("consumer", "defects"), ("index", "0")))]
    assert density == total[-1] / (256 * 256)
