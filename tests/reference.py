"""Independent references for tests: computed with `cryptography` and the standard library only,
never with qemu_mktme's engine, so that a bug there cannot hide in the expected values."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def xts_lines(key: bytes, tweak_key: bytes, hpa: int, plaintext: bytes) -> bytes:
    """AES-XTS of whole 64-byte lines at ``hpa``, each its own data unit with tweak = its HPA,
    computed with ``cryptography``'s XTS one line at a time."""
    assert len(plaintext) % 64 == 0 and hpa % 64 == 0
    out = []
    for i in range(0, len(plaintext), 64):
        enc = Cipher(algorithms.AES(key + tweak_key), modes.XTS((hpa + i).to_bytes(16, "little"))).encryptor()
        out.append(enc.update(plaintext[i:i + 64]) + enc.finalize())
    return b"".join(out)


def user_payload(key: bytes, tweak: bytes, algorithm: str = "aes-xts-128") -> str:
    return f"type=user algorithm={algorithm} key={key.hex()} tweak={tweak.hex()}"
