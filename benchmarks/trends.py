"""Benchmark: forecasting the cycle at which a real cell's capacity reaches 80 %, from its early
check-ups, with the ``trends`` GP model (:mod:`beamlens.consumers.trend_model`) against a plain
linear extrapolation of the last three check-ups.

Data: 36 Sanyo UR18650E cells of the Baumhöfer et al. 2014 ageing study (``../shared/data/
baumhofer2014_sanyo18650_via_pybop``, MANIFEST §5): capacity check-ups every ~160 cycles to
~2,400 cycles. For each cell, the true 80 % cycle is the linear interpolation between the check-ups
around the first one at or below 80 % of its first capacity; the forecast is made from the
check-ups at cycles up to 60 % of that cycle (4–6 check-ups, all before the knee).

The GP is conditioned on those check-ups with a population prior learned from the OTHER cells
(leave one cell out; the forecast cell is never used for its own prior): their mean capacity curve
as mean function, a time-scale deviation term and SE + white noise, hyper-parameters by maximum
summed marginal likelihood on their check-ups down to 60 % capacity (threshold − 0.2).
A second, stricter figure uses only the cells listed *before* the forecast cell (what a facility
has at the time), for cells with at least ``--min-earlier`` earlier cells.

Figures, over all cells: median absolute error of the forecast 80 % cycle (GP mean and linear peer),
their ratio, and the band coverage: how often the true cycle lies in the forecast band, the cycle
range where the ±2σ band straddles 80 % (from the pessimistic to the optimistic bound's crossing).

Second check (``--tri``): the two Tesla 21700 cells of the TRI PreDiag set (MANIFEST §4), regular
cycles, capacity relative to the mean of the first five; no earlier cells of that type exist, so
the GP has no prior (its default kernel: SE + linear trend + white, hyper-parameters fitted on the
cell's own points). Cell 412 crosses 80 %; cell 233 never does (88 % at its last cycle), so it is
scored at 90 %. Per-cell figures, target null.

Prints one JSON object per figure per line::

    python benchmarks/trends.py [--data CSV] [--tri DIR | --no-tri]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from beamlens.consumers.trend_model import Crossing, TrendModel, first_crossing, learn_prior

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_CSV = SHARED / "baumhofer2014_sanyo18650_via_pybop" / "baumhofer2014_checkup_capacity.csv"
DEFAULT_TRI = SHARED / "tri_prediag_tesla21700_beep"
BENCH = "trends"
THRESHOLD = 0.8
FRACTION = 0.6
FLOOR = THRESHOLD - 0.2


def emit(figure: str, value: float, unit: str, target: str | None = None) -> None:
    v = value if math.isfinite(value) else str(value)
    print(json.dumps({"benchmark": BENCH, "figure": figure, "value": v, "unit": unit, "target": target}), flush=True)


def load_cells(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{cell_id: (cycle, relative_capacity)}`` sorted by cycle, finite values only, cells in file
    order. Columns: ``cell_id, checkup_index, cycle, capacity_Ah, relative_capacity``."""
    d = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    cells: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for cell in dict.fromkeys(d["cell_id"]):
        r = d[(d["cell_id"] == cell) & np.isfinite(d["relative_capacity"]) & np.isfinite(d["cycle"])]
        o = np.argsort(r["cycle"], kind="stable")
        cells[str(cell)] = (r["cycle"][o].astype(np.float64), r["relative_capacity"][o].astype(np.float64))
    return cells


def linear_last3(x: np.ndarray, y: np.ndarray, threshold: float) -> float:
    """Crossing of the least-squares line through the last three points; inf if not falling."""
    slope, icpt = np.polyfit(x[-3:], y[-3:], 1)
    return math.inf if slope >= 0 else float((threshold - icpt) / slope)


def score(errors: list[float], covered: list[bool]) -> tuple[float, float]:
    return float(np.median(errors)), float(np.mean(covered))


