"""The measured-launch event log and its replay, like the TCG event log (pure, no TPM).

Each event is (PCR, SHA-256 digest, description); extending is ``PCR = SHA256(PCR || digest)``
from 32 zero bytes. A verifier replays the log to the PCR values the TPM quoted and compares the
events with the tenant's reference values: a difference is reported by PCR and event, e.g.
``PCR 8 differs at event 'QEMU binary ...': digest 3a1f..., reference 9c0e...``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import AttestationError

ZERO = bytes(32)


@dataclass(frozen=True)
class Event:
    pcr: int
    digest: bytes
    description: str

    def to_json(self) -> dict[str, Any]:
        return {"pcr": self.pcr, "digest": self.digest.hex(), "description": self.description}

    @classmethod
    def from_json(cls, obj: Any) -> Event:
        try:
            pcr, digest, description = int(obj["pcr"]), bytes.fromhex(obj["digest"]), str(obj["description"])
        except (KeyError, TypeError, ValueError):
            raise AttestationError(f"malformed event log entry: {str(obj)[:80]!r}") from None
        if len(digest) != 32 or not 0 <= pcr <= 23:
            raise AttestationError(f"malformed event log entry: PCR {pcr}, {len(digest)}-byte digest")
        return cls(pcr, digest, description)


def measure(pcr: int, data: bytes, description: str) -> Event:
    return Event(pcr, hashlib.sha256(data).digest(), description)


def replay(events: list[Event], pcrs: tuple[int, ...]) -> dict[int, bytes]:
    """The PCR values ``events`` produce from reset."""
    values = {p: ZERO for p in pcrs}
    for e in events:
        if e.pcr in values:
            values[e.pcr] = hashlib.sha256(values[e.pcr] + e.digest).digest()
    return values


def pcr_digest(values: dict[int, bytes], pcrs: tuple[int, ...]) -> bytes:
    """What TPM2_Quote signs as pcrDigest: SHA-256 over the selected PCRs in ascending order."""
    return hashlib.sha256(b"".join(values[p] for p in sorted(pcrs))).digest()


def dumps(events: list[Event]) -> str:
    return json.dumps([e.to_json() for e in events], indent=1)


def loads(text: str | list[Any]) -> list[Event]:
    try:
        obj = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise AttestationError("event log is not JSON") from None
    if not isinstance(obj, list):
        raise AttestationError("event log is not a list of events")
    return [Event.from_json(o) for o in obj]


def compare(events: list[Event], reference: list[Event], pcrs: tuple[int, ...]) -> None:
    """``AttestationError`` naming the first PCR and event where ``events`` differ from ``reference``."""
    got, want = replay(events, pcrs), replay(reference, pcrs)
    for pcr in sorted(pcrs):
        if got[pcr] == want[pcr]:
            continue
        mine = [e for e in events if e.pcr == pcr]
        ref = [e for e in reference if e.pcr == pcr]
        for n in range(max(len(mine), len(ref))):
            a = mine[n] if n < len(mine) else None
            b = ref[n] if n < len(ref) else None
            if a is None or b is None or a.digest != b.digest:
                if a is None:
                    raise AttestationError(f"PCR {pcr} differs: the host did not measure {b.description!r}")  # type: ignore[union-attr]
                if b is None:
                    raise AttestationError(f"PCR {pcr} differs at event {a.description!r}: not in the reference values")
                raise AttestationError(f"PCR {pcr} differs at event {a.description!r}: digest {a.digest.hex()[:16]}..., "
                                       f"reference {b.digest.hex()[:16]}... ({b.description!r})")
        raise AttestationError(f"PCR {pcr} differs from the reference value")


def to_dicts(events: list[Event]) -> list[dict[str, Any]]:
    return [asdict(e) | {"digest": e.digest.hex()} for e in events]
