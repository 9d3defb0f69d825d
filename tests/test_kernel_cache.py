"""worker.kernel_cache: one warm MLX CPU kernel cache per worker, outside the run dirs.

Unit tests on files, stand-in trainers through the real runner, and the real MLX trainer run
twice through the runner (the second run must find every kernel compiled)."""
from __future__ import annotations

import os
import struct
import textwrap
import uuid
from pathlib import Path

import pytest

from worker import kernel_cache as kc
from worker.runner import AttemptProcess, AttemptSpec

from runner_standins import PRELUDE, SETTINGS, finish

VERSION = "0.99.1"


def fake_elf(size: int = 4096, shnum: int = 3) -> bytes:
    """A 64-bit little-endian ELF image whose section header table ends the file."""
    data = bytearray(size)
    data[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", data, 0x28, size - 64 * shnum)
    struct.pack_into("<HH", data, 0x3A, 64, shnum)
    return bytes(data)


def kernel_dir(root: Path, version: str = VERSION) -> Path:
    return root / "mlx" / version / "cpu"


def put(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    return directory / name


def test_elf_check_rejects_truncated_and_foreign_files():
    whole = fake_elf()
    assert kc.is_whole_elf(whole)
    assert not kc.is_whole_elf(whole[:-1])          # killed while the linker wrote it
    assert not kc.is_whole_elf(whole[: len(whole) // 2])
    assert not kc.is_whole_elf(b"\xcf\xfa\xed\xfe" + whole[4:])  # not ELF
    assert not kc.is_whole_elf(b"")


def test_harvest_takes_only_whole_new_libraries(tmp_path):
    run_tmp, cache = tmp_path / "run" / "tmp", tmp_path / "cache"
    src = kernel_dir(run_tmp)
    put(src, "libGood.so", fake_elf())
    put(src, "libLongNameClipped_  3fa9c1.so", fake_elf())  # MLX's clipped names hold spaces
    put(src, "libTruncated.so", fake_elf()[:-100])
    put(src, "Good.cpp", b"// source")                       # sources are not kept
    put(src, "libHuge.so", fake_elf(kc.MAX_FILE_BYTES + 4096))
    outside = put(tmp_path / "elsewhere", "libOutside.so", fake_elf())
    os.symlink(outside, src / "libLink.so")                   # a link is not a library file
    assert kc.harvest(run_tmp, cache) == 2
    assert sorted(p.name for p in kernel_dir(cache).iterdir()) == ["libGood.so",
                                                                    "libLongNameClipped_  3fa9c1.so"]
    assert (kernel_dir(cache) / "libGood.so").read_bytes() == fake_elf()
    assert kc.harvest(run_tmp, cache) == 0                   # nothing new the second time


def test_seed_copies_so_a_run_cannot_write_into_the_cache(tmp_path):
    cache, run_tmp = tmp_path / "cache", tmp_path / "run" / "tmp"
    cached = put(kernel_dir(cache), "libK.so", fake_elf())
    assert kc.seed(cache, run_tmp) == 1
    copy = kernel_dir(run_tmp) / "libK.so"
    assert copy.read_bytes() == fake_elf()
    assert os.stat(copy).st_ino != os.stat(cached).st_ino and not copy.is_symlink()
    copy.write_bytes(b"overwritten by the run")
    assert cached.read_bytes() == fake_elf()
    assert kc.seed(tmp_path / "no-cache", tmp_path / "other") == 0


def test_an_mlx_upgrade_drops_the_old_versions_kernels_and_size_is_capped(tmp_path, monkeypatch):
    cache, run_tmp = tmp_path / "cache", tmp_path / "run" / "tmp"
    put(kernel_dir(cache, "0.1.0"), "libOld.so", fake_elf())
    put(kernel_dir(run_tmp, VERSION), "libNew.so", fake_elf())
    kc.harvest(run_tmp, cache)
    assert not (cache / "mlx" / "0.1.0").exists()
    assert (kernel_dir(cache) / "libNew.so").exists()
    # Past the cap the oldest harvested libraries go first.
    (kernel_dir(cache) / "libNew.so").unlink()
    (kernel_dir(run_tmp) / "libNew.so").unlink()
    monkeypatch.setattr(kc, "MAX_CACHE_BYTES", 3 * 4096)
    for i in range(4):
        os.utime(put(kernel_dir(cache), f"libK{i}.so", fake_elf()), (1000 + i, 1000 + i))
    put(kernel_dir(run_tmp), "libK4.so", fake_elf())
    assert kc.harvest(run_tmp, cache) == 1
    left = sorted(p.name for p in kernel_dir(cache).iterdir())
    assert left == ["libK2.so", "libK3.so", "libK4.so"]


# ---- through the real runner, with stand-in trainers ----------------------------------------

STANDIN = """
    tmp = os.environ["TMPDIR"]
    d = os.path.join(tmp, "mlx", "0.99.1", "cpu")
    found = sorted(os.listdir(d)) if os.path.isdir(d) else []
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "lib" + NAME + ".so"), "wb") as f:
        f.write(ELF)
    write_result("ok", val_bpb=1.0, found=found, tmpdir=tmp,
                 cache_env=os.environ.get("AUTORESEARCH_KERNEL_CACHE"))
    time.sleep(SLEEP)
"""


def run_standin(tmp_path: Path, cache: Path, name: str, sleep: float = 0.0, timeout=30.0):
    body = (f"NAME = {name!r}\nELF = {fake_elf()!r}\nSLEEP = {sleep!r}\n"
            + textwrap.dedent(STANDIN))
    spec = AttemptSpec(str(uuid.uuid4()), PRELUDE + body, dict(SETTINGS), timeout)
    env = {**os.environ, kc.ENV: str(cache)}
    return AttemptProcess.start(spec, tmp_path / "runs", env)


def test_runner_seeds_each_run_and_keeps_what_finished_runs_compiled(tmp_path):
    cache = tmp_path / "kernels" / "w1"
    first = finish(run_standin(tmp_path, cache, "A"))
    assert first.status == "ok" and first.result["found"] == []
    # The trainer's TMPDIR stays inside its run dir, and it is not told where the cache is.
    proc = run_standin(tmp_path, cache, "B")
    second = finish(proc)
    assert second.result["tmpdir"] == str(proc.run_dir / "tmp")
    assert second.result["cache_env"] is None
    assert second.result["found"] == ["libA.so"]
    assert sorted(p.name for p in kernel_dir(cache).iterdir()) == ["libA.so", "libB.so"]
    # A run killed at its timeout may have been killed mid-compile: nothing is taken from it.
    killed = finish(run_standin(tmp_path, cache, "C", sleep=30, timeout=1.0))
    assert killed.status in ("ok", "timeout") and killed.result["found"] == ["libA.so", "libB.so"]
    assert not (kernel_dir(cache) / "libC.so").exists()


# ---- the real trainer ------------------------------------------------------------------------

CPP_COUNTER = '''import atexit as _atexit, glob as _glob, os as _os
_atexit.register(lambda: print("compiled kernel sources:", len(_glob.glob(
    _os.path.join(_os.environ["TMPDIR"], "mlx", "*", "cpu", "*.cpp")))))
'''


@pytest.mark.slow
def test_second_real_run_finds_every_kernel_compiled(tmp_path, prepared_sample):
    """MLX writes a kernel's C++ source only when its library is missing: the first run of the
    tiny baseline compiles kernels, the second (seeded from the worker's cache) compiles none."""
    pytest.importorskip("mlx.core")
    from trainer import backend, presets
    train_py = CPP_COUNTER + presets.baseline_train_py("tiny")
    settings = {"seq_len": 64, "eval_tokens": 1024, "time_budget": 1, "seed": 1, "eval_batch": 8}
    cache = tmp_path / "kernels" / "w1"
    env = {**backend.trainer_env(os.environ, threads=1), kc.ENV: str(cache),
           "AUTORESEARCH_DATA": str(prepared_sample)}
    counts = []
    for _ in range(2):
        spec = AttemptSpec(str(uuid.uuid4()), train_py, dict(settings), 300.0)
        out = finish_slow(AttemptProcess.start(spec, tmp_path / "runs", env))
        assert out.status == "ok", out.log_tail[-3000:]
        line = [ln for ln in out.log_tail.splitlines() if ln.startswith("compiled kernel sources:")]
        counts.append(int(line[-1].split()[-1]))
        libs = sorted(p.name for p in cache.glob("mlx/*/cpu/lib*.so"))
        assert libs
    assert counts[0] > 0 and counts[1] == 0, counts


def finish_slow(proc: AttemptProcess):
    outcome = proc.wait(timeout=300)
    assert outcome is not None, "attempt did not finish"
    return outcome
