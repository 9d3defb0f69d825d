"""Dataset distribution: the coordinator serves its prepared dataset, workers fetch what they lack.

Over the wire this is two ``query`` requests (the integrator supplies the request/reply callable):

    query what="dataset_manifest" args={}                       -> the manifest (a map)
    query what="dataset_chunk" args={"file", "offset", "length"} -> bytes (<= CHUNK_BYTES)

Worker cache layout (the trainer's ``$AUTORESEARCH_CACHE/datasets``; see trainer/dataset.py)::

    datasets/<name>-<hash8>/          an installed fetched dataset; point AUTORESEARCH_DATA here
    datasets/.incoming-<hash16>/      a fetch in progress: <file>.part (resumable), <file> (verified)
    datasets/.lock                    the same filelock autoresearch-prepare takes

Installed fetched datasets are named ``<name>-<first 8 hex of dataset_hash>``: two coordinators
that both call their data "sample" but hold different bytes never share a directory, identical
datasets are fetched once, and a locally prepared ``datasets/sample`` is never touched. The
worker's CURRENT pointer is left alone; runs get the path through AUTORESEARCH_DATA.

Trust: a manifest is checked for internal consistency (dataset_hash recomputed from its files
map, names safe) and every file against its sha256 before it is installed, so a worker trains
only on exactly the bytes the coordinator's manifest names.

``harness_fingerprint()`` hashes the trainer's fixed harness sources (everything in trainer/
except train.py, which research edits, and presets.py), so a worker can refuse to run when its
harness differs from the coordinator's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from shared import trainer_contract
from shared.codec import MAX_FRAME_BYTES
from trainer.dataset import (
    LOCK_FILE, MANIFEST_FILE, DatasetError, dataset_hash, datasets_root, file_sha256,
    install_dir, read_manifest,
)

# 1 MiB per request: a reply (chunk + envelope) stays well below the codec's frame limit.
CHUNK_BYTES = 1 << 20
if CHUNK_BYTES * 2 > MAX_FRAME_BYTES:
    raise ImportError("CHUNK_BYTES must stay well below shared.codec.MAX_FRAME_BYTES")
QUERY_MANIFEST = "dataset_manifest"
QUERY_CHUNK = "dataset_chunk"
QUERIES = (QUERY_MANIFEST, QUERY_CHUNK)
HARNESS_EXCLUDE = ("train.py", "presets.py")

_HEX64 = re.compile(r"[0-9a-f]{64}")

Ask = Callable[[str, dict], Any]
Progress = Callable[[int, int], None]


class DataSyncError(RuntimeError):
    """A dataset could not be served or fetched; the message says what went wrong."""


# --------------------------------------------------------------------------- names

def safe_file_name(fname: Any) -> bool:
    """A bare file name as prepare writes them: no directories, no dot-files, no NUL."""
    return (isinstance(fname, str) and 0 < len(fname) <= 255 and fname != MANIFEST_FILE
            and not fname.startswith(".") and "\0" not in fname
            and all(c.isalnum() or c in "-_." for c in fname))


def _safe_dataset_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 100 and not name.startswith(".")
            and all(c.isalnum() or c in "-_." for c in name))


def install_name(manifest: Mapping) -> str:
    """Directory name a fetched dataset is installed under: ``<name>-<hash8>``."""
    return f"{manifest['name']}-{manifest['dataset_hash'][:8]}"


def check_manifest(manifest: Any) -> dict:
    """Validate a manifest received from a coordinator; return it or raise DataSyncError."""
    if not isinstance(manifest, dict):
        raise DataSyncError(f"dataset manifest from the coordinator is a "
                            f"{type(manifest).__name__}, not a map")
    for key in ("name", "vocab_size", "bos_id", "token_dtype", "files", "dataset_hash"):
        if key not in manifest:
            raise DataSyncError(f"dataset manifest from the coordinator lacks {key!r}")
    if not _safe_dataset_name(manifest["name"]):
        raise DataSyncError(f"dataset manifest has an unusable name {manifest['name']!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise DataSyncError("dataset manifest lists no files")
    for fname, meta in files.items():
        if not safe_file_name(fname):
            raise DataSyncError(f"dataset manifest lists an unsafe file name {fname!r}")
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or not _HEX64.fullmatch(meta["sha256"]) or not isinstance(meta.get("bytes"), int)
                or isinstance(meta.get("bytes"), bool) or meta["bytes"] < 0):
            raise DataSyncError(f"dataset manifest entry for {fname} needs sha256 (64 hex) and "
                                "bytes (>= 0)")
    if not isinstance(manifest["dataset_hash"], str) or \
            dataset_hash(files) != manifest["dataset_hash"]:
        raise DataSyncError("dataset manifest is inconsistent: its dataset_hash does not match "
                            "its files; the coordinator's dataset is damaged (re-run "
                            "autoresearch-prepare there)")
    return manifest


# --------------------------------------------------------------------------- coordinator side

class DatasetServer:
    """Serves one prepared dataset directory to workers, read-only."""

    def __init__(self, dataset_dir: Path):
        self.dir = Path(dataset_dir).expanduser().resolve()
        try:
            self._manifest = read_manifest(self.dir)
        except DatasetError as e:
            raise DataSyncError(str(e)) from None
        check_manifest(self._manifest)
        self._files = self._manifest["files"]

    def manifest(self) -> dict:
        """The manifest.json contents plus ``dir_name`` (the coordinator's directory name)."""
        return dict(self._manifest, dir_name=self.dir.name)

    def chunk(self, fname: Any, offset: Any, length: Any = CHUNK_BYTES) -> bytes:
        """Bytes ``[offset, offset+length)`` of a manifest file, length capped at CHUNK_BYTES.

        Only exact manifest keys are served: anything else (paths, ``..``, absolute names, NUL,
        manifest.json itself) is refused, so a peer can never read other files."""
        if not isinstance(fname, str) or fname not in self._files or not safe_file_name(fname):
            raise DataSyncError(f"{fname!r} is not a file of dataset {self._manifest['name']}")
        for label, value in (("offset", offset), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataSyncError(f"dataset_chunk {label} must be a non-negative integer")
        size = self._files[fname]["bytes"]
        if offset > size:
            raise DataSyncError(f"dataset_chunk offset {offset} is past the end of {fname} "
                                f"({size} bytes)")
        length = min(length, CHUNK_BYTES, size - offset)
        path = self.dir / fname
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size != size:
                    raise DataSyncError(f"{path} changed size since its manifest was written: "
                                        "re-run autoresearch-prepare on the coordinator")
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError:
            raise DataSyncError(f"{path} is missing on the coordinator: re-run "
                                "autoresearch-prepare there") from None

    def handle(self, what: str, args: Mapping) -> Any:
        """The server's one-line hook: the reply data for a dataset ``query``."""
        if what == QUERY_MANIFEST:
            return self.manifest()
        if what == QUERY_CHUNK:
            if not isinstance(args, Mapping):
                raise DataSyncError("dataset_chunk args must be a map")
            return self.chunk(args.get("file"), args.get("offset"),
                              args.get("length", CHUNK_BYTES))
        raise DataSyncError(f"unknown dataset query {what!r}; one of {', '.join(QUERIES)}")


# --------------------------------------------------------------------------- worker side

def fetch_dataset(ask: Ask, cache_dir: Path, progress: Progress | None = None,
                  log: Callable[[str], None] | None = None, full_verify: bool = True) -> Path:
    """Make the coordinator's dataset present in ``cache_dir``; return its directory.

    ``ask(what, args)`` sends one query and returns the reply's data (raising on error). If an
    identical dataset is already installed (and, with ``full_verify``, every file re-hashes to
    the manifest) nothing is downloaded. Otherwise missing files are fetched chunk by chunk,
    resuming ``.part`` files left by an interrupted fetch, each file checked against its sha256
    (a mismatch is re-fetched once, then DataSyncError), and the directory installed atomically
    under datasets/.lock -- so workers sharing a cache download once and never see half a
    dataset.
    """
    log = log or (lambda msg: None)
    manifest = check_manifest(ask(QUERY_MANIFEST, {}))
    manifest.pop("dir_name", None)   # the coordinator's local name; ours is install_name()
    root = datasets_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / install_name(manifest)
    total = sum(meta["bytes"] for meta in manifest["files"].values())

    if _installed(final, manifest, full_verify):
        if progress:
            progress(total, total)
        return final
    lock = FileLock(str(root / LOCK_FILE))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        log(f"waiting for another fetch or prepare in {root} (lock {LOCK_FILE}) ...")
        lock.acquire()
    try:
        # Another worker sharing this cache may have installed it while we waited.
        if _installed(final, manifest, full_verify):
            if progress:
                progress(total, total)
            return final
        incoming = root / f".incoming-{manifest['dataset_hash'][:16]}"
        incoming.mkdir(exist_ok=True)
        _download(ask, incoming, manifest, total, progress, log)
        tmp_manifest = incoming / (MANIFEST_FILE + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp_manifest, incoming / MANIFEST_FILE)
        install_dir(incoming, final)   # a damaged earlier copy is swapped out, never a gap
        log(f"dataset {manifest['name']} ({manifest['dataset_hash'][:8]}) installed at {final}")
        return final
    finally:
        lock.release()


def _installed(final: Path, manifest: Mapping, full_verify: bool) -> bool:
    try:
        have = read_manifest(final)
    except DatasetError:
        return False
    if have.get("dataset_hash") != manifest["dataset_hash"] or have.get("files") != manifest["files"]:
        return False
    for fname, meta in manifest["files"].items():
        p = final / fname
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return False
        if full_verify and file_sha256(p) != meta["sha256"]:
            return False
    return True


def _download(ask: Ask, incoming: Path, manifest: Mapping, total: int,
              progress: Progress | None, log: Callable[[str], None]) -> None:
    files = manifest["files"]
    done = 0
    for fname in sorted(files):
        meta = files[fname]
        target, part = incoming / fname, incoming / (fname + ".part")
        if target.is_file() and target.stat().st_size == meta["bytes"]:
            done += meta["bytes"]   # verified and renamed by an earlier, interrupted fetch
            if progress:
                progress(done, total)
            continue
        for attempt in (1, 2):
            _fetch_file(ask, fname, part, meta["bytes"], done, total, progress)
            if file_sha256(part) == meta["sha256"]:
                os.replace(part, target)
                break
            part.unlink()
            if attempt == 2:
                raise DataSyncError(f"{fname}: downloaded twice and its sha256 still differs "
                                    "from the coordinator's manifest; check the network, or "
                                    "the coordinator's dataset (autoresearch-prepare there)")
            log(f"{fname}: sha256 mismatch after download, fetching it again")
        done += meta["bytes"]


def _fetch_file(ask: Ask, fname: str, part: Path, size: int, done_before: int, total: int,
                progress: Progress | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > size:   # longer than the file can be: not a prefix of it
        part.unlink()
        have = 0
    with open(part, "ab") as fh:
        while have < size:
            want = min(CHUNK_BYTES, size - have)
            data = ask(QUERY_CHUNK, {"file": fname, "offset": have, "length": want})
            if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= want:
                got = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
                raise DataSyncError(f"{fname}: coordinator answered offset {have} with "
                                    f"{got} instead of up to {want} bytes")
            fh.write(data)
            fh.flush()   # what is on disk is what a resume continues from
            have += len(data)
            if progress:
                progress(done_before + have, total)


# --------------------------------------------------------------------------- harness

def harness_files() -> list[Path]:
    """The trainer's fixed harness sources: trainer/*.py except train.py and presets.py, and
    the trainer boundary (shared/trainer_contract.py: exit codes, statuses, OOM words)."""
    import trainer

    pkg = Path(trainer.__file__).resolve().parent
    return sorted(p for p in pkg.glob("*.py") if p.name not in HARNESS_EXCLUDE) + [
        Path(trainer_contract.__file__).resolve()]


def _harness_name(path: Path) -> str:
    # trainer files keep their bare names (what older peers send); others say their package.
    return path.name if path.parent.name == "trainer" else f"{path.parent.name}/{path.name}"


def harness_file_hashes() -> dict[str, str]:
    """{file name: sha256} of the harness sources, to say *which* file differs."""
    return {_harness_name(p): file_sha256(p) for p in harness_files()}


def harness_fingerprint(hashes: Mapping[str, str] | None = None) -> str:
    """sha256 over the sorted (file name, file sha256) pairs of the harness sources."""
    hashes = harness_file_hashes() if hashes is None else hashes
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def harness_difference(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Human lines naming the harness files that differ between two ``harness_file_hashes``."""
    out = []
    for name in sorted(set(mine) | set(theirs)):
        path = name if "/" in name else f"trainer/{name}"
        if name not in theirs:
            out.append(f"{path}: only on this machine")
        elif name not in mine:
            out.append(f"{path}: missing on this machine")
        elif mine[name] != theirs[name]:
            out.append(f"{path}: differs")
    return out
