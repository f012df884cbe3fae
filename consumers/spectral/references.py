"""Reading reference spectra from the text formats XAS libraries publish.

Formats (see ``shared/data/MANIFEST.md`` for the files they come from):

- XDI 1.0/1.1 (XAS Data Interchange, https://github.com/XraySpectroscopy/XAS-Data-Interchange):
  ``# Column.N: name [units]`` header lines, whitespace-separated columns. Transmission files with
  ``i0`` and ``itrans`` give mu = ln(i0 / itrans); a file with several spectral columns (Demeter's
  multi-column ``.nor`` export) gives one spectrum per column.
- Two-column text (ALS 10.3.2 ``.e`` files and similar): ``#``-prefixed header lines, then
  ``energy value`` rows; energies in eV, or in keV when every energy is below 100.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_COLUMN = re.compile(r"^#\s*Column\.(\d+):\s*(\S+)")
_META = re.compile(r"^#\s*([A-Za-z_]+\.[A-Za-z_]+):\s*(.*)$")


@dataclass(frozen=True)
class ReferenceSpectrum:
    """One reference spectrum.

    Attributes:
        name: phase or column name (``"goethite"``, ``"Magnetite"``).
        energy: float64 ``(n,)``, eV, increasing.
        mu: float64 ``(n,)``, absorption (raw mu(E) or already normalised, see ``normalized``).
        normalized: True when the file already holds edge-step-normalised mu(E).
        source: the file it came from.
    """

    name: str
    energy: np.ndarray
    mu: np.ndarray
    normalized: bool
    source: str


def _rows(lines: list[str]) -> np.ndarray:
    data = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    try:
        arr = np.array(data, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"non-numeric or ragged data rows: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError("expected at least two rows of at least two columns")
    return arr


def _sorted(energy: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.argsort(energy, kind="stable")
    return (energy[order], *(c[order] for c in columns))


def read_reference_file(path: str | Path) -> list[ReferenceSpectrum]:
    """Read every spectrum in one reference file (XDI, multi-column XDI, or two-column text).

    Returns:
        One :class:`ReferenceSpectrum` per spectral column.

    Raises:
        ValueError: if the file has no numeric columns or no usable spectral column.
        OSError: if it cannot be read.
    """
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    columns: dict[int, str] = {}
    sample = None
    for line in lines:
        if m := _COLUMN.match(line):
            columns[int(m.group(1))] = m.group(2).lower() if m.group(2).lower() in ("energy", "i0", "itrans", "mutrans", "mu", "norm") else m.group(2)
        elif (m := _META.match(line)) and m.group(1).lower() == "sample.name":
            sample = m.group(2).strip()
    data = _rows(lines)
    energy = data[:, 0]
    if np.nanmax(energy) < 100:  # keV
        energy = energy * 1000.0
    stem = sample or path.stem
    if not columns:  # two-column text: energy, normalised value
        e, mu = _sorted(energy, data[:, 1])
        return [ReferenceSpectrum(stem, e, mu, True, str(path))]
    names = [columns.get(i + 1, f"column{i + 1}") for i in range(data.shape[1])]
    if "i0" in names and "itrans" in names:
        i0, it = data[:, names.index("i0")], data[:, names.index("itrans")]
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.log(i0 / it)
        if not np.isfinite(mu).all():
            raise ValueError(f"{path.name}: i0/itrans has non-positive values")
        e, mu = _sorted(energy, mu)
        return [ReferenceSpectrum(stem, e, mu, False, str(path))]
    for raw_name in ("mutrans", "mu", "norm"):
        if raw_name in names:
            e, mu = _sorted(energy, data[:, names.index(raw_name)])
            return [ReferenceSpectrum(stem, e, mu, raw_name == "norm", str(path))]
    spectra = []
    for i, name in enumerate(names[1:], start=1):
        e, mu = _sorted(energy, data[:, i])
        spectra.append(ReferenceSpectrum(name, e, mu, path.suffix == ".nor", str(path)))
    if not spectra:
        raise ValueError(f"{path.name}: no spectral column")
    return spectra


def read_reference(path: str | Path, column: str | None = None) -> ReferenceSpectrum:
    """Read one spectrum: the only one in the file, or the column named ``column``.

    Raises:
        ValueError: if the file holds several spectra and ``column`` does not name one of them.
    """
    return _select(read_reference_file(path), path, column)


def _select(spectra: list[ReferenceSpectrum] | tuple[ReferenceSpectrum, ...], path: str | Path,
            column: str | None) -> ReferenceSpectrum:
    if column is None:
        if len(spectra) != 1:
            raise ValueError(f"{Path(path).name} holds {len(spectra)} spectra; name a column: {[s.name for s in spectra]}")
        return spectra[0]
    for s in spectra:
        if s.name.lower() == column.lower():
            return s
    raise ValueError(f"{Path(path).name} has no column {column!r}; it has {[s.name for s in spectra]}")


#: The vendored Fe K-edge reference library (licences alongside the files).
FE_K_DIR = Path(__file__).resolve().parent.parent / "data" / "fe_k_xanes"
_SUFFIXES = (".xdi", ".nor", ".e")


def resolve_reference_path(path: str | Path) -> Path:
    """An absolute path as given; a relative one inside the vendored Fe K-edge folder
    (``"xasdatalibrary/Hansel2001_goethite_xanes_003.xdi"``).

    Raises:
        FileNotFoundError: when the file does not exist.
    """
    p = Path(path)
    p = p if p.is_absolute() else FE_K_DIR / p
    if not p.is_file():
        raise FileNotFoundError(f"reference file {p} not found (relative paths are inside {FE_K_DIR})")
    return p


@functools.lru_cache(maxsize=256)
def _read_cached(path: str) -> tuple[ReferenceSpectrum, ...]:
    return tuple(read_reference_file(path))


def read_reference_cached(path: str | Path, column: str | None = None) -> ReferenceSpectrum:
    """:func:`read_reference` through a per-process cache (reference files do not change while the
    daemon runs; every run of a consumer reads the same ones)."""
    return _select(_read_cached(str(resolve_reference_path(path))), path, column)


def vendored_library() -> list[ReferenceSpectrum]:
    """Every spectrum of every file in the vendored Fe K-edge folder, in path order."""
    out: list[ReferenceSpectrum] = []
    for path in sorted(FE_K_DIR.rglob("*")):
        if path.suffix.lower() in _SUFFIXES:
            out.extend(_read_cached(str(path)))
    return out