def forecast(earlier: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> Crossing:
    """The GP forecast of the 80 % crossing from ``(x, y)`` with a prior learned from ``earlier``."""
    model = TrendModel(prior=learn_prior(earlier, floor=FLOOR))
    model.add(x, y)
    return model.crossing(THRESHOLD)


def baumhofer(path: Path, min_earlier: int) -> None:
    cells = load_cells(path)
    names = list(cells)
    truth = {c: first_crossing(*cells[c], THRESHOLD) for c in names}
    names = [c for c in names if math.isfinite(truth[c])]
    gp_err, lin_err, covered, widths = [], [], [], []
    early_err, early_cov, early_lin = [], [], []
    t0 = time.perf_counter()
    for i, cell in enumerate(names):
        x, y = cells[cell]
        cut = x <= FRACTION * truth[cell]
        lin = linear_last3(x[cut], y[cut], THRESHOLD)
        lin_err.append(abs(lin - truth[cell]))
        c = forecast([cells[k] for k in names if k != cell], x[cut], y[cut])
        gp_err.append(abs(c.mean - truth[cell]))
        covered.append(c.covers(truth[cell]))
        widths.append(c.optimistic - c.pessimistic)
        logging.info("%s: true %.0f, GP %.0f [%.0f, %.0f], linear %.0f (from %d check-ups)", cell,
                     truth[cell], c.mean, c.pessimistic, c.optimistic, lin, int(cut.sum()))
        if i >= min_earlier:
            e = forecast([cells[k] for k in names[:i]], x[cut], y[cut])
            early_err.append(abs(e.mean - truth[cell]))
            early_cov.append(e.covers(truth[cell]))
            early_lin.append(lin_err[-1])
    gp_med, cov = score(gp_err, covered)
    lin_med = float(np.median(lin_err))
    emit("cells", len(names), "cells")
    emit("gp_median_abs_error_cycles", gp_med, "cycles")
    emit("linear_median_abs_error_cycles", lin_med, "cycles")
    emit("error_ratio_gp_to_linear", gp_med / lin_med, "ratio", "<= 0.7")
    emit("band_coverage", cov, "fraction", ">= 0.8")
    emit("linear_band_coverage", 0.0, "fraction")  # a point forecast has no band
    emit("gp_median_band_width_cycles", float(np.median(widths)), "cycles")
    if early_err:
        e_med, e_cov = score(early_err, early_cov)
        emit("earlier_cells_only_cells", len(early_err), "cells")
        emit("earlier_cells_only_gp_median_abs_error_cycles", e_med, "cycles")
        emit("earlier_cells_only_linear_median_abs_error_cycles", float(np.median(early_lin)), "cycles")
        emit("earlier_cells_only_band_coverage", e_cov, "fraction")
    emit("seconds_per_forecast_with_prior_fit", (time.perf_counter() - t0) / (len(names) + len(early_err)), "s")


def tri_cell(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Regular cycles of one TRI per-cycle CSV: (cycle, capacity / mean of the first five)."""
    d = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    reg = d[(d["cycle_type"] == "regular") & np.isfinite(d["discharge_capacity_Ah"])]
    x, q = reg["cycle_index"].astype(np.float64), reg["discharge_capacity_Ah"].astype(np.float64)
    return x, q / q[:5].mean()


def tri(folder: Path) -> None:
    for name, file, threshold in (("412", "prediag412_00008F_per_cycle.csv", 0.8),
                                  ("233", "prediag233_00021F_per_cycle.csv", 0.9)):
        x, y = tri_cell(folder / file)
        true = first_crossing(x, y, threshold)
        cut = x <= x[0] + FRACTION * (true - x[0])
        model = TrendModel(refit_every=1)
        model.add(x[cut], y[cut])
        c = model.crossing(threshold, horizon=x[cut][-1] + 4 * (true - x[0]))
        lin = linear_last3(x[cut], y[cut], threshold)
        logging.info("TRI %s at %.0f %%: true %.0f, GP %.0f [%.0f, %.0f], linear %.0f (from %d cycles)", name,
                     100 * threshold, true, c.mean, c.pessimistic, c.optimistic, lin, int(cut.sum()))
        emit(f"tri{name}_true_cycle_at_{round(100 * threshold)}pct", true, "cycles")
        emit(f"tri{name}_gp_abs_error_cycles", abs(c.mean - true), "cycles")
        emit(f"tri{name}_linear_abs_error_cycles", abs(lin - true), "cycles")
        emit(f"tri{name}_band_covers_truth", float(c.covers(true)), "bool")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_CSV, help="check-up CSV (the Baumhöfer columns)")
    ap.add_argument("--tri", type=Path, default=DEFAULT_TRI, help="folder of the TRI per-cycle CSVs")
    ap.add_argument("--no-tri", action="store_true", help="skip the TRI cells")
    ap.add_argument("--min-earlier", type=int, default=5, help="earlier cells needed for the earlier-only figure")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each cell's forecast to stderr")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    baumhofer(args.data, args.min_earlier)
    if not args.no_tri and args.tri.is_dir():
        tri(args.tri)


if __name__ == "__main__":
    main()
