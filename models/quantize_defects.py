"""Quantise the shipped defect network to int8 (static QDQ, per-channel weights) and write its model card.

Run (needs the optional ``train`` extra for the ``onnx`` package that onnxruntime's quantiser uses;
about a minute on 2 cores)::

    python -m beamlens.models.quantize_defects --out models/

Method: onnxruntime's static quantisation (``onnxruntime.quantization.quantize_static``, QDQ format,
per-channel int8 weights, uint8 activations, MinMax calibration) of the same fp32 network that
:mod:`beamlens.models.train_defects` trained and exported (``defect_net.onnx``, sha256-checked
first), after ``quant_pre_process`` (shape inference and graph optimisation; symbolic shape
inference skipped). Calibration frames are simulated with :func:`beamlens.models.stem_sim.random_params`
(varied lattice, contrast, dose and noise, 256 x 256 px, seed ``--calibration-seed``), z-scored as
the card's normalisation says; they are disjoint from the held-out movie both models are scored on
(default movie parameters, seed ``--eval-seed``, as the fp32 card's metrics).

The int8 model is written only if its held-out precision and recall are each within
:data:`MAX_LOSS` of the fp32 model's on the same frames; otherwise the script exits non-zero and
writes nothing. Its card (``defect_net_int8.json``) is the fp32 card with the file, sha256, size,
the quantisation recipe and both models' held-out metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from .defect_net import CARD_PATH, MODEL_PATH, DefectNet, evaluate, load_card, load_session, normalise, sha256_file
from .stem_sim import Movie, random_params

log = logging.getLogger("beamlens.models.quantize_defects")

INT8_MODEL = "defect_net_int8.onnx"
MAX_LOSS = 0.01
"""Largest drop in held-out precision or recall accepted for the int8 model."""


def calibration_tiles(n: int, tile: int, seed: int) -> np.ndarray:
    """``n`` simulated, z-scored frames of ``tile`` px as float32 ``(n, 1, tile, tile)``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, tile, tile), dtype=np.float32)
    i = 0
    while i < n:
        try:
            movie = Movie(random_params(rng, (tile, tile)), seed=int(rng.integers(2**31)))
        except ValueError:  # a draw that cannot place its defects apart is redrawn
            continue
        img, _ = movie.render()
        out[i, 0] = normalise(img)
        i += 1
    return out


def quantize(out: Path, n_calibration: int = 48, calibration_seed: int = 7, eval_frames: int = 40,
             eval_seed: int = 1000) -> dict:
    """Quantise, score both models, write ``defect_net_int8.onnx`` + card if within :data:`MAX_LOSS`.

    Raises:
        SystemExit: if the int8 model loses more than :data:`MAX_LOSS` precision or recall.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    card = load_card(CARD_PATH)
    fp32 = DefectNet(load_session(MODEL_PATH, card, ["CPUExecutionProvider"]), card)  # sha256 checked
    tile = int(card["input"]["tile"])
    tiles = calibration_tiles(n_calibration, tile, calibration_seed)
    name = card["input"]["name"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(tiles[i:i + 1] for i in range(len(tiles)))

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {name: batch}

    target = out / INT8_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(MODEL_PATH), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(Path(tmp) / INT8_MODEL), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        data = (Path(tmp) / INT8_MODEL).read_bytes()
    int8_card = {**card, "name": "defect_net_int8", "file": INT8_MODEL, "size_bytes": len(data)}
    int8_card["task"] = card["task"] + " (int8 static quantisation of defect_net)"
    tmp_model = out / (INT8_MODEL + ".tmp")
    tmp_model.write_bytes(data)
    try:
        int8_card["sha256"] = sha256_file(tmp_model)
        int8 = DefectNet(load_session(tmp_model, int8_card, ["CPUExecutionProvider"]), int8_card)
        m32 = evaluate(fp32, eval_frames, eval_seed)
        m8 = evaluate(int8, eval_frames, eval_seed)
        log.info("held out: fp32 %s, int8 %s", m32, m8)
        if m32["precision"] - m8["precision"] > MAX_LOSS or m32["recall"] - m8["recall"] > MAX_LOSS:
            raise SystemExit(f"int8 model refused: precision {m8['precision']:.4f} / recall {m8['recall']:.4f} "
                             f"vs fp32 {m32['precision']:.4f} / {m32['recall']:.4f} (more than {MAX_LOSS} lost)")
        tmp_model.replace(target)
    finally:
        tmp_model.unlink(missing_ok=True)
    import onnxruntime

    int8_card["quantisation"] = {
        "source": {"file": card["file"], "sha256": card["sha256"]},
        "method": "onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax",
        "preprocess": "onnxruntime.quantization.shape_inference.quant_pre_process(skip_symbolic_shape=True)",
        "calibration": f"{n_calibration} simulated frames of {tile} px from beamlens.models.stem_sim.random_params, "
                       f"seed {calibration_seed}, z-scored per frame",
        "onnxruntime": onnxruntime.__version__,
        "max_loss": MAX_LOSS,
    }
    int8_card["metrics"] = {"held_out_simulated": m8, "held_out_simulated_fp32": m32}
    (out / "defect_net_int8.json").write_text(json.dumps(int8_card, indent=2) + "\n")
    (out / "defect_net_int8.md").write_text(model_card_markdown(int8_card))
    log.info("wrote %s (%d bytes)", target, len(data))
    return int8_card


def model_card_markdown(card: dict) -> str:
    """The int8 model card as Markdown (the JSON file is the machine-readable one)."""
    m8, m32 = card["metrics"]["held_out_simulated"], card["metrics"]["held_out_simulated_fp32"]
    q = card["quantisation"]
    return f"""# Model card: {card['name']}

- Task: {card['task']}.
- File: `{card['file']}`, {card['size_bytes']} bytes, sha256 `{card['sha256']}` (checked at load).
- Made from `{q['source']['file']}` (sha256 `{q['source']['sha256']}`, see `defect_net.md` for its
  training) by {q['method']}; preprocessing {q['preprocess']}; calibration: {q['calibration']};
  onnxruntime {q['onnxruntime']}.
- Input, output, normalisation and post-processing: as `defect_net` (float32 in and out; the graph
  quantises and dequantises inside).
- Held-out simulated frames ({m8['frames']} frames, {m8['defects']} defects, default movie parameters,
  match radius {m8['match_radius_px']:.2f} px): precision {m8['precision']:.4f}, recall {m8['recall']:.4f}
  (fp32 on the same frames: {m32['precision']:.4f}, {m32['recall']:.4f}; accepted only within {q['max_loss']}).
- Select it with the defects consumer's `precision: int8` parameter. Faster where the CPU has int8
  dot-product instructions (AVX512-VNNI, AMX); see `benchmarks/defects.py`.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--calibration-frames", type=int, default=48)
    ap.add_argument("--calibration-seed", type=int, default=7)
    ap.add_argument("--eval-frames", type=int, default=40)
    ap.add_argument("--eval-seed", type=int, default=1000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    quantize(args.out, args.calibration_frames, args.calibration_seed, args.eval_frames, args.eval_seed)


if __name__ == "__main__":
    main()
