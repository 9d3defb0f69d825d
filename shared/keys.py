"""CURVE keys: where they live, how they are made and read, and how sockets use them.

Every machine has a keypair; the coordinator accepts only public keys on its trust list, and
workers/clients pin the coordinator's public key (``join --server-key``), so neither side can be
impersonated on the lab network.

Files (the same two-file layout ``zmq.auth.create_certificates`` writes, so pyzmq's
``zmq.auth.load_certificate`` reads them too)::

    <dir>/<name>.key          public key, shareable
    <dir>/<name>.key_secret   public + secret key, mode 0600 (refused if group/other readable)

Directories:

  * workers and clients: ``$AUTORESEARCH_KEYS``, else ``$XDG_CONFIG_HOME/autoresearch/keys``,
    else ``~/.config/autoresearch/keys`` -- on macOS too (one rule to document; the cache is
    likewise ``~/.cache/autoresearch`` on both). A worker uses the key named ``worker``, a client
    ``client``, so one machine can be a worker and a submitter with different roles.
  * the coordinator: ``DIR/.autoresearch/keys/coordinator.key[_secret]``.

Keys are handled as Z85 text (40 characters) in ``bytes``, which is what pyzmq's socket options
take. ``fingerprint()`` is the short form people compare by eye.
"""
from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85 as z85mod

ZAP_DOMAIN = "autoresearch"
KEYS_ENV = "AUTORESEARCH_KEYS"
WORKER_KEY_NAME = "worker"
CLIENT_KEY_NAME = "client"
COORDINATOR_KEY_NAME = "coordinator"

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_ALPHABET = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                ".-:+=^!/*?&<>()[]{}@%$#")
_Z85_VALUE = {c: i for i, c in enumerate(Z85_ALPHABET)}
KEY_CHARS = 40   # Z85 of a 32-byte Curve25519 key


class KeyFileError(RuntimeError):
    """A key file or key string is missing, malformed or unsafe; the message says what to do."""


@dataclass(frozen=True)
class Keypair:
    public: bytes   # Z85, 40 bytes
    secret: bytes   # Z85, 40 bytes

    def __repr__(self) -> str:  # never print a secret by accident (logs, tracebacks)
        return f"Keypair(public={self.public.decode()!r}, secret=<hidden>)"

    @property
    def public_str(self) -> str:
        return self.public.decode("ascii")


# --------------------------------------------------------------------------- locations

