"""shared.keys: key files, permissions, validation, fingerprints, CURVE socket setup."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import zmq
import zmq.auth

from shared import keys
from shared.keys import KeyFileError, Keypair
from handshake import curve_pair, wait_for_handshake  # noqa: E402  (tests/handshake.py)


def test_create_then_load_same_keypair(tmp_path):
    kdir = tmp_path / "keys"
    kp = keys.load_or_create_keypair(kdir, "worker")
    assert len(kp.public) == 40 and len(kp.secret) == 40
    assert zmq.curve_public(kp.secret) == kp.public
    assert keys.load_or_create_keypair(kdir, "worker") == kp
    pub, sec = keys.key_paths(kdir, "worker")
    assert pub.name == "worker.key" and sec.name == "worker.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(kdir.stat().st_mode) & 0o077 == 0
    assert kp.secret.decode() not in pub.read_text()
    assert kp.secret.decode() not in repr(kp)
    # pyzmq's own certificate reader understands our files
    assert zmq.auth.load_certificate(str(sec)) == (kp.public, kp.secret)
    assert zmq.auth.load_certificate(str(pub)) == (kp.public, None)


def test_secret_never_world_readable_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        keys.load_or_create_keypair(tmp_path, "w")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.key_secret").stat().st_mode) == 0o600


def test_group_readable_secret_is_refused_with_chmod_hint(tmp_path):
    keys.load_or_create_keypair(tmp_path, "w")
    sec = tmp_path / "w.key_secret"
    os.chmod(sec, 0o640)
    with pytest.raises(KeyFileError, match=rf"chmod 600 {sec}"):
        keys.load_or_create_keypair(tmp_path, "w")
    os.chmod(sec, 0o600)
    keys.load_keypair(tmp_path, "w")


def test_public_file_rederived_and_mismatch_detected(tmp_path):
    kp = keys.load_or_create_keypair(tmp_path, "w")
    (tmp_path / "w.key").unlink()
    assert keys.load_keypair(tmp_path, "w") == kp
    assert keys.read_public_key_file(tmp_path / "w.key") == kp.public
    other = zmq.curve_keypair()[0].decode()
    (tmp_path / "w.key").write_text(f'curve\n    public-key = "{other}"\n')
    with pytest.raises(KeyFileError, match="does not match"):
        keys.load_keypair(tmp_path, "w")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(KeyFileError, match="no secret key"):
        keys.load_keypair(tmp_path, "absent")
    fd = os.open(tmp_path / "bad.key_secret", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"hello\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="no secret-key line"):
        keys.load_keypair(tmp_path, "bad")
    with pytest.raises(ValueError, match="bad key name"):
        keys.key_paths(tmp_path, "../evil")


def test_concurrent_creation_yields_one_keypair(tmp_path):
    results, barrier = [], threading.Barrier(6)

    def make():
        barrier.wait()
        results.append(keys.load_or_create_keypair(tmp_path / "k", "worker"))

    threads = [threading.Thread(target=make) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({kp.public for kp in results}) == 1
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["worker.key", "worker.key_secret"]


def test_default_key_dir_rules(tmp_path):
    assert keys.default_key_dir({"AUTORESEARCH_KEYS": str(tmp_path)}) == tmp_path
    assert keys.default_key_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == \
        tmp_path / "autoresearch" / "keys"
    assert keys.default_key_dir({}) == Path.home() / ".config" / "autoresearch" / "keys"
    assert keys.coordinator_key_dir(tmp_path) == tmp_path / ".autoresearch" / "keys"


def test_validate_public_key_messages():
    pub = zmq.curve_keypair()[0]
    assert keys.validate_public_key(pub) == pub
    assert keys.validate_public_key(" " + pub.decode() + "\n") == pub
    with pytest.raises(ValueError, match="40 characters of Z85 text, got 39"):
        keys.validate_public_key(pub[:39])
    with pytest.raises(ValueError, match="'~', which is not a Z85 character"):
        keys.validate_public_key("~" + pub.decode()[1:])
    with pytest.raises(ValueError, match="not a valid Z85 key"):
        keys.validate_public_key("#" * 40)
    with pytest.raises(ValueError, match="non-ASCII"):
        keys.validate_public_key("é".encode() * 20)


def test_public_key_from_arg_accepts_key_or_file(tmp_path):
    kp = keys.load_or_create_keypair(tmp_path, "c")
    assert keys.public_key_from_arg(kp.public.decode()) == kp.public
    assert keys.public_key_from_arg(str(tmp_path / "c.key")) == kp.public
    with pytest.raises(ValueError):
        keys.public_key_from_arg(str(tmp_path / "nope.key"))


def test_fingerprint_is_short_stable_and_distinct():
    a, b = zmq.curve_keypair()[0], zmq.curve_keypair()[0]
    fa = keys.fingerprint(a)
    assert fa == keys.fingerprint(a.decode()) and fa != keys.fingerprint(b)
    assert len(fa) == 19 and fa.count("-") == 3


def test_curve_roundtrip_and_wrong_pin_is_named(tmp_path):
    ctx = zmq.Context()
    try:
        server_kp = keys.load_or_create_keypair(tmp_path / "s", "coordinator")
        client_kp = keys.load_or_create_keypair(tmp_path / "c", "client")
        srv, cli, mon = curve_pair(ctx, server_kp, client_kp, server_kp.public)
        cli.send(b"hi")
        assert srv.poll(5000)
        frames = srv.recv_multipart(copy=False)
        assert frames[1].bytes == b"hi"
        assert mon.poll(2000) == "ok"
        mon.close()
        for s in (srv, cli):
            s.close()

        wrong = Keypair(*zmq.curve_keypair())
        srv, cli, mon = curve_pair(ctx, server_kp, client_kp, wrong.public)
        cli.send(b"hi")
        assert wait_for_handshake(mon, "server_key") == "server_key"
        assert not srv.poll(200)   # nothing got through
        mon.close()
        for s in (srv, cli):
            s.close()
    finally:
        ctx.term()
