"""Which coordinator key a worker or client expects at an endpoint (SSH-style pinning).

A worker or client talks CURVE to a coordinator only if it knows the coordinator's public key in
advance; a machine at that address without the matching secret key can never complete the
handshake, so it can neither hand out code nor read submissions.

Where the key comes from, first match wins:

    1. ``--server-key KEY`` on the command line        (and ``join --server-key`` stores a pin)
    2. ``$AUTORESEARCH_SERVER_KEY``
    3. the pin for that exact endpoint in ``<key dir>/known_coordinators.json``
       ({endpoint: server public key}); ``autoresearch-coord start`` pins its own endpoints
       for the local user, so local ``submit/status/log/export`` need no flags
    4. otherwise a one-line error saying what to pass

``<key dir>`` is ``shared.keys.default_key_dir()`` (``$AUTORESEARCH_KEYS`` or
``~/.config/autoresearch/keys``).
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from shared.keys import default_key_dir, fingerprint, validate_public_key

SERVER_KEY_ENV = "AUTORESEARCH_SERVER_KEY"
PINS_FILE = "known_coordinators.json"


class PinError(RuntimeError):
    """No usable coordinator key for an endpoint; the message says what to pass."""


def pins_path(environ: Mapping[str, str] | None = None) -> Path:
    return default_key_dir(environ) / PINS_FILE


def load_pins(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    path = pins_path(environ)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise PinError(f"{path} is unreadable ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise PinError(f"{path} is not a JSON map of endpoint -> key; fix or delete it")
    return {str(k): str(v) for k, v in data.items()}


def save_pin(endpoint: str, server_public: str | bytes,
             environ: Mapping[str, str] | None = None) -> str | None:
    """Pin ``server_public`` for ``endpoint``; returns the key it replaced (or None).

    Written atomically (temp file + rename) so concurrent starts/joins never leave half a file."""
    key = validate_public_key(server_public, what="server key").decode("ascii")
    path = pins_path(environ)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        pins = load_pins(environ)
    except PinError:
        pins = {}
    old = pins.get(endpoint)
    if old == key:
        return None
    pins[endpoint] = key
    tmp = path.with_name(f".{PINS_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return old


def find_server_key(endpoint: str, flag: str | None = None,
                    environ: Mapping[str, str] | None = None) -> bytes | None:
    """The coordinator key for ``endpoint`` by the order above, or None if nothing names one.
    A malformed key raises ValueError naming where it came from."""
    env = os.environ if environ is None else environ
    if flag:
        return validate_public_key(flag, what="--server-key")
    if env.get(SERVER_KEY_ENV):
        return validate_public_key(env[SERVER_KEY_ENV], what=f"${SERVER_KEY_ENV}")
    pinned = load_pins(environ).get(endpoint)
    if pinned:
        return validate_public_key(pinned, what=f"pin for {endpoint} in {pins_path(environ)}")
    return None


def require_server_key(endpoint: str, flag: str | None = None,
                       environ: Mapping[str, str] | None = None) -> bytes:
    """Like ``find_server_key`` but raises PinError with the fix when nothing names a key."""
    try:
        key = find_server_key(endpoint, flag, environ)
    except ValueError as exc:
        raise PinError(str(exc)) from None
    if key is None:
        raise PinError(f"no key pinned for {endpoint} -- pass --server-key KEY (printed by "
                       "`autoresearch-coord start`), or --insecure for a coordinator started "
                       "with --insecure")
    return key


def describe(key: str | bytes) -> str:
    """``KEY (fingerprint FP)`` for messages."""
    text = key.decode("ascii") if isinstance(key, bytes) else key
    return f"{text} (fingerprint {fingerprint(text)})"