def default_key_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$AUTORESEARCH_KEYS, else $XDG_CONFIG_HOME/autoresearch/keys, else ~/.config/..."""
    env = os.environ if environ is None else environ
    if env.get(KEYS_ENV):
        return Path(env[KEYS_ENV]).expanduser()
    base = env.get("XDG_CONFIG_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".config"
    return root / "autoresearch" / "keys"


def coordinator_key_dir(repo_dir: Path) -> Path:
    """Where the coordinator of research repo ``repo_dir`` keeps its keypair."""
    return Path(repo_dir) / ".autoresearch" / "keys"


def key_paths(key_dir: Path, name: str) -> tuple[Path, Path]:
    """(public file, secret file) for key ``name`` in ``key_dir``."""
    _check_key_name(name)
    base = Path(key_dir).expanduser()
    return base / f"{name}{PUBLIC_SUFFIX}", base / f"{name}{SECRET_SUFFIX}"


# --------------------------------------------------------------------------- validation

def validate_public_key(key: str | bytes, what: str = "public key") -> bytes:
    """Return ``key`` as Z85 bytes, or raise ValueError saying exactly what is wrong."""
    if isinstance(key, bytes):
        try:
            key = key.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{what} must be 40 characters of Z85 text, got non-ASCII bytes") \
                from None
    if not isinstance(key, str):
        raise ValueError(f"{what} must be a string, got {type(key).__name__}")
    key = key.strip()
    if len(key) != KEY_CHARS:
        raise ValueError(f"{what} must be {KEY_CHARS} characters of Z85 text, got {len(key)}"
                         + (f" ({key[:12]}...)" if len(key) > 12 else f" ({key!r})"))
    for ch in key:
        if ch not in _Z85_VALUE:
            raise ValueError(f"{what} contains {ch!r}, which is not a Z85 character "
                             "(a mistyped or truncated key?)")
    # Each 5-character group encodes 4 bytes; 85**5 > 2**32, so some strings overflow.
    for i in range(0, KEY_CHARS, 5):
        value = 0
        for ch in key[i:i + 5]:
            value = value * 85 + _Z85_VALUE[ch]
        if value >= 1 << 32:
            raise ValueError(f"{what} is not a valid Z85 key (characters {i + 1}-{i + 5} "
                             "encode no 4-byte value): copy it again")
    return key.encode("ascii")


def public_key_from_arg(arg: str) -> bytes:
    """A CLI argument that is either a Z85 public key or the path of a ``.key`` file."""
    candidate = arg.strip()
    if len(candidate) != KEY_CHARS and os.path.exists(os.path.expanduser(candidate)):
        return read_public_key_file(Path(candidate).expanduser())
    return validate_public_key(candidate)


def fingerprint(public: str | bytes) -> str:
    """Short human form of a public key: 16 hex digits of its sha256, in groups of four."""
    z85 = validate_public_key(public)
    digest = hashlib.sha256(z85mod.decode(z85)).hexdigest()[:16]
    return "-".join(digest[i:i + 4] for i in range(0, 16, 4))


# --------------------------------------------------------------------------- files

def load_or_create_keypair(key_dir: Path, name: str) -> Keypair:
    """The keypair ``name`` in ``key_dir``, generated on first use.

    Creation is race-free: the secret file is written to a private temp file (0600 from the
    moment it exists) and hard-linked into place, which fails if another process got there first;
    the loser then reads the winner's key. The public file is derived from the secret one.
    """
    public_path, secret_path = key_paths(key_dir, name)
    if not secret_path.exists():
        _create(public_path.parent, name, public_path, secret_path)
    return load_keypair(key_dir, name)


def load_keypair(key_dir: Path, name: str) -> Keypair:
    """Read an existing keypair; KeyFileError if missing, malformed or readable by others."""
    public_path, secret_path = key_paths(key_dir, name)
    try:
        st = secret_path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"no secret key {secret_path}") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise KeyFileError(f"{secret_path} is readable by other users "
                           f"(mode {stat.S_IMODE(st.st_mode):03o}); run `chmod 600 {secret_path}`")
    fields = _read_fields(secret_path)
    if "secret-key" not in fields:
        raise KeyFileError(f"{secret_path} holds no secret-key line: not a CURVE secret key file")
    try:
        secret = validate_public_key(fields["secret-key"], what=f"secret key in {secret_path}")
    except ValueError as e:
        raise KeyFileError(str(e)) from None
    public = zmq.curve_public(secret)
    if fields.get("public-key") not in (None, public.decode()):
        raise KeyFileError(f"{secret_path}: its public-key line does not belong to its secret key "
                           "(file edited by hand?); restore it or delete both key files")
    if not public_path.exists():
        _write_public(public_path, name, public)   # derived; safe to recreate
    elif read_public_key_file(public_path) != public:
        raise KeyFileError(f"{public_path} does not match {secret_path}: delete {public_path} "
                           "and it will be rewritten from the secret key")
    return Keypair(public=public, secret=secret)


def read_public_key_file(path: Path) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    path = Path(path)
    try:
        fields = _read_fields(path)
    except FileNotFoundError:
        raise KeyFileError(f"no key file {path}") from None
    if "public-key" not in fields:
        raise KeyFileError(f"{path} holds no public-key line: not a CURVE key file")
    try:
        return validate_public_key(fields["public-key"], what=f"public key in {path}")
    except ValueError as e:
        raise KeyFileError(str(e)) from None


def _read_fields(path: Path) -> dict[str, str]:
    """``key = "value"`` lines of a ZPL-style certificate file (what pyzmq also writes)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        out[k.strip()] = v.strip().strip('"')
    return out


