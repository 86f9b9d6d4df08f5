"""API keys alone (a real database, no Ray): only hashes stored, scopes, expiry, revocation, the CLI."""

from __future__ import annotations

import time

import pytest

from serve_app import keys
from serve_app.db import Store


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'k.db'}")


def test_only_the_hash_is_stored_and_scopes_hold(store):
    key, row = keys.make_key(store, "acme", ["read"])
    assert row.key_hash == keys.hash_key(key) and key not in repr(vars(row))
    ring = keys.KeyRing(store)
    who = ring.lookup(key)
    assert who.owner == "acme" and who.can("read") and not who.can("operator") and not who.can("admin")
    assert ring.lookup("pk_" + "x" * 32) is None and ring.lookup("") is None and ring.lookup("k\u00e9y") is None
    with pytest.raises(ValueError):
        keys.make_key(store, "acme", ["root"])


def test_expired_and_revoked_keys_stop_working(store):
    old, _ = keys.make_key(store, "acme", ["operator"], expires_at=time.time() - 1)
    live, row = keys.make_key(store, "acme", ["operator"])
    ring = keys.KeyRing(store)
    assert ring.lookup(old) is None and ring.lookup(live) is not None
    store.revoke_key(row.key_id)
    assert ring.lookup(live) is not None  # cached for at most CACHE_S on other replicas ...
    ring.forget()
    assert ring.lookup(live) is None  # ... and refused once looked up again


def test_configured_keys_are_default_admins_once(store):
    keys.ensure_configured_keys(store, ["cfg-key"])
    keys.ensure_configured_keys(store, ["cfg-key"])
    assert store.list_keys(100, 0)[1] == 1
    who = keys.KeyRing(store).lookup("cfg-key")
    assert who.owner == "default" and who.can("admin")


def test_cli_create_list_revoke(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert keys.main(["--database-url", url, "create", "--owner", "acme", "--scope", "operator"]) == 0
    key_id, key = capsys.readouterr().out.split()
    assert keys.main(["--database-url", url, "list"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and key not in listed and "active" in listed
    assert keys.main(["--database-url", url, "revoke", key_id]) == 0
    assert keys.KeyRing(Store(url)).lookup(key) is None
