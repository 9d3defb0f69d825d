"""Keys and data across real processes: who may join, what a worker refuses, how data arrives.

A keyed coordinator (``autoresearch-coord start``, CURVE on by default) serves the session's
prepared sample; every "machine" is a process with its own key directory (AUTORESEARCH_KEYS)
and, where it matters, its own empty data cache. The research repo's train.py is a stand-in
that refuses to report unless AUTORESEARCH_DATA points at a dataset whose manifest hash is the
coordinator's, so a counted result proves the data arrived. Wire-level dataset transfer faults
(corrupted chunk, interrupted transfer) run against an in-process keyed server over real
CURVE sockets. Deadlines only turn hangs into failures; nothing asserts a time.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from shared.client import Client, ClientError
from shared import datasync, protocol
from shared.codec import decode, encode
from shared.keys import configure_client, coordinator_key_dir, load_or_create_keypair
from serving import served
from test_fleet import HB, Proc
from trainer.dataset import dataset_hash, file_sha256, read_manifest

pytestmark = pytest.mark.slow

CHECKING_TRAIN_PY = '''"""Stand-in train.py: reports BPB only when it got the coordinator's dataset."""
import json
import os
import sys
import time

BPB = 1.50
SLEEP = 0.2
EXPECTED = "@HASH@"


def main():
    data = os.environ.get("AUTORESEARCH_DATA", "")
    with open(os.path.join(data, "manifest.json")) as f:
        got = json.load(f)["dataset_hash"]
    if got != EXPECTED:
        sys.exit(f"wrong dataset {got} at {data}")
    time.sleep(SLEEP)
    from trainer.harness import write_result
    write_result("ok", val_bpb=BPB, training_seconds=SLEEP, num_steps=1)


if __name__ == "__main__":
    main()
