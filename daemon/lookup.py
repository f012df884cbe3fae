"""Look up the RunStart and descriptors of a run joined mid-way in a Tiled server (``tiled.client``),
where bluesky's ``TiledWriter`` (or a Tiled-backed databroker) stores every run: the run container
is keyed by the RunStart uid, its ``metadata["start"]`` is the RunStart, and each stream's
metadata holds its descriptor's ``uid``, ``data_keys``, ``configuration``, ``hints`` and ``time``.

Look-ups run on the router thread, only when a run is joined mid-way (rare), each bounded by the
client's timeout; a failure is logged and the run is joined without them (1-D growing map).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: How many of the newest runs are searched for a descriptor uid (events name only their descriptor).
RECENT_RUNS = 20


def http_uri(lookup: str) -> str:
    """``tiled://host:port/path`` -> ``http://host:port/path`` (``tileds://`` -> ``https://``)."""
    scheme, rest = lookup.split("://", 1)
    return ("https://" if scheme == "tileds" else "http://") + rest


class TiledLookup:
    """Run metadata by uid from one Tiled server.

    Args:
        uri: ``tiled://...`` or ``tileds://...`` (config ``sources.bluesky[i].lookup``).

    Raises:
        RuntimeError: ``tiled`` (the ``lookup`` extra) is not installed.
    """

    def __init__(self, uri: str):
        try:
            import tiled.client  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"sources.bluesky[].lookup {uri} needs tiled: pip install 'beamlens[lookup]'") from exc
        self.uri = http_uri(uri)

    def _root(self) -> Any:
        """A fresh client (look-ups are rare: no connection is kept open between them)."""
        from tiled.client import from_uri
        return from_uri(self.uri)

    def start(self, run_uid: str) -> dict[str, Any] | None:
        """The RunStart of run ``run_uid``, or None (not there, or the server unreachable)."""
        root = None
        try:
            root = self._root()
            return dict(root[run_uid].metadata["start"])
        except KeyError:
            return None
        except Exception:  # any failure of the remote end: join without it
            log.exception("Tiled look-up of run %s at %s failed", run_uid, self.uri)
            return None
        finally:
            if root is not None:
                root.context.close()

    def descriptor(self, descriptor_uid: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(RunStart, EventDescriptor)`` of the stream whose descriptor has ``descriptor_uid``,
        searched in the :data:`RECENT_RUNS` newest runs, or None."""
        root = None
        try:
            root = self._root()
            for run_uid in root.keys().tail(RECENT_RUNS)[::-1]:  # newest first
                run = root[run_uid]
                for stream in run:
                    md = run[stream].metadata
                    if md.get("uid") == descriptor_uid:
                        start = dict(run.metadata["start"])
                        doc = {"uid": descriptor_uid, "run_start": start["uid"], "name": stream,
                               "time": md.get("time", start["time"]), "data_keys": dict(md.get("data_keys") or {}),
                               "configuration": dict(md.get("configuration") or {}), "hints": dict(md.get("hints") or {}),
                               "object_keys": dict(md.get("object_keys") or {})}
                        return start, doc
        except Exception:
            log.exception("Tiled look-up of descriptor %s at %s failed", descriptor_uid, self.uri)
        finally:
            if root is not None:
                root.context.close()
        return None
