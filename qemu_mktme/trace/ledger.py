"""Traffic per KeyID from the shim's per-page counters.

The shim counts per page only (one counter update on the hot path); a page's KeyID is Python's
to change (``SharedRegion.attrs["keyid"]``). So when a page is re-keyed, the traffic it had so far
is folded into its old KeyID's retired total and the page's counters are re-based: every access
stays with the KeyID the page had when it was made.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .accesses import Traffic, TrafficSnapshot
from .layout import NKEYIDS, SharedRegion


class KeyIdLedger:
    """KeyID attribution over one :class:`SharedRegion`; ``gpas`` maps backend offsets to GPAs
    (-1 where none) for the snapshots it takes."""

    def __init__(self, region: SharedRegion, gpas: Callable[[np.ndarray], np.ndarray]) -> None:
        npages = region.geometry.npages
        self._region = region
        self._gpas = gpas
        self._base = np.zeros((npages, 4), dtype=np.uint64)        # counters at the last re-key
        self._retired = np.zeros((NKEYIDS, 4), dtype=np.uint64)    # folded traffic per KeyID

    def counts(self) -> np.ndarray:
        """Per vCPU and page: loads, stores, load bytes, store bytes (SharedRegion.counts)."""
        return self._region.counts()

    def assign(self, pages: slice, keyid: int) -> None:
        """Attribute ``pages`` to ``keyid`` from now on; what they had so far stays with their old KeyIDs."""
        keyids = self._region.attrs["keyid"]
        now = self.counts()[:, pages].sum(axis=0, dtype=np.uint64)
        np.add.at(self._retired, keyids[pages].astype(np.intp), now - self._base[pages])
        self._base[pages] = now
        keyids[pages] = keyid

    def keyid(self, page: int) -> int:
        return int(self._region.attrs["keyid"][page])

    def snapshot(self) -> TrafficSnapshot:
        """Traffic so far, per page and per KeyID."""
        counts = self.counts().sum(axis=0, dtype=np.uint64)
        keyids = self._region.attrs["keyid"].astype(np.intp)
        per_keyid = self._retired.copy()
        delta = counts - self._base
        if keyids.any():
            order = np.argsort(keyids, kind="stable")
            sorted_ids = keyids[order]
            starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
            per_keyid[sorted_ids[starts]] += np.add.reduceat(delta[order], starts, axis=0)
        else:
            per_keyid[0] += delta.sum(axis=0, dtype=np.uint64)
        nonzero = np.flatnonzero(per_keyid.any(axis=1))
        totals = {int(k): Traffic.from_counters(per_keyid[k]) for k in nonzero}
        return TrafficSnapshot(time.monotonic(), counts.astype(np.int64), keyids, totals, self._gpas)
