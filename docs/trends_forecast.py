"""Draw docs/trends_forecast.png: the trends model's forecasts on real cells (Baumhöfer 2014, the
prior learned from the other cells, as benchmarks/trends.py does) and the features consumer on a
simulated electrode cross-section (daemon/sim/electrode.py) with its segmentation.

    python docs/trends_forecast.py          # writes docs/trends_forecast.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from beamlens.consumers.features import FeaturesParams, phase_features, segment
from beamlens.consumers.trend_model import TrendModel, first_crossing, learn_prior
from beamlens.daemon.sim.electrode import ElectrodeGenerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trends import DEFAULT_CSV, FLOOR, FRACTION, THRESHOLD, linear_last3, load_cells  # noqa: E402

CELLS = ("ep_sanyo_002", "ep_sanyo_013", "ep_sanyo_026")


def main() -> None:
    cells = load_cells(DEFAULT_CSV)
    fig = Figure(figsize=(15, 8), dpi=70, layout="constrained")
    top = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    axes = top[0].subplots(1, len(CELLS), sharey=True)
    for ax, cell in zip(axes, CELLS):
        x, y = cells[cell]
        truth = first_crossing(x, y, THRESHOLD)
        cut = x <= FRACTION * truth
        model = TrendModel(prior=learn_prior([v for k, v in cells.items() if k != cell], floor=FLOOR))
        model.add(x[cut], y[cut])
        f = model.forecast(np.linspace(0, 2400, 400))
        c = model.crossing(THRESHOLD)
        lin = linear_last3(x[cut], y[cut], THRESHOLD)
        ax.fill_between(f.x, f.lower, f.upper, color="tab:blue", alpha=0.2, label="GP ±2σ")
        ax.plot(f.x, f.mean, color="tab:blue", label="GP mean (prior: the other 35 cells)")
        slope, icpt = np.polyfit(x[cut][-3:], y[cut][-3:], 1)
        ax.plot([x[cut][-3], 2400], [slope * x[cut][-3] + icpt, slope * 2400 + icpt], "--", color="tab:orange",
                label="linear, last 3 check-ups")
        ax.plot(x[cut], y[cut], "o", color="k", label="check-ups used")
        ax.plot(x[~cut], y[~cut], "o", mfc="none", color="grey", label="later check-ups (truth)")
        ax.axhline(THRESHOLD, color="tab:red", lw=1)
        ax.axvspan(c.pessimistic, min(c.optimistic, 2400), color="tab:blue", alpha=0.08)
        ax.set_title(f"{cell}: 80 % at {truth:.0f}; GP {c.mean:.0f} [{c.pessimistic:.0f}, {c.optimistic:.0f}], "
                     f"linear {lin:.0f}", fontsize=9)
        ax.set_xlabel("cycle")
        ax.set_ylim(0.5, 1.02)
    axes[0].set_ylabel("capacity / first check-up")
    axes[0].legend(fontsize=8, loc="lower left")
    gen = ElectrodeGenerator(seed=3)
    bottom = top[1].subplots(1, 4)
    for ax, cycle in zip(bottom[:2], (0, 1500)):
        img, _ = gen.frame(cycle)
        ax.imshow(img, cmap="gray")
        ax.set_title(f"simulated cross-section, cycle {cycle}", fontsize=9)
        ax.axis("off")
    img, truth = gen.frame(1500)
    bottom[2].imshow(segment(img, FeaturesParams()), cmap="viridis", interpolation="nearest")
    bottom[2].set_title("segmentation: pore / particle / surface layer", fontsize=9)
    bottom[2].axis("off")
    cycles = np.array([0, 50, 100, 200, 300, 400, 600, 800, 1000])
    # measured by the features consumer's segmentation, not taken from the generator's truth
    area = [phase_features(segment(gen.frame(int(c))[0], FeaturesParams()), gen.pixel_size_um)["mean_particle_area"]
            for c in cycles]
    model = TrendModel(log_x=True, refit_every=1)
    model.add(cycles, area)
    f = model.forecast(np.linspace(0, 2000, 200))
    ax = bottom[3]
    ax.fill_between(f.x, f.lower, f.upper, alpha=0.2)
    ax.plot(f.x, f.mean, label="GP (log cycle axis)")
    ax.plot(cycles, area, "ko", label="features consumer")
    later = np.array([1200, 1500, 2000])
    ax.plot(later, [gen.frame(int(c))[1].mean_particle_area for c in later], "o", mfc="none", color="grey",
            label="later frames (truth)")
    ax.set_xlabel("cycle")
    ax.set_ylabel("mean particle area (µm²)")
    ax.legend(fontsize=8)
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out)
    print(out)


if __name__ == "__main__":
    main()
