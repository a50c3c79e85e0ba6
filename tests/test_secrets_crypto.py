"""Secrets at rest (sidecar/_secrets.py): AES-256-GCM bound to (tenant, name), keys from the environment.

What an operator relies on: a stored value never holds the plaintext, a value moved
to another tenant or name or changed by one bit does not decrypt, a wrong key does
not decrypt, previous keys keep decrypting after a rotation while writes use the
new key, and a malformed key in the environment stops the config with the variable
named.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from actionpool.runner import ConfigError
from actionpool.sidecar._config import load_config
from actionpool.sidecar._secrets import DecryptError, Keyring, SecretKeyError, key_id, parse_key

K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)
VALUE = "correct horse battery staple"


def test_round_trip_and_the_stored_form() -> None:
    kr = Keyring(K1)
    stored = kr.encrypt("acme", "API_KEY", VALUE)
    form, kid, nonce, ct = stored.split(":")
    assert form == "v1" and kid == key_id(K1) == kr.current_id and len(kid) == 8
    assert len(base64.b64decode(nonce)) == 12 and len(base64.b64decode(ct)) == len(VALUE) + 16  # GCM tag
    assert VALUE not in stored and VALUE.encode().hex() not in stored
    assert kr.decrypt("acme", "API_KEY", stored) == VALUE
    assert kr.encrypt("acme", "API_KEY", VALUE) != stored  # a fresh nonce every time
    assert Keyring(K1).decrypt("acme", "API_KEY", kr.encrypt("acme", "API_KEY", "ünïcødé ✓")) == "ünïcødé ✓"


@pytest.mark.parametrize("tenant,name", [("beta", "API_KEY"), ("acme", "OTHER"), ("acme\0API", "KEY"),
                                         ("acm", "e\0API_KEY")])
def test_a_value_moved_to_another_tenant_or_name_does_not_decrypt(tenant: str, name: str) -> None:
    stored = Keyring(K1).encrypt("acme", "API_KEY", VALUE)
    with pytest.raises(DecryptError, match="authentication failed"):
        Keyring(K1).decrypt(tenant, name, stored)


def test_tampered_or_malformed_values_do_not_decrypt() -> None:
    kr = Keyring(K1)
    stored = kr.encrypt("acme", "K", VALUE)
    head, _, ct = stored.rpartition(":")
    raw = bytearray(base64.b64decode(ct))
    for i in (0, len(raw) // 2, len(raw) - 1):  # a flipped bit in the ciphertext or in the tag
        flipped = bytearray(raw)
        flipped[i] ^= 1
        with pytest.raises(DecryptError, match="authentication failed"):
            kr.decrypt("acme", "K", head + ":" + base64.b64encode(bytes(flipped)).decode())
    form, kid, nonce, _ = stored.split(":")
    other_nonce = base64.b64encode(os.urandom(12)).decode()
    bad = [f"{form}:{kid}:{other_nonce}:{ct}", f"v2:{kid}:{nonce}:{ct}", f"{form}:{kid}:{nonce}", VALUE,
           f"{form}:{kid}:!!!:{ct}", f"{form}:{kid}:{base64.b64encode(b'short').decode()}:{ct}", ""]
    for value in bad:
        with pytest.raises(DecryptError):
            kr.decrypt("acme", "K", value)


def test_a_wrong_key_does_not_decrypt_and_says_which_key_it_needs() -> None:
    stored = Keyring(K1).encrypt("acme", "K", VALUE)
    with pytest.raises(DecryptError, match=key_id(K1)):
        Keyring(K2).decrypt("acme", "K", stored)
    # the same key id with other bytes (forged id): authentication fails, nothing is returned
    form, _, nonce, ct = stored.split(":")
    with pytest.raises(DecryptError):
        Keyring(K2).decrypt("acme", "K", f"{form}:{key_id(K2)}:{nonce}:{ct}")
    with pytest.raises(DecryptError):
        Keyring(None).decrypt("acme", "K", stored)


def test_rotation_previous_keys_decrypt_and_writes_use_the_current_key() -> None:
    old = Keyring(K1).encrypt("acme", "K", VALUE)
    older = Keyring(K3).encrypt("acme", "K", VALUE + "3")
    rotated = Keyring(K2, [K1, K3])
    assert rotated.decrypt("acme", "K", old) == VALUE and rotated.decrypt("acme", "K", older) == VALUE + "3"
    assert Keyring.key_of(rotated.encrypt("acme", "K", VALUE)) == key_id(K2)
    assert rotated.key_ids == [key_id(K2), key_id(K1), key_id(K3)]
    nothing = Keyring(None, [K1])  # decrypt-only
    assert nothing.decrypt("acme", "K", old) == VALUE and not nothing.can_encrypt
    with pytest.raises(SecretKeyError, match="ACTIONPOOL_SECRETS_KEY"):
        nothing.encrypt("acme", "K", VALUE)


def test_keys_come_from_the_environment_in_either_base64() -> None:
    env = {"ACTIONPOOL_SECRETS_KEY": base64.urlsafe_b64encode(K2).decode().rstrip("="),
           "ACTIONPOOL_SECRETS_KEY_PREVIOUS": f"{base64.b64encode(K1).decode()}, {base64.b64encode(K3).decode()}"}
    kr = Keyring.from_env(env)
    assert kr.current_id == key_id(K2) and kr.key_ids == [key_id(K2), key_id(K1), key_id(K3)]
    assert Keyring.from_env({}).current_id is None
    custom = Keyring.from_env({"MY_KEY": base64.b64encode(K1).decode()}, "MY_KEY")
    assert custom.current_id == key_id(K1) and custom.env_name == "MY_KEY"
    assert parse_key(" " + base64.b64encode(K1).decode() + "\n", "X") == K1
    for bad, why in (("not base64 at all!", "not base64"), (base64.b64encode(b"x" * 16).decode(), "16 bytes"),
                     (base64.b64encode(b"x" * 33).decode(), "33 bytes")):
        with pytest.raises(SecretKeyError, match=why):
            parse_key(bad, "ACTIONPOOL_SECRETS_KEY")
    with pytest.raises(SecretKeyError, match=r"ACTIONPOOL_SECRETS_KEY_PREVIOUS\[1\]"):
        Keyring.from_env({"ACTIONPOOL_SECRETS_KEY_PREVIOUS": base64.b64encode(K1).decode() + ",short"})


def _config(tmp_path: Path, server: str) -> Path:
    p = tmp_path / "serve.toml"
    p.write_text(f"[server]\n{server}\n[tenants.acme]\n", encoding="utf-8")
    return p


def test_the_config_checks_the_key_and_the_catalog_bounds(tmp_path: Path) -> None:
    good = {"ACTIONPOOL_SECRETS_KEY": base64.b64encode(K1).decode()}
    cfg = load_config(_config(tmp_path, "flows_max = 4\naudit_max = 50"), env=good)
    assert cfg.server.flows_max == 4 and cfg.server.audit_max == 50
    assert cfg.server.secrets_key_env == "ACTIONPOOL_SECRETS_KEY" and cfg.server.tenants_max == 10000
    with pytest.raises(ConfigError, match="server.secrets_key_env: ACTIONPOOL_SECRETS_KEY: must be 32 bytes"):
        load_config(_config(tmp_path, ""), env={"ACTIONPOOL_SECRETS_KEY": "c2hvcnQ="})
    with pytest.raises(ConfigError, match="server.secrets_key_env: MY_KEY_PREVIOUS"):
        load_config(_config(tmp_path, 'secrets_key_env = "MY_KEY"'), env={"MY_KEY_PREVIOUS": "nope"})
    assert load_config(_config(tmp_path, ""), env={}).server.secrets_key_env  # no key: fine until a secret
    for key, value, why in (("flows_max", "0", "must be positive"), ("audit_max", "-1", "must be positive"),
                            ("secret_max_bytes", "4", "at least 8"), ("tenants_max", '"many"', "wrong type"),
                            ("secrets_key_env", '""', "must name an environment variable")):
        with pytest.raises(ConfigError, match=f"server.{key}: .*{why}"):
            load_config(_config(tmp_path, f"{key} = {value}"), env={})
