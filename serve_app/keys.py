"""API keys: owners, scopes, hashing, expiry and revocation, and a CLI to make and revoke them.

A key is shown once, when it is made; the database keeps its SHA-256 only. Scopes:
`read` (GET only), `operator` (everything on the owner's own rows), `admin` (operator, and making or
revoking keys for any owner). Keys an operator configures (PRESENCE_API_KEYS or the ingress's
`api_keys`) are admin keys of the owner `default`.

    python -m serve_app.keys create --owner acme --scope operator [--expires-days 90]
    python -m serve_app.keys list
    python -m serve_app.keys revoke k0123456789ab
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import time
from dataclasses import dataclass

from serve_app.db import DEFAULT_OWNER, ApiKeyRow, Store

SCOPES = ("read", "operator", "admin")
CACHE_S = 5.0  # a revoked key stops working within this long on every ingress replica


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    owner: str
    scopes: frozenset[str]
    key_id: str

    def can(self, scope: str) -> bool:
        if scope == "read":
            return bool(self.scopes)
        if scope == "operator":
            return bool(self.scopes & {"operator", "admin"})
        return scope in self.scopes


def hash_key(key: str) -> str:
    # Header values arrive latin-1 decoded; surrogateescape keeps any byte string hashable (never a 500).
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return "pk_" + secrets.token_urlsafe(24)


def make_key(store: Store, owner: str, scopes: list[str], name: str = "", expires_at: float | None = None,
             ) -> tuple[str, ApiKeyRow]:
    """A new key for `owner`: (the key, shown once; its row)."""
    bad = set(scopes) - set(SCOPES)
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, not {sorted(bad) or scopes}")
    key = new_key()
    return key, store.add_key(hash_key(key), owner, sorted(set(scopes)), name, expires_at)


def ensure_configured_keys(store: Store, keys: list[str]) -> None:
    """The operator's configured keys exist as admin keys of the default owner (idempotent)."""
    for key in keys:
        digest = hash_key(key)
        if store.key_by_hash(digest) is None:
            try:
                store.add_key(digest, DEFAULT_OWNER, ["admin"], name="configured", key_id="kcfg" + digest[:12])
            except Exception:  # another ingress replica inserted it first
                if store.key_by_hash(digest) is None:
                    raise


def principal_of(row: ApiKeyRow | None, now: float) -> Principal | None:
    if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    return Principal(row.owner, frozenset(row.scopes or ()), row.key_id)


class KeyRing:
    """Looks keys up by hash with a short cache, so a request costs no database read in the common case."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    def lookup(self, key: str) -> Principal | None:
        """Blocking (a database read on a cache miss): call it off the event loop."""
        if not key or len(key) > 200:
            return None
        digest, now = hash_key(key), time.time()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = principal_of(self.store.key_by_hash(digest), now)
        if len(self._cache) > 10000:  # bounded: random keys from a scanner must not grow it forever
            self._cache.clear()
        self._cache[digest] = (now + CACHE_S, principal)
        return principal

    def forget(self) -> None:
        self._cache.clear()


def key_json(row: ApiKeyRow) -> dict:
    return {"key_id": row.key_id, "owner": row.owner, "scopes": row.scopes, "name": row.name,
            "created_at": row.created_at, "expires_at": row.expires_at, "revoked_at": row.revoked_at}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve_app.keys", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="make a key (printed once)")
    c.add_argument("--owner", required=True)
    c.add_argument("--scope", action="append", choices=SCOPES, required=True)
    c.add_argument("--name", default="")
    c.add_argument("--expires-days", type=float, default=None)
    sub.add_parser("list", help="list keys (never the keys themselves)")
    r = sub.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("key_id")
    ap.add_argument("--database-url", default=None, help="default: DATABASE_URL or data/presence.db")
    args = ap.parse_args(argv)
    store = Store(args.database_url)
    if args.cmd == "create":
        expires = time.time() + args.expires_days * 86400 if args.expires_days else None
        key, row = make_key(store, args.owner, args.scope, args.name, expires)
        print(f"{row.key_id}\t{key}")
    elif args.cmd == "list":
        for row in store.list_keys(10000, 0)[0]:
            state = "revoked" if row.revoked_at else "active"
            print(f"{row.key_id}\t{row.owner}\t{','.join(row.scopes)}\t{state}\t{row.name}")
    else:
        if store.revoke_key(args.key_id) is None:
            print(f"no key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id} (ingress replicas stop accepting it within {CACHE_S:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
