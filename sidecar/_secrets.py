"""Tenant secrets at rest: AES-256-GCM with a key from the operator's environment.

The stored form is ``v1:<key-id>:<nonce b64>:<ciphertext b64>``: ``key-id`` is the
first 8 hex digits of SHA-256(key), the nonce 12 random bytes, and the associated
data ``tenant\\0name``, so a ciphertext copied to another tenant or name fails to
decrypt rather than handing one tenant another's secret.

Keys: ``[server] secrets_key_env`` (default ``ACTIONPOOL_SECRETS_KEY``) holds the
current key, 32 bytes in base64 (standard or URL-safe; ``python3 -c "import os,
base64; print(base64.b64encode(os.urandom(32)).decode())"``). Rotation: move the
old key to ``<secrets_key_env>_PREVIOUS`` (a comma list, newest first), set the new
one, restart; values under a previous key still decrypt, every write uses the
current key, and the store's rekey pass (at start, or ``Store.rekey_secrets()``)
re-encrypts the rest. Once no value names an old key id, drop it from the list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Mapping, Sequence

FORMAT = "v1"
NONCE_BYTES = 12
KEY_BYTES = 32


class SecretKeyError(ValueError):
    """A key in the environment is not 32 bytes of base64 (the message names the variable)."""


class DecryptError(ValueError):
    """A stored value does not decrypt: unknown key id, tampered, moved to another tenant/name, or malformed."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def parse_key(text: str, where: str) -> bytes:
    """32 bytes from base64 (standard or URL-safe, padding optional); SecretKeyError naming ``where``."""
    t = text.strip().rstrip("=").replace("-", "+").replace("_", "/")  # URL-safe -> standard alphabet
    try:
        raw: bytes | None = base64.b64decode(t + "=" * (-len(t) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if raw is not None and len(raw) == KEY_BYTES:
        return raw
    got = "not base64" if raw is None else f"{len(raw)} bytes"
    raise SecretKeyError(f"{where}: must be {KEY_BYTES} bytes in base64 (got {got}); generate one with "
                         "python3 -c \"import os,base64; print(base64.b64encode(os.urandom(32)).decode())\"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Keyring:
    """The current key (encrypts and decrypts) and previous keys (decrypt only)."""

    def __init__(self, current: bytes | None, previous: Sequence[bytes] = (),
                 env_name: str = "ACTIONPOOL_SECRETS_KEY") -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.env_name = env_name

        self.current_id = key_id(current) if current is not None else None
        self._aead: dict[str, AESGCM] = {}
        for k in ([current] if current is not None else []) + list(previous):
            self._aead.setdefault(key_id(k), AESGCM(k))

    @classmethod
    def from_env(cls, env: Mapping[str, str], name: str = "ACTIONPOOL_SECRETS_KEY") -> "Keyring":
        """Read ``name`` and ``name_PREVIOUS`` (comma list); an unset current key gives a keyring that cannot write."""
        cur = env.get(name, "").strip()
        prev = [p for p in env.get(name + "_PREVIOUS", "").split(",") if p.strip()]
        return cls(parse_key(cur, name) if cur else None,
                   [parse_key(p, f"{name}_PREVIOUS[{i}]") for i, p in enumerate(prev)], env_name=name)

    @property
    def can_encrypt(self) -> bool:
        return self.current_id is not None

    @property
    def key_ids(self) -> list[str]:
        return list(self._aead)

    def encrypt(self, tenant: str, name: str, value: str) -> str:
        if self.current_id is None:
            raise SecretKeyError(f"no secrets key is configured: set {self.env_name}")
        nonce = os.urandom(NONCE_BYTES)
        ct = self._aead[self.current_id].encrypt(nonce, value.encode("utf-8", "surrogatepass"), _aad(tenant, name))
        return f"{FORMAT}:{self.current_id}:{_b64(nonce)}:{_b64(ct)}"

    @staticmethod
    def key_of(stored: str) -> str | None:
        """The key id a stored value names, or None when it is not in the v1 form."""
        parts = stored.split(":")
        return parts[1] if len(parts) == 4 and parts[0] == FORMAT else None

    def decrypt(self, tenant: str, name: str, stored: str) -> str:
        from cryptography.exceptions import InvalidTag

        parts = stored.split(":") if isinstance(stored, str) else []
        if len(parts) != 4 or parts[0] != FORMAT:
            raise DecryptError("not a v1:<key-id>:<nonce>:<ciphertext> value")
        aead = self._aead.get(parts[1])
        if aead is None:
            raise DecryptError(f"encrypted with key {parts[1]}, which is neither the current key nor a previous one")
        try:
            nonce, ct = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError):
            raise DecryptError("nonce or ciphertext is not base64") from None
        if len(nonce) != NONCE_BYTES:
            raise DecryptError("the nonce is not 12 bytes")
        try:
            plain = aead.decrypt(nonce, ct, _aad(tenant, name))
        except InvalidTag:
            raise DecryptError("authentication failed (tampered, or stored under another tenant or name)") from None
        try:
            return plain.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise DecryptError("the plaintext is not UTF-8") from None


def _aad(tenant: str, name: str) -> bytes:
    return f"{tenant}\0{name}".encode("utf-8", "surrogatepass")
