"""Password hashes for local SMTP AUTH users (scrypt from the standard library)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# scrypt with N=2**14, r=8, p=1 costs ~16 MiB and ~30-50 ms: slow for guessing, cheap enough for
# an SMTP AUTH (clients authenticate once per connection).
_N, _R, _P = 2**14, 8, 1
_PREFIX = "scrypt"


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """Return ``scrypt$N$r$p$salt$hash`` (base64) for storing in the config's ``users:``."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password.encode(), salt, n, r, p)
    return "$".join((_PREFIX, str(n), str(r), str(p), _b64(salt), _b64(digest)))


def check_hash_format(encoded: str) -> None:
    """Raise ValueError unless ``encoded`` is a hash that :func:`hash_password` produced."""
    _parse(encoded)


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a stored hash; False on any malformed input."""
    try:
        n, r, p, salt, expected = _parse(encoded)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password.encode(), salt, n, r, p), expected)


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _PREFIX:
        raise ValueError("expected a hash made by `infobip-relay hash-password` (scrypt$...)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except ValueError as exc:
        raise ValueError("malformed scrypt hash") from exc
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or len(digest) < 16:
        raise ValueError("scrypt hash parameters out of range")
    return n, r, p, salt, digest


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
