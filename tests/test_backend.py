"""OpenBLAS preload: path discovery, env building, and a real preloaded child process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from trainer import backend
from trainer.backend import openblas_path, preloaded_openblas, trainer_env

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux")


def test_override_disables_or_picks(tmp_path):
    assert openblas_path({"AUTORESEARCH_OPENBLAS": ""}) is None
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    assert openblas_path({"AUTORESEARCH_OPENBLAS": str(lib)}) == str(lib)
    with pytest.raises(ValueError, match="AUTORESEARCH_OPENBLAS"):
        openblas_path({"AUTORESEARCH_OPENBLAS": str(tmp_path / "missing.so")})


@linux_only
def test_trainer_env_prepends_preload_and_sets_threads(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    base = {"AUTORESEARCH_OPENBLAS": str(lib), "LD_PRELOAD": "/x/libother.so", "KEEP": "1"}
    env = trainer_env(base, threads=2)
    assert env["LD_PRELOAD"] == f"{lib}:/x/libother.so"
    assert env["OPENBLAS_NUM_THREADS"] == "2" and env["OMP_NUM_THREADS"] == "2"
    assert env["KEEP"] == "1" and base["LD_PRELOAD"] == "/x/libother.so"   # base untouched
    assert trainer_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]              # no duplicates
    assert preloaded_openblas(env) == str(lib)
    off = trainer_env({"AUTORESEARCH_OPENBLAS": ""})
    assert "LD_PRELOAD" not in off and "OPENBLAS_NUM_THREADS" not in off
    with pytest.raises(ValueError):
        trainer_env({}, threads=0)


def test_no_preload_off_linux(monkeypatch):
    monkeypatch.setattr(backend.sys, "platform", "darwin")
    assert openblas_path({}) is None
    assert "LD_PRELOAD" not in trainer_env({}, threads=4)
    assert trainer_env({}, threads=4)["OPENBLAS_NUM_THREADS"] == "4"


CHILD = textwrap.dedent('''
    import json, os, numpy as np
    import mlx.core as mx
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    c = np.array(mx.array(a) @ mx.array(b))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.abs(c - ref).max() / np.abs(ref).max())
    maps = [l.split()[-1] for l in open("/proc/self/maps") if "openblas" in l.lower()]
    print(json.dumps({"err": err, "maps": sorted(set(maps))}))
''')


@linux_only
def test_preloaded_child_really_uses_system_openblas():
    lib = openblas_path({})
    if lib is None:
        pytest.skip("no system OpenBLAS installed (apt: libopenblas0-pthread)")
    env = trainer_env({k: v for k, v in os.environ.items() if k != "AUTORESEARCH_OPENBLAS"},
                      threads=2)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert os.path.realpath(lib) in [os.path.realpath(m) for m in r["maps"]]
    assert r["err"] < 1e-4                       # the matmul through OpenBLAS is correct


@linux_only
def test_launch_reexecs_with_the_env(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, sys, json\n"
                      "print(json.dumps([sys.argv[1:], os.environ.get('LD_PRELOAD'),"
                      " os.environ.get('OPENBLAS_NUM_THREADS')]))\n")
    env = dict(os.environ, AUTORESEARCH_OPENBLAS="")
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-m", "trainer.launch", "--threads", "3", str(script),
                           "--time-budget", "5"], env=env, capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    first, last = proc.stdout.strip().splitlines()[0], proc.stdout.strip().splitlines()[-1]
    assert first.startswith("trainer.launch: OpenBLAS not preloaded")
    assert json.loads(last) == [["--time-budget", "5"], None, "3"]
    real = openblas_path({k: v for k, v in os.environ.items() if k != "AUTORESEARCH_OPENBLAS"})
    if real:
        env = {k: v for k, v in env.items() if k != "AUTORESEARCH_OPENBLAS"}
        proc = subprocess.run([sys.executable, "-m", "trainer.launch", str(script)], env=env,
                              capture_output=True, text=True, check=True, cwd=tmp_path)
        assert proc.stdout.startswith(f"trainer.launch: OpenBLAS preloaded ({real}")
        assert json.loads(proc.stdout.strip().splitlines()[-1])[1] == real
