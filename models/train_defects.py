"""Train the defect-segmentation network on simulated frames, export ONNX and write its model card.

Run (needs the optional ``train`` extra, i.e. PyTorch; CPU is enough, about 10 CPU-minutes)::

    nice -n 10 python -m beamlens.models.train_defects --seed 0 --out models/

Method (after Maksov et al., npj Comput. Mater. 5, 12 (2019) and pycroscopy DefectNet): a small
U-Net-like fully convolutional network maps a z-scored frame to per-pixel defect probability. Labels
come from the simulator (:mod:`beamlens.models.stem_sim`): a disk of radius ``max(3, 0.2 a)`` px at
each defect column. Training frames vary lattice constant (15-26 px), rotation, column width,
contrast, dose (4-150 counts), background, contamination, drift, scan distortion and scan-line
gain noise, so that the
network also runs on real HAADF frames (checked on ``models/data/stem_mos2_scilink``). Loss: binary
cross-entropy plus soft Dice; Adam. Deterministic: seeded numpy and torch, deterministic algorithms,
a fixed thread count.

The card records the tile size, normalisation, output, training data, the held-out precision/recall
(matching within half the column spacing, as in the tests) and the ONNX file's sha256.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .defect_net import DefectNet, evaluate, load_session, sha256_file
from .stem_sim import KINDS, Movie, MovieParams, random_params

log = logging.getLogger("beamlens.models.train_defects")

TILE = 256
OVERLAP = 32
THRESHOLD = 0.5
MIN_AREA = 4


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DefectUNet(nn.Module):
    """U-Net with three poolings (receptive field about 70 px, several lattice periods).

    Input ``(n, 1, H, W)`` float32 (H, W multiples of 8); output ``(n, 1, H, W)`` logits (training)
    or probabilities (``probabilities=True``, as exported).
    """

    def __init__(self, c: int = 12, probabilities: bool = False):
        super().__init__()
        self.probabilities = probabilities
        self.e1, self.e2, self.e3 = _block(1, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        self.bottom = _block(4 * c, 4 * c)
        self.pool = nn.MaxPool2d(2)
        self.u3 = nn.ConvTranspose2d(4 * c, 4 * c, 2, stride=2)
        self.d3 = _block(8 * c, 2 * c)
        self.u2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)
        self.d2 = _block(4 * c, c)
        self.u1 = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.d1 = _block(2 * c, c)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.e1(x)
        s2 = self.e2(self.pool(s1))
        s3 = self.e3(self.pool(s2))
        b = self.bottom(self.pool(s3))
        y = self.d3(torch.cat([self.u3(b), s3], 1))
        y = self.d2(torch.cat([self.u2(y), s2], 1))
        y = self.d1(torch.cat([self.u1(y), s1], 1))
        y = self.head(y)
        return torch.sigmoid(y) if self.probabilities else y


def label_disks(shape: tuple[int, int], positions: np.ndarray, radius: float) -> np.ndarray:
    """Float32 ``(rows, cols)`` map with 1 inside a disk of ``radius`` px at each position."""
    yy, xx = np.indices(shape)
    out = np.zeros(shape, dtype=np.float32)
    for r, c in positions:
        out[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = 1.0
    return out


def make_dataset(n: int, shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` simulated frames with varied parameters: z-scored images and disk labels, both float32
    ``(n, 1, *shape)``. Each frame comes from its own movie, a random number of steps in."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, 1, *shape), dtype=np.float32)
    y = np.empty((n, 1, *shape), dtype=np.float32)
    for i in range(n):
        while True:  # a draw that cannot place its defects far enough apart is redrawn
            params = random_params(rng, shape)
            try:
                movie = Movie(params, seed=int(rng.integers(2**31)))
                break
            except ValueError:
                continue
        for _ in range(int(rng.integers(0, 3))):
            movie.step()
        img, truth = movie.render()
        img = img.astype(np.float32)
        x[i, 0] = (img - img.mean()) / img.std()
        y[i, 0] = label_disks(shape, truth.positions, max(3.0, 0.2 * params.lattice.lattice_px))
    return x, y


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90-degree rotations of a batch (same for image and label)."""
    k = int(torch.randint(4, (1,), generator=gen))
    x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(3), y.flip(3)
    return x.contiguous(), y.contiguous()


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0))
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def train(out: Path, seed: int = 0, n_train: int = 1500, crop: int = 96, iterations: int = 1200,
          batch: int = 12, channels: int = 8, threads: int = 2) -> dict:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    t0 = time.time()
    x, y = make_dataset(n_train, (crop, crop), seed)
    log.info("dataset: %d frames of %d px in %.0f s (defect pixel fraction %.3f)", n_train, crop, time.time() - t0, y.mean())
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = DefectUNet(channels)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=iterations)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for it in range(iterations):
        idx = torch.randint(n_train, (batch,), generator=gen)
        xb, yb = augment(xt[idx], yt[idx], gen)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iterations - 1:
            log.info("iteration %d loss %.4f (%.0f s)", it, loss.item(), time.time() - t0)
    train_s = time.time() - t0

    model.eval()
    model.probabilities = True
    onnx_path = out / "defect_net.onnx"
    dummy = torch.zeros(1, 1, TILE, TILE)
    torch.onnx.export(model, (dummy,), str(onnx_path), input_names=["image"], output_names=["probability"],
                      dynamic_axes={"image": {0: "n"}, "probability": {0: "n"}}, opset_version=17, dynamo=False)
    card = {
        "name": "defect_net",
        "task": "per-pixel point-defect probability in atomically resolved HAADF-STEM frames of TMD monolayers",
        "method": "Maksov et al., npj Comput. Mater. 5, 12 (2019), doi:10.1038/s41524-019-0152-9; U-Net-like FCN",
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input": {"name": "image", "shape": ["n", 1, TILE, TILE], "dtype": "float32", "tile": TILE, "overlap": OVERLAP,
                  "normalisation": "per frame: (x - mean(frame)) / std(frame), before tiling",
                  "pixel_size": "lattice constant 15-26 px (MoS2 at 0.012-0.021 nm/px)"},
        "output": {"name": "probability", "shape": ["n", 1, TILE, TILE], "dtype": "float32",
                   "meaning": "probability that the pixel lies within max(3, 0.2 a) px of a defect column"},
        "postprocessing": {"threshold": THRESHOLD, "min_area_px": MIN_AREA, "max_area_px": 700,
                           "centre": "probability-weighted centre of mass of 8-connected blobs"},
        "training": {
            "data": f"{n_train} simulated frames of {crop} x {crop} px from beamlens.models.stem_sim.random_params "
                    f"(kinds {list(KINDS)}; varied lattice, contrast, dose, noise, drift, scan distortion); "
                    "labels from the simulator's exact defect positions",
            "seed": seed, "iterations": iterations, "batch": batch, "optimizer": "Adam, one-cycle lr 3e-3",
            "loss": "BCE (pos_weight 3) + soft Dice", "augmentation": "flips, 90-degree rotations",
            "torch": torch.__version__, "cpu_seconds_wall": round(train_s, 1), "channels": channels,
        },
        "default_movie": asdict(MovieParams()),
    }
    net = DefectNet(load_session(onnx_path, card, providers=["CPUExecutionProvider"]), card)
    card["metrics"] = {"held_out_simulated": evaluate(net, 40, seed + 1000)}
    (out / "defect_net.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "defect_net.md").write_text(model_card_markdown(card))
    log.info("wrote %s (%d bytes), metrics %s", onnx_path, card["size_bytes"], card["metrics"])
    return card


def model_card_markdown(card: dict) -> str:
    """The model card as Markdown (the JSON file is the machine-readable one)."""
    m = card["metrics"]["held_out_simulated"]
    inp, outp, tr = card["input"], card["output"], card["training"]
    return f"""# Model card: {card['name']}

- Task: {card['task']}.
- Method: {card['method']}.
- File: `{card['file']}`, {card['size_bytes']} bytes, {card['parameters']} parameters,
  sha256 `{card['sha256']}` (checked at load; a different file is refused).
- Input `{inp['name']}`: {inp['dtype']} {inp['shape']}; normalisation: {inp['normalisation']}.
  Frames larger than {inp['tile']} px are tiled with {inp['overlap']} px overlap and stitched.
  Scale: {inp['pixel_size']}.
- Output `{outp['name']}`: {outp['dtype']} {outp['shape']}, {outp['meaning']}.
- Post-processing: threshold {card['postprocessing']['threshold']}, blobs of
  {card['postprocessing']['min_area_px']}-{card['postprocessing']['max_area_px']} px, {card['postprocessing']['centre']}.
- Training data: {tr['data']}.
- Training: seed {tr['seed']}, {tr['iterations']} iterations of batch {tr['batch']}, {tr['optimizer']},
  {tr['loss']}, {tr['augmentation']}; PyTorch {tr['torch']}, {tr['cpu_seconds_wall']} s on 2 CPU threads.
- Held-out simulated frames ({m['frames']} frames, {m['defects']} defects, default movie parameters,
  match radius {m['match_radius_px']:.2f} px): precision {m['precision']:.3f}, recall {m['recall']:.3f}.
- Limits: trained on simulation only; flags any non-periodic feature of defect size (contamination,
  adatoms) as a defect; extended defects (holes, grain boundaries) give large blobs that are discarded.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=1200)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.out, seed=args.seed, n_train=args.n_train, iterations=args.iterations, threads=args.threads)


if __name__ == "__main__":
    main()