def _create(key_dir: Path, name: str, public_path: Path, secret_path: Path) -> None:
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.curve_keypair()
    tmp = key_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    text = _cert_text(name, public, secret)
    # O_EXCL + 0600 at creation: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, secret_path)   # atomic create-if-absent
        except FileExistsError:
            return                      # another process created it first: use theirs
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _write_public(public_path, name, public)


def _write_public(public_path: Path, name: str, public: bytes) -> None:
    tmp = public_path.with_name(f".{public_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(_cert_text(name, public, None), encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, public_path)


def _cert_text(name: str, public: bytes, secret: bytes | None) -> str:
    head = ("#   autoresearch CURVE secret key: never share or copy this file\n" if secret
            else "#   autoresearch CURVE public key: safe to share\n")
    lines = [head, "metadata\n", f'    name = "{name}"\n', "curve\n",
             f'    public-key = "{public.decode()}"\n']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"\n')
    return "".join(lines)


def _check_key_name(name: str) -> None:
    ok = bool(name) and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise ValueError(f"bad key name {name!r}: use letters, digits, '-', '_', '.'")


# --------------------------------------------------------------------------- sockets

def configure_server(sock: zmq.Socket, keypair: Keypair, domain: str = ZAP_DOMAIN) -> None:
    """Make ``sock`` a CURVE server (call before bind). A ZAP handler (coordinator.trust.
    FleetAuthenticator) in the socket's context then decides who may connect."""
    sock.curve_secretkey = keypair.secret
    sock.curve_publickey = keypair.public
    sock.curve_server = True
    sock.zap_domain = domain.encode()


def configure_client(sock: zmq.Socket, keypair: Keypair, server_public: str | bytes) -> None:
    """Make ``sock`` a CURVE client pinned to ``server_public`` (call before connect): if the
    peer does not hold that key's secret, the handshake never completes and nothing is sent."""
    sock.curve_secretkey = keypair.secret
    sock.curve_publickey = keypair.public
    sock.curve_serverkey = validate_public_key(server_public, what="server key")


def peer_key(frame: zmq.Frame) -> str | None:
    """The authenticated public key (Z85) of the peer that sent ``frame``, or None.

    Receive with ``recv_multipart(copy=False)`` to get Frames. With ``FleetAuthenticator`` the
    ZAP user id is the peer's public key, so this is who sent *this* message."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None
    return uid or None


class HandshakeMonitor:
    """Names why a CURVE client is not getting through, for a one-line message to the user.

    A client pinned to the wrong server key (or talking to a server without CURVE) sees TCP
    connect and then the handshake fail, forever, silently: libzmq keeps retrying and the
    messages just queue. Watch the socket's monitor events and report a state:

        "connecting"      no TCP connection yet (coordinator down, wrong address, firewall)
        "ok"              handshake succeeded (the server holds the pinned key)
        "server_key"      TCP connected but the handshake failed: the coordinator at that
                          address does not have the pinned key (or does not speak CURVE)
        "refused"         the server's ZAP handler refused this client's key
    """

    FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)

    def __init__(self, sock: zmq.Socket):
        events = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._sock = sock
        self._mon = sock.get_monitor_socket(events=events)
        self.state = "connecting"

    def poll(self, timeout_ms: int = 0) -> str:
        """Consume pending events (waiting up to ``timeout_ms`` for the first); return state."""
        from zmq.utils.monitor import recv_monitor_message

        while self._mon is not None and self._mon.poll(timeout_ms):
            timeout_ms = 0
            event = recv_monitor_message(self._mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.state = "ok"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.state = "refused"
            elif event in self.FAILED and self.state != "ok":
                self.state = "server_key"
        return self.state

    def close(self) -> None:
        if self._mon is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(linger=0)
            self._mon = None
