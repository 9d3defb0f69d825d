"""shared.datasync: serving a prepared dataset and fetching it into a worker cache (real files)."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

from shared import datasync
from shared.datasync import DatasetServer, DataSyncError, fetch_dataset
from trainer.dataset import read_manifest, resolve_dataset_dir, verify_dataset

SMALL_CHUNK = 64 * 1024   # several chunks per shard, so resume/corruption hit mid-file


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(datasync, "CHUNK_BYTES", SMALL_CHUNK)


class Asker:
    """The integrator's request/reply callable, in process, counting what it is asked."""

    def __init__(self, server: DatasetServer, fail_after: int | None = None, flip: set | None = None):
        self.server, self.fail_after, self.flip = server, fail_after, flip or set()
        self.chunks = 0
        self.requests: list[tuple] = []

    def __call__(self, what: str, args: dict):
        if what == datasync.QUERY_CHUNK:
            if self.fail_after is not None and self.chunks >= self.fail_after:
                raise ConnectionError("link dropped")
            self.chunks += 1
            self.requests.append((args["file"], args["offset"]))
        data = self.server.handle(what, args)
        key = (args.get("file"), args.get("offset"))
        if key in self.flip:   # corrupt this chunk once in transit
            self.flip.discard(key)
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def test_full_fetch_installs_verified_dataset(prepared_sample, tmp_path, small_chunks):
    server = DatasetServer(prepared_sample)
    man = server.manifest()
    assert man["dir_name"] == "sample" and man["name"] == "sample"
    ask, seen = Asker(server), []
    path = fetch_dataset(ask, tmp_path, progress=lambda done, total: seen.append((done, total)))
    total = sum(m["bytes"] for m in man["files"].values())
    assert path == tmp_path / "datasets" / f"sample-{man['dataset_hash'][:8]}"
    assert verify_dataset(path) == []
    assert read_manifest(path)["dataset_hash"] == man["dataset_hash"]
    assert seen[-1] == (total, total) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    expected = sum(-(-m["bytes"] // SMALL_CHUNK) for m in man["files"].values())
    assert ask.chunks == expected
    assert resolve_dataset_dir({"AUTORESEARCH_DATA": str(path)}) == path
    assert not list((tmp_path / "datasets").glob(".incoming-*"))
    assert not (tmp_path / "datasets" / "CURRENT").exists()   # worker's CURRENT untouched

    # identical dataset already present -> only the manifest is asked for
    again = Asker(server)
    assert fetch_dataset(again, tmp_path) == path and again.chunks == 0


def test_corrupted_chunk_is_detected_and_refetched(prepared_sample, tmp_path, small_chunks):
    server = DatasetServer(prepared_sample)
    files = server.manifest()["files"]
    big = max(files, key=lambda f: files[f]["bytes"])
    ask = Asker(server, flip={(big, SMALL_CHUNK)})
    logs = []
    path = fetch_dataset(ask, tmp_path, log=logs.append)
    assert verify_dataset(path) == []
    assert any(f"{big}: sha256 mismatch" in line for line in logs)
    assert ask.requests.count((big, 0)) == 2   # the whole file came twice


def test_persistent_corruption_gives_clear_error(prepared_sample, tmp_path, small_chunks):
    server = DatasetServer(prepared_sample)

    def bad(what, args):
        data = server.handle(what, args)
        if what == datasync.QUERY_CHUNK and args["file"] == "val.npz" and args["offset"] == 0:
            data = b"X" + data[1:]
        return data

    with pytest.raises(DataSyncError, match="val.npz: downloaded twice and its sha256 still"):
        fetch_dataset(bad, tmp_path)
    assert not list((tmp_path / "datasets").glob("sample-*"))


def test_interrupted_fetch_resumes_with_only_the_rest(prepared_sample, tmp_path, small_chunks):
    server = DatasetServer(prepared_sample)
    full = Asker(server)
    fetch_dataset(full, tmp_path / "reference")
    need = full.chunks
    assert need > 6

    first = Asker(server, fail_after=5)
    with pytest.raises(ConnectionError):
        fetch_dataset(first, tmp_path / "cache")
    incoming = list((tmp_path / "cache" / "datasets").glob(".incoming-*"))
    assert len(incoming) == 1 and any(p.suffix == ".part" for p in incoming[0].iterdir())
    second = Asker(server)
    path = fetch_dataset(second, tmp_path / "cache")
    assert first.chunks + second.chunks == need
    assert not set(first.requests) & set(second.requests)
    assert verify_dataset(path) == []


def test_inconsistent_manifest_is_refused(prepared_sample, tmp_path):
    server = DatasetServer(prepared_sample)
    man = server.manifest()
    fname = next(iter(man["files"]))
    man["files"][fname] = dict(man["files"][fname], sha256="0" * 64)
    ask = Asker(server)
    with pytest.raises(DataSyncError, match="dataset_hash does not match its files"):
        fetch_dataset(lambda w, a: man if w == datasync.QUERY_MANIFEST else ask(w, a), tmp_path)
    assert ask.chunks == 0
    evil = dict(server.manifest(), files={"../etc": {"sha256": "0" * 64, "bytes": 1}})
    with pytest.raises(DataSyncError, match="unsafe file name"):
        datasync.check_manifest(evil)
    with pytest.raises(DataSyncError, match="lacks 'vocab_size'"):
        datasync.check_manifest({"name": "x"})


def test_server_refuses_path_tricks(prepared_sample, tmp_path):
    server = DatasetServer(prepared_sample)
    for bad in ("../sample/val.npz", "/etc/passwd", "manifest.json", "val.npz\0", "./val.npz",
                "sub/val.npz", "", None, 7, "VAL.NPZ", ".lock"):
        with pytest.raises(DataSyncError, match="is not a file of dataset sample"):
            server.chunk(bad, 0, 10)
    for offset, length in ((-1, 10), (0, -5), (True, 10), (0, "9")):
        with pytest.raises(DataSyncError, match="non-negative integer"):
            server.chunk("val.npz", offset, length)
    with pytest.raises(DataSyncError, match="past the end"):
        server.chunk("val.npz", 10**9, 10)
    assert len(server.chunk("val.npz", 0, 10**9)) <= datasync.CHUNK_BYTES
    with pytest.raises(DataSyncError, match="unknown dataset query"):
        server.handle("dataset_everything", {})


def test_server_needs_a_dataset(tmp_path):
    with pytest.raises(DataSyncError, match="not a prepared dataset"):
        DatasetServer(tmp_path)


def test_damaged_install_is_replaced(prepared_sample, tmp_path, small_chunks):
    server = DatasetServer(prepared_sample)
    path = fetch_dataset(Asker(server), tmp_path)
    with open(path / "val.npz", "r+b") as fh:   # same size, different bytes
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 1]))
    ask = Asker(server)
    assert fetch_dataset(ask, tmp_path) == path
    assert ask.chunks > 0 and verify_dataset(path) == []


