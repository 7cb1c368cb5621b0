"""API keys and tenants. Keys come from the environment or a mounted file, never from the Serve config's
application args (Ray prints those at every start and serves them on its dashboard):

    T2V_API_KEYS="key-one,key-two:3"             comma-separated; ":N" after a key sets its user level (default 0)
    T2V_API_KEYS_FILE=/etc/t2v/api-keys/keys     one key per line, same ":N"; blank lines and # comments skipped

Only their sha256 digests are kept, and a presented key is compared with every digest in constant time. A job
belongs to its tenant: the one derived from the key that created it, or ANONYMOUS when authentication is off.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

ENV_KEYS = "T2V_API_KEYS"
ENV_KEYS_FILE = "T2V_API_KEYS_FILE"
ANONYMOUS = "anonymous"
KEYS_IN_ARGS = (
    "settings.api_keys is refused: Ray prints application args in its logs and serves them on the dashboard. "
    f"Remove api_keys from the Serve config, set the keys in the {ENV_KEYS} environment variable (comma-separated) "
    f"or in a file named by {ENV_KEYS_FILE} (one per line, e.g. a mounted Kubernetes Secret), and rotate the "
    "keys that were in the config.")


def refuse_keys_in_args(settings: Mapping | None) -> None:
    """Fail a Serve config that still carries API keys (the message names the variables to use instead and
    never the keys)."""
    if (settings or {}).get("api_keys"):
        raise ValueError(KEYS_IN_ARGS)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _tenant(digest: bytes) -> str:
    # Job records carry this rather than the digest that verifies the key; 128 bits tell tenants apart.
    return "key_" + digest.hex()[:32]


class APIKeys:
    """sha256(key) -> user level. Empty: authentication is off. Its repr and pickle hold no key."""

    def __init__(self, keys: Mapping[str, int] | None = None):
        keys = dict(keys or {})
        if any(not k for k in keys):
            raise ValueError("an API key is empty")
        self._levels = {_digest(k): int(level) for k, level in keys.items()}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "APIKeys":
        env = os.environ if environ is None else environ
        entries = env.get(ENV_KEYS, "").split(",")
        if env.get(ENV_KEYS_FILE):
            lines = Path(env[ENV_KEYS_FILE]).read_text().splitlines()
            entries += [line for line in lines if not line.lstrip().startswith("#")]
        keys = {}
        for entry in (e.strip() for e in entries):
            if entry:
                key, sep, level = entry.rpartition(":")
                keys.update({key.strip(): int(level)} if sep and level.isdigit() else {entry: 0})
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._levels)

    def __len__(self) -> int:
        return len(self._levels)

    def __repr__(self) -> str:
        return f"APIKeys({len(self._levels)} keys)"

    def authenticate(self, given: str) -> tuple[str, int] | None:
        """(tenant, user level) of a presented key, or None. Every digest is compared, with no early exit, so
        the time taken does not tell which key (or how much of one) matched."""
        digest, found = _digest(given), None
        for stored, level in self._levels.items():
            if hmac.compare_digest(digest, stored):
                found = (_tenant(stored), level)
        return found