'''


def variant(bpb: float, sleep: float, expected: str) -> str:
    return (CHECKING_TRAIN_PY.replace("@HASH@", expected)
            .replace("BPB = 1.50", f"BPB = {bpb!r}").replace("SLEEP = 0.2", f"SLEEP = {sleep!r}"))


def cli(*args: str, env: dict | None = None):
    import os
    import subprocess

    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture(autouse=True)
def _own_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_KEYS", str(tmp_path / "admin-keys"))
    monkeypatch.delenv("AUTORESEARCH_SERVER_KEY", raising=False)


@pytest.fixture
def lab(tmp_path, prepared_sample, monkeypatch):
    """A keyed research repo whose train.py checks its data; start/worker helpers."""
    from coordinator.repo import SINGLE_RUN, init_repo

    expected = read_manifest(prepared_sample)["dataset_hash"]
    repo = tmp_path / "research"
    init_repo(repo, tag="sec", preset="tiny", train_py=variant(1.50, 0.2, expected),
              **SINGLE_RUN)  # mechanics of keys and trust: one result, one decision
    monkeypatch.setenv("AUTORESEARCH_DATA", str(prepared_sample))
    procs: list[Proc] = []

    class Lab:
        def __init__(self):
            self.repo, self.expected, self.tmp = repo, expected, tmp_path
            self.server_key = load_or_create_keypair(coordinator_key_dir(repo),
                                                     "coordinator").public_str
            self.coord_proc: Proc | None = None
            self.ep = ""

        def start(self, *extra: str, data: Path | None = None) -> Proc:
            argv = [sys.executable, "-m", "coordinator.cli", "start", str(repo),
                    "--bind", "tcp://127.0.0.1:0", *HB, *extra]
            if data is not None:
                argv += ["--data", str(data)]
            p = Proc(argv, "coordinator")
            procs.append(p)
            self.ep = p.wait_for(r"listening on (tcp://\S+)").group(1)
            p.wait_for(r"watch with:")
            self.coord_proc = p
            return p

        def worker(self, name: str, *extra: str, keys: str | None = None,
                   server_key: str | None = None, env: dict | None = None) -> Proc:
            argv = [sys.executable, "-m", "worker.cli", "join", self.ep, "--name", name,
                    "--server-key", server_key or self.server_key, "--threads", "1", *HB,
                    "--reconnect-max", "0.4", "--cache-dir", str(tmp_path / f"cache-{name}"),
                    *extra]
            p = Proc(argv, name, env={"AUTORESEARCH_KEYS": str(tmp_path / (keys or name)),
                                      "AUTORESEARCH_DATA": "", **(env or {})})
            procs.append(p)
            return p

        def worker_key(self, keys: str) -> str:
            return load_or_create_keypair(tmp_path / keys, "worker").public_str

        def admin(self, *args: str):
            r = cli(*args, "--dir", str(repo))
            assert r.returncode == 0, r
            return r

        def submit(self, bpb: float, sleep: float, description: str) -> int:
            with Client(self.ep, timeout=15) as c:
                return c.submit(variant(bpb, sleep, expected), description)["candidate_id"]

    yield Lab()
    for p in procs:
        p.stop()


def head_measured(coord: Proc, since: int = 0) -> None:
    coord.wait_for(r"result \S+ from \S+: ok val_bpb 1\.5000, accepted", since=since)


# ---- enrolment ----------------------------------------------------------------------------

def test_untrusted_worker_is_told_its_key_then_trusted_it_works(lab):
    coord = lab.start()
    w = lab.worker("newbie")
    assert w.wait() == 3
    key = lab.worker_key("newbie")
    assert key in w.text and "autoresearch-coord trust" in w.text and "--role worker" in w.text
    assert coord.count(r"assign ") == 0
    r = lab.admin("trust", key, "--name", "newbie", "--role", "worker")
    assert r.returncode == 0 and "trusted newbie as worker" in r.stdout, r
    keys = json.loads(lab.admin("keys", "--json").stdout)["keys"]
    assert {"newbie": "worker"}.items() <= {k["name"]: k["role"] for k in keys}.items()
    assert any(k["role"] == "admin" for k in keys)   # start trusted the local client key
    # status shows who is trusted (the local admin key was trusted by start)
    st = cli("status", "--connect", lab.ep)
    assert st.returncode == 0 and "trusted keys:" in st.stdout and "newbie" in st.stdout, st
    lab.worker("newbie")
    head_measured(coord)


def test_invite_enrols_one_machine_once(lab):
    coord = lab.start()
    r = lab.admin("invite", "--connect", lab.ep)
    assert r.returncode == 0, r
    token = re.search(r"(inv-[0-9a-f]+)", r.stdout).group(1)
    assert f"autoresearch-worker join {lab.ep} --server-key '{lab.server_key}' --invite {token}" \
        in r.stdout
    first = lab.worker("laptop1", "--invite", token)
    first.wait_for(r"enrolled with the invite as laptop1 \(role worker\)")
    head_measured(coord)
    second = lab.worker("laptop2", "--invite", token)   # another machine, same token
    assert second.wait() == 3
    assert "enrolment refused: invite already used" in second.text
    assert coord.count(r"-> laptop2") == 0


def test_revoked_worker_cut_off_mid_run_and_candidate_requeued(lab):
    coord = lab.start()
    lab.admin("trust", lab.worker_key("victim"), "--name", "victim", "--role", "worker")
    w = lab.worker("victim")
    head_measured(coord)
    mark = coord.mark()
    cand = lab.submit(1.40, 30.0, "long run")
    coord.wait_for(rf"assign \S+ candidate #{cand} \S+ -> victim", since=mark)
    w.wait_for(rf"assigned \S+: candidate #{cand}\b")
    r = lab.admin("revoke", "victim")
    assert r.returncode == 0, r
    coord.wait_for(rf"worker victim \S+ cut off: key revoked .*requeued #{cand}\b", since=mark)
    assert w.wait() == 3
    assert "revoked" in w.text
    log = Client(lab.ep, timeout=10).query("status")
    assert any(q.get("candidate_id") == cand for q in log.get("queue") or []), log


def test_wrong_server_key_worker_refuses_to_run_anything(lab):
    coord = lab.start()
    wrong = load_or_create_keypair(lab.tmp / "elsewhere", "coordinator").public_str
    lab.admin("trust", lab.worker_key("careful"), "--name", "careful", "--role", "worker")
    w = lab.worker("careful", server_key=wrong)
    assert w.wait() == 4
    assert "does not have the pinned key" in w.text and "refusing to run anything" in w.text
    assert "assigned" not in w.text and coord.count(r"assign ") == 0


def test_keys_that_look_like_options_are_accepted(lab):
    """Z85 keys may start with '-' (even '-h'); trust and revoke still take them."""
    from coordinator.trust import TrustStore

    for key in ("-h" + "0" * 38, "-" + "a" * 39):
        r = lab.admin("trust", key, "--name", f"k{len(key)}{key[1]}", "--role", "worker")
        assert "trusted" in r.stdout
        lab.admin("revoke", key)
    with TrustStore.open(lab.repo) as store:
        assert all(not e.active for e in store.list() if e.public_key.startswith("-"))


def test_roles_are_enforced(lab, tmp_path):
    lab.start()
    worker_kp = load_or_create_keypair(tmp_path / "rw", "worker")
    sub_kp = load_or_create_keypair(tmp_path / "rs", "client")
    lab.admin("trust", worker_kp.public_str, "--name", "rw", "--role", "worker")
    lab.admin("trust", sub_kp.public_str, "--name", "rs", "--role", "submitter")
    with Client(lab.ep, timeout=10, server_key=lab.server_key, keypair=worker_kp) as c:
        with pytest.raises(ClientError, match=r"forbidden.*role worker.*submit needs role"):
            c.submit(variant(1.4, 0.1, lab.expected), "from a worker key")
    with Client(lab.ep, timeout=10, server_key=lab.server_key, keypair=sub_kp) as c:
        assert c.query("status")["security"] == "curve"
        with pytest.raises(ClientError, match=r"forbidden.*role submitter.*hello needs role"):
            c.requester.request("hello", worker_id="rs-1", name="rs", profile={},
                                hw_class="x", attempt_id=None)
        with pytest.raises(ClientError, match=r"forbidden"):
            c.query("dataset_manifest")


# ---- data ---------------------------------------------------------------------------------

def test_two_keyed_workers_without_data_fetch_it_and_results_count(lab):
    """Done-when: keyed coordinator, two keyed workers with empty caches on loopback; they get
    the dataset from the coordinator and their results count."""
    coord = lab.start()
    for name in ("w1", "w2"):
        lab.admin("trust", lab.worker_key(name), "--name", name, "--role", "worker")
    w1, w2 = lab.worker("w1"), lab.worker("w2")
    for w in (w1, w2):
        w.wait_for(r"dataset sample \S+ ready at \S+sample-" + lab.expected[:8])
    head_measured(coord)
    better = lab.submit(1.40, 0.2, "better")
    coord.wait_for(rf"KEEP #{better}\b.*1\.4000")
    for name in ("w1", "w2"):
        fetched = lab.tmp / f"cache-{name}" / "datasets" / f"sample-{lab.expected[:8]}"
        assert read_manifest(fetched)["dataset_hash"] == lab.expected
    assert "100.0%" in w1.text   # the progress bar reached the end


def altered_copy(src: Path, dst: Path) -> Path:
    """A consistent dataset differing from ``src`` in one byte of val.npz."""
    shutil.copytree(src, dst)
    val = dst / "val.npz"
    data = bytearray(val.read_bytes())
    data[-1] ^= 0xFF
    val.write_bytes(bytes(data))
    man = json.loads((dst / "manifest.json").read_text())
    man["files"]["val.npz"]["sha256"] = file_sha256(val)
    man["dataset_hash"] = dataset_hash(man["files"])
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def test_dataset_is_fixed_per_run_and_damage_means_no_work(lab, prepared_sample):
    first = lab.start()
    first.stop()
    other = altered_copy(prepared_sample, lab.tmp / "other-data")
    refused = Proc([sys.executable, "-m", "coordinator.cli", "start", str(lab.repo), "--bind",
                    "tcp://127.0.0.1:0", "--data", str(other), *HB], "refused")
    try:
        assert refused.wait() == 1
    finally:
        refused.stop()
    assert "not comparable" in refused.text and "--new-dataset" in refused.text
    # The coordinator's data changes on disk after start: its manifest no longer matches the
    # bytes it serves. The worker says so and takes no work.
    coord = lab.start("--new-dataset", data=other)
    val = other / "val.npz"
    data = bytearray(val.read_bytes())
    data[0] ^= 0xFF
    val.write_bytes(bytes(data))
    lab.admin("trust", lab.worker_key("w1"), "--name", "w1", "--role", "worker")
    w = lab.worker("w1")
    w.wait_for(r"cannot use the coordinator's dataset, taking no work .*sha256 still differs")
    st = json.loads(cli("status", "--json", "--connect", lab.ep).stdout)
    assert "dataset" in st["not_working"]["w1"]
    assert coord.count(r"assign ") == 0 and "assigned" not in w.text


def test_modified_harness_gets_no_work_and_is_told_why(lab):
    coord = lab.start()
    lab.admin("trust", lab.worker_key("odd"), "--name", "odd", "--role", "worker")
    w = lab.worker("odd", env={"AUTORESEARCH_TEST_HARNESS_FINGERPRINT": "f" * 64})
    w.wait_for(r"taking no work: this machine's trainer harness \(ffffffffffff\) differs")
    w.wait_for(r"harness differs from the coordinator's: same files, different fingerprint")
    st = cli("status", "--connect", lab.ep)
    assert re.search(r"odd: mismatch: harness", st.stdout), st.stdout
    time.sleep(1.0)   # a few heartbeats: it stays connected and still gets nothing
    assert w.p.poll() is None and coord.count(r"assign ") == 0


# ---- wire-level dataset transfer faults (in-process keyed server, real CURVE sockets) ------

class KeyedServer:
    def __init__(self, repo: Path, dataset_dir: Path, tmp: Path):
        from coordinator.core import Coordinator
        from coordinator.server import Server
        from coordinator.trust import TrustStore

        self.kp = load_or_create_keypair(coordinator_key_dir(repo), "coordinator")
        self.worker_kp = load_or_create_keypair(tmp / "wire-keys", "worker")
        with TrustStore.open(repo) as store:
            store.trust(self.worker_kp.public, "wire", "worker")
        self.core = Coordinator(repo)
        self.events: list[str] = []
        self.server = Server(self.core, bind="tcp://127.0.0.1:*", heartbeat_interval=0.1,
                             liveness=5, event=self.events.append, keypair=self.kp,
                             dataset=datasync.DatasetServer(dataset_dir))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(20)
        self.server.close()
        self.core.close()


@pytest.fixture
def keyed_server(lab, prepared_sample, monkeypatch):
    monkeypatch.setattr(datasync, "CHUNK_BYTES", 64 * 1024)   # many chunks per file
    s = KeyedServer(lab.repo, prepared_sample, lab.tmp)
    yield s
    s.close()


class FaultyAsk:
    """The worker's fetch (shared.dealer.Requester.ask), counting chunks; drops the link or flips a byte."""

    def __init__(self, requester, fail_after: int | None = None, flip: set | None = None):
        self.req, self.fail_after, self.flip = requester, fail_after, set(flip or ())
        self.chunks: list[tuple] = []

    def __call__(self, what: str, args: dict):
        if what == datasync.QUERY_CHUNK:
            if self.fail_after is not None and len(self.chunks) >= self.fail_after:
                raise ConnectionError("link dropped")
            self.chunks.append((args["file"], args["offset"]))
        data = self.req.ask(what, args)
        key = (args.get("file"), args.get("offset"))
        if key in self.flip:
            self.flip.discard(key)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def test_wire_fetch_resumes_after_interruption_and_refetches_a_corrupted_chunk(keyed_server,
                                                                              tmp_path):
    from shared.dealer import Requester

    req = Requester(keyed_server.server.endpoint, keypair=keyed_server.worker_kp,
                    server_key=keyed_server.kp.public, timeout=10)
    try:
        manifest = req.ask(datasync.QUERY_MANIFEST, {})
        files = manifest["files"]
        cache = tmp_path / "wcache"
        # 1. the link drops after a few chunks (in the middle of some file)
        first = FaultyAsk(req, fail_after=5)
        with pytest.raises(ConnectionError):
            datasync.fetch_dataset(first, cache)
        cut_file, cut_offset = first.chunks[-1]
        # 2. resumed fetch, with one chunk of a not-yet-fetched file corrupted in transit
        victim = next(f for f in sorted(files, reverse=True)
                      if f not in {c[0] for c in first.chunks})
        second = FaultyAsk(req, flip={(victim, 0)})
        logs: list[str] = []
        path = datasync.fetch_dataset(second, cache, log=logs.append)
    finally:
        req.close()
    # Only the remaining chunks were requested: nothing fetched before is asked again, and the
    # interrupted file continues right after its last received chunk.
    assert not set(first.chunks) & set(second.chunks)
    assert [o for f, o in second.chunks if f == cut_file][0] == cut_offset + 64 * 1024
    # The corrupted chunk failed the file's sha256; the file was fetched again and verified.
    assert any(f"{victim}: sha256 mismatch" in line for line in logs)
    assert second.chunks.count((victim, 0)) == 2
    assert read_manifest(path)["dataset_hash"] == manifest["dataset_hash"]
    assert not list((cache / "datasets").glob(".incoming-*"))


def test_ready_with_other_harness_is_refused_on_the_wire(keyed_server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    configure_client(sock, keyed_server.worker_kp, keyed_server.kp.public)
    sock.connect(keyed_server.server.endpoint)
    try:
        sock.send(encode(protocol.make(
            "hello", worker_id="wire-1", name="wire", profile={}, hw_class="x/1GB/cpu",
            attempt_id=None, harness_fingerprint="0" * 64, dataset_hash=None)))
        sock.send(encode(protocol.make("ready", worker_id="wire-1")))
        got = []
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(m.get("code") == "mismatch" for m in got):
            if sock.poll(500):
                got.append(decode(sock.recv()))
        welcome = next(m for m in got if m["type"] == "welcome")
        assert welcome["dataset_hash"] == keyed_server.server.dataset_hash
        assert welcome["harness_fingerprint"] == datasync.harness_fingerprint()
        err = next(m for m in got if m.get("code") == "mismatch")
        assert "harness" in err["message"]
        assert not any(m["type"] == "assign" for m in got)
    finally:
        sock.close(0)


# ---- worker-side refusals that are not the candidate's fault ------------------------------

def test_low_disk_reports_cancelled_and_backs_off(fleet_repo, tmp_path):
    """LowDiskSpace at start: the attempt is reported cancelled (requeued, no strike) and the
    worker asks for no work during its back-off."""
    from worker.agent import Agent, AgentConfig
    from worker.runner import LowDiskSpace

    events: list[str] = []
    calls: list[str] = []

    def start(spec, run_root, env):
        calls.append(spec.attempt_id)
        raise LowDiskSpace("only 1 MiB free under /runs: free some disk space")

    said: list[str] = []
    with served(fleet_repo, heartbeat_interval=0.1, liveness=5,
                event=events.append) as (core, server):
        agent = Agent(AgentConfig(server.endpoint, "disk", tmp_path / "c",
                                  heartbeat_interval=0.1, ready_resend=0.2),
                      {"hw_class": "Test/8GB/cpu"}, event=said.append, start_attempt=start,
                      run_root=tmp_path / "runs", env={})
        at = threading.Thread(target=agent.run, daemon=True)
        at.start()
        try:
            end = time.monotonic() + 30
            while time.monotonic() < end and not any(e.startswith("result") for e in events):
                time.sleep(0.05)
            line = next(e for e in events if e.startswith("result"))
            assert ": cancelled val_bpb -" in line, events   # the head measurement, not a failure
            assert any("low on disk" in s for s in said), said
            time.sleep(1.0)   # several ready-resend periods: still backing off
            assert len(calls) == 1 and agent.hold_until > agent.clock()
            heads = core.status()["heads"]
            assert all(h["failed_runs"] == 0 for h in heads), heads   # no strike
        finally:
            agent.interrupts = 2
            at.join(20)


def test_insecure_mode_still_works_end_to_end(lab):
    """--insecure on both sides: plain TCP, no trust list; the dataset is still served."""
    coord = lab.start("--insecure")
    coord.wait_for(r"workers join with: .*--insecure")
    argv = [sys.executable, "-m", "worker.cli", "join", lab.ep, "--insecure", "--name", "open",
            "--threads", "1", *HB, "--cache-dir", str(lab.tmp / "cache-open")]
    w = Proc(argv, "open", env={"AUTORESEARCH_KEYS": str(lab.tmp / "open"),
                                "AUTORESEARCH_DATA": ""})
    try:
        head_measured(coord)
        st = cli("status", "--connect", lab.ep, "--insecure")
        assert st.returncode == 0 and "INSECURE" in st.stdout, st
    finally:
        w.stop()
    assert "insecure: no keys" in w.text and not (lab.tmp / "open").exists()
