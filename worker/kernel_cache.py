"""One cache of MLX's compiled CPU kernels per worker, kept outside the run directories.

mlx-free (the worker's runner calls it around every attempt).

Why: MLX's CPU backend turns each fused elementwise graph of an ``mx.compile``d function into C++,
compiles it with the system compiler and keeps the shared library under
``std::filesystem::temp_directory_path() / "mlx" / <mlx version> / "cpu"``, i.e. under
``$TMPDIR/mlx/<version>/cpu/lib<kernel>.so`` (mlx/backend/cpu/compiled.cpp; TMPDIR is the only
knob). The runner points each trainer's TMPDIR into its fresh run directory, so every run
recompiled every kernel: the tiny baseline's first step took 15-50 s cold against 0.4 s warm.

How, without giving a run a way to write outside its directory: the trainer's TMPDIR stays in
the run dir. Before the run the worker *copies* the cached libraries into
``run_dir/tmp/mlx/...`` (copies, not links: a write through the run's path must not reach the
cache); after a run that exited by itself the worker copies back the libraries that are new.
What it takes back is checked: regular files named ``lib*.so`` of at most MAX_FILE_BYTES, whole
ELF files (a trainer killed while the compiler was writing leaves a truncated library, which
would make every later run fail to load it). The MLX version is part of the path, so an upgrade
starts a fresh subtree and the old versions' subtrees are dropped at the next harvest.

Not a security boundary (nothing in the runner is): a train.py runs as the worker's user and
could write a library the cache then hands to later runs, as it could write anywhere else.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import tempfile
from pathlib import Path

ENV = "AUTORESEARCH_KERNEL_CACHE"   # the worker's cache dir; the runner keeps it from trainers
MLX_SUBDIR = "mlx"                  # MLX's own layout below TMPDIR: mlx/<version>/cpu/lib*.so
MAX_FILE_BYTES = 16 * 2**20         # one kernel library is ~20 KB
MAX_CACHE_BYTES = 64 * 2**20        # oldest harvested libraries go first past this
_VERSION_RE = re.compile(r"[0-9A-Za-z._+-]{1,64}")
# MLX clips long kernel names and appends a hash formatted with setw(16): it can hold spaces.
_LIB_RE = re.compile(r"lib[0-9A-Za-z_.+ -]{1,400}\.so")


def default_dir(cache_dir, worker_name: str) -> Path:
    """``<cache>/kernels/<worker name>``: per worker (name, not pid: a restart keeps it warm)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", worker_name or "").lstrip(".")[:64] or "worker"
    return Path(cache_dir).expanduser() / "kernels" / safe


def _kernel_dirs(root: Path) -> dict[str, Path]:
    """{mlx version: <root>/mlx/<version>/cpu} for the real (non-symlink) dirs under root."""
    found = {}
    base = root / MLX_SUBDIR
    try:
        if not stat.S_ISDIR(os.lstat(base).st_mode):
            return found
        entries = list(os.scandir(base))
    except OSError:
        return found
    for entry in entries:
        if _VERSION_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            cpu = Path(entry.path) / "cpu"
            try:
                if stat.S_ISDIR(os.lstat(cpu).st_mode):
                    found[entry.name] = cpu
            except OSError:
                pass
    return found


def _libraries(directory: Path) -> dict[str, os.DirEntry]:
    try:
        return {e.name: e for e in os.scandir(directory)
                if _LIB_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False)}
    except OSError:
        return {}


def is_whole_elf(data: bytes) -> bool:
    """A complete 64- or 32-bit ELF file: the section header table, which the linker writes
    last, lies inside the file (a truncated library fails this)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    end = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # ELFCLASS64
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
    return shnum > 0 and shoff > 0 and shoff + shentsize * shnum <= len(data)


def _read_library(path: str) -> bytes | None:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= MAX_FILE_BYTES and is_whole_elf(data) else None


def seed(cache: Path, tmp_dir: Path) -> int:
    """Copy every cached kernel library into a fresh ``tmp_dir`` (the trainer's TMPDIR) in
    MLX's layout. Returns how many were copied; a missing or unreadable cache copies none."""
    copied = 0
    for version, src in _kernel_dirs(Path(cache)).items():
        libs = _libraries(src)
        if not libs:
            continue
        dst = Path(tmp_dir) / MLX_SUBDIR / version / "cpu"
        dst.mkdir(parents=True, exist_ok=True)
        for name, entry in libs.items():
            try:
                shutil.copyfile(entry.path, dst / name, follow_symlinks=False)
                copied += 1
            except OSError:
                pass
    return copied


def harvest(tmp_dir: Path, cache: Path) -> int:
    """Copy the whole, new kernel libraries a finished trainer compiled into ``cache``
    (atomically, one file at a time), drop cached MLX versions the run did not use, and keep
    the cache under MAX_CACHE_BYTES. Returns how many libraries were added."""
    cache = Path(cache)
    produced = _kernel_dirs(Path(tmp_dir))
    added = 0
    for version, src in produced.items():
        dst = cache / MLX_SUBDIR / version / "cpu"
        have = set(_libraries(dst))
        new = {n: e for n, e in _libraries(src).items() if n not in have}
        if not new:
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for name, entry in new.items():
            data = _read_library(entry.path)
            if data is None:
                continue
            fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dst)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, dst / name)
                added += 1
            except OSError:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
    if produced:
        for version, old in _kernel_dirs(cache).items():
            if version not in produced:  # MLX was upgraded: those kernels never load again
                shutil.rmtree(old.parent, ignore_errors=True)
    _trim(cache)
    return added


def _trim(cache: Path) -> None:
    """Delete the oldest libraries (by mtime: when harvested) until the cache fits."""
    files = []
    for cpu in _kernel_dirs(cache).values():
        for entry in _libraries(cpu).values():
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, entry.path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= MAX_CACHE_BYTES:
            break
        try:
            os.unlink(path)
            total -= size
        except OSError:
            pass
