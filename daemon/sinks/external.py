"""Derived-document values stored in the run file: the event_model Resource/Datum handler.

Buffers whose values a derived event cannot carry inline (3 or more dimensions in all: per-point
spectra of a 2-D map ``(rows, cols, n)``, per-frame defect lists ``(n_frames, max_defects, 3)``,
class patches ``(k, p, p)``; images of more than 16 rows) are published in the derived run's
``external`` stream as references into the run's NeXus file (:mod:`beamlens.daemon.sinks.runfiles`),
the way bluesky's detectors reference their HDF5 files (event_model "Resource and Datum"
documents, blueskyproject.io/event-model/main/explanations/data-model.html#resource-document):

- Resource ``spec`` :data:`SPEC`, ``root`` the run files directory, ``resource_path`` the run
  file's name, ``resource_kwargs {"run_uid": <raw run uid>}``;
- one Datum per buffer, ``datum_kwargs {"dataset": "/entry/<consumer>/<buffer>/data"}``;
- the event carries the datum ids, ``filled`` False, data keys with ``external: "FILESTORE:"``.

A client resolves them with event_model's ``Filler`` and :class:`NexusDatasetHandler`::

    from event_model import Filler
    from beamlens.daemon.sinks.external import SPEC, NexusDatasetHandler
    with Filler({SPEC: NexusDatasetHandler}, inplace=False) as filler:
        for name, doc in documents:
            name, doc = filler(name, doc)

The run file is written after the raw run's RunStop (by the run files writer thread), so a
Filler run live may have to wait for it; the file is complete once it exists under its name
(atomic rename). When another run's file held the name, the writer used ``<stem>_2.nxs``, ...:
the handler finds the file whose ``entry/raw_run_uid`` is ``run_uid`` among those.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

SPEC = "BEAMLENS_NXS"
"""The Resource ``spec`` of a beamlens run file dataset."""


class NexusDatasetHandler:
    """event_model handler of :data:`SPEC` resources: reads one dataset of a beamlens run file.

    Args:
        filename: the run file's path (``root`` joined with ``resource_path`` by the Filler).
        run_uid: the raw run the file must belong to (``entry/raw_run_uid``).

    Raises:
        FileNotFoundError: no file of that run under that name (nor ``<stem>_<i>.nxs``) yet.
    """

    def __init__(self, filename: str, run_uid: str):
        self.path = _file_of(Path(filename), run_uid)

    def __call__(self, dataset: str) -> np.ndarray:
        """The dataset's values (shape and dtype as stored: ``(*nav_shape, *extra_shape)`` for
        nav buffers).

        Raises:
            KeyError: no such dataset in the file.
        """
        with h5py.File(self.path, "r") as f:
            return np.asarray(f[dataset][()])


def _belongs(path: Path, run_uid: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f["entry/raw_run_uid"].asstr()[()] == run_uid
    except (OSError, KeyError):
        return False


def _file_of(path: Path, run_uid: str) -> Path:
    """``path`` if it is ``run_uid``'s file, else the newest ``<stem>_<i>.nxs`` beside it that is."""
    if _belongs(path, run_uid):
        return path
    others = [p for p in path.parent.glob(f"{path.stem}_*{path.suffix}") if _belongs(p, run_uid)]
    if not others:
        raise FileNotFoundError(f"no run file of run {run_uid} at {path} (written after the run stops)")
    return max(others, key=lambda p: p.stat().st_mtime)