def test_same_name_different_data_do_not_collide(prepared_sample, tmp_path, small_chunks):
    other = tmp_path / "other" / "sample"
    shutil.copytree(prepared_sample, other)
    man = json.loads((other / "manifest.json").read_text())
    man["files"].pop(sorted(f for f in man["files"] if f.startswith("train_"))[-1])
    (other / "manifest.json").write_text(json.dumps(dict(
        man, dataset_hash=datasync.dataset_hash(man["files"]))))
    a = fetch_dataset(Asker(DatasetServer(prepared_sample)), tmp_path / "cache")
    b = fetch_dataset(Asker(DatasetServer(other)), tmp_path / "cache")
    assert a != b and a.name.startswith("sample-") and b.name.startswith("sample-")
    assert verify_dataset(a) == []


def test_harness_fingerprint_covers_fixed_sources_only():
    names = [p.name for p in datasync.harness_files()]
    assert "harness.py" in names and "dataset.py" in names and "__init__.py" in names
    assert "train.py" not in names and "presets.py" not in names
    assert "trainer_contract.py" in names   # the boundary decides how a run is classified
    hashes = datasync.harness_file_hashes()
    fp = datasync.harness_fingerprint()
    assert fp == datasync.harness_fingerprint(hashes) and len(fp) == 64
    changed = dict(hashes, **{"harness.py": "0" * 64})
    assert datasync.harness_fingerprint(changed) != fp
    assert datasync.harness_difference(hashes, changed) == ["trainer/harness.py: differs"]
    assert datasync.harness_difference(hashes, hashes) == []


def test_workers_sharing_a_cache_fetch_once(prepared_sample, tmp_path, small_chunks):
    server = DatasetServer(prepared_sample)
    reference = Asker(server)
    fetch_dataset(reference, tmp_path / "reference")
    askers, paths, barrier = [Asker(server) for _ in range(3)], [], threading.Barrier(3)

    def work(ask):
        barrier.wait()
        paths.append(fetch_dataset(ask, tmp_path / "shared"))

    threads = [threading.Thread(target=work, args=(a,)) for a in askers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 3
    assert sum(a.chunks for a in askers) == reference.chunks
