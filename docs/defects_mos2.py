"""Draw docs/defects_mos2.png: what the shipped defect network finds on the real MoS2 HAADF frames
(models/data/stem_mos2_scilink), next to the FFT automatic labelling.

    python docs/defects_mos2.py            # writes docs/defects_mos2.png, prints counts as JSON
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from beamlens.models.defect_net import REAL_FRAMES_DIR, DefectNet, find_defects, load_card, load_session
from beamlens.models.fft_labels import fft_defect_labels


def main() -> None:
    card = load_card()
    net = DefectNet(load_session(providers=["CPUExecutionProvider"]), card)
    post = card["postprocessing"]
    paths = sorted(REAL_FRAMES_DIR.glob("*.npy"))
    fig = Figure(figsize=(11, 5.6 * len(paths)), dpi=60, layout="constrained")
    axes = fig.subplots(len(paths), 2, squeeze=False)
    summary = {}
    for row, path in zip(axes, paths):
        frame = np.load(path)
        prob = net.probability(frame[None])[0]
        centres = find_defects(prob, post["threshold"], post["min_area_px"], post["max_area_px"])
        fft = fft_defect_labels(frame)
        summary[path.stem] = {"defects": len(centres), "fft_labelled_fraction": round(fft.fraction, 4),
                              "network_pixel_fraction": round(float((prob > post["threshold"]).mean()), 4)}
        ax = row[0]
        ax.imshow(frame, cmap="gray", interpolation="nearest")
        ax.contour(fft.mask, levels=[0.5], colors="tab:orange", linewidths=0.6)
        ax.scatter(centres[:, 1], centres[:, 0], s=160, facecolors="none", edgecolors="cyan", linewidths=1.2)
        ax.set_title(f"{path.stem}: {len(centres)} defects (cyan: network; orange: FFT labels "
                     f"{100 * fft.fraction:.1f} % px)", fontsize="small")
        ax.set_axis_off()
        im = row[1].imshow(prob, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        row[1].set_title("network defect probability", fontsize="small")
        row[1].set_axis_off()
        fig.colorbar(im, ax=row[1], shrink=0.8)
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
