"""Memory-aware routing in a loopback fleet of real processes (keys on, dataset served): two
workers report different memory (``--memory-gb``, so they are two hardware classes); a
train.py that needs 256 MiB runs out of memory on the small one -- the test caps that worker's
trainers' address space, so the allocation really fails -- and is requeued for, measured on and
decided on the big one."""
from __future__ import annotations

import json
import re

import pytest

from test_fleet import cli, fleet, submit, wait_head_measured  # noqa: F401 (fleet: fixture)

pytestmark = pytest.mark.slow

MEMORY_HUNGRY = '''"""Stand-in train.py that needs NEED_MB of memory. Under a test's cap on its address space
(AUTORESEARCH_TEST_MEMORY_LIMIT_MB beyond what the interpreter holds) the allocation fails as a
real run's would, and it reports oom the way the harness does (result file, exit 4)."""
import os
import resource
import sys
import time

from trainer.harness import write_result

NEED_MB = 256
BPB = 1.40


def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    gate = os.environ.get("AUTORESEARCH_TEST_GATE")
    end = time.time() + 60
    while gate and not os.path.exists(gate) and time.time() < end:
        time.sleep(0.05)
    limit = os.environ.get("AUTORESEARCH_TEST_MEMORY_LIMIT_MB")
    if limit:
        cap = vm_bytes() + int(limit) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        block = bytearray(NEED_MB * 2**20)
    except MemoryError:
        write_result("oom", error=f"MemoryError: cannot allocate {NEED_MB} MiB")
        sys.exit(4)
    del block
    time.sleep(0.3)
    write_result("ok", val_bpb=BPB, training_seconds=0.3, num_steps=5)


if __name__ == "__main__":
    main()
'''


def test_oom_on_the_small_class_is_measured_on_the_big_one(fleet, tmp_path):
    gate = tmp_path / "go"
    coord, ep = fleet.started_coord()
    small = fleet.worker(ep, "small", "--memory-gb", "8",
                         env={"AUTORESEARCH_TEST_MEMORY_LIMIT_MB": "64",
                              "AUTORESEARCH_TEST_GATE": str(gate)})
    wait_head_measured(coord)
    cid = submit(ep, MEMORY_HUNGRY, "needs 256 MiB")["candidate_id"]
    small.wait_for(rf"assigned \S+: candidate #{cid}\b")
    # the big machine joins while the small one holds the candidate
    big = fleet.worker(ep, "big", "--memory-gb", "64", env={"AUTORESEARCH_TEST_GATE": str(gate)})
    big.wait_for(r"connected to ")
    mark = coord.mark()
    gate.touch()
    m = coord.wait_for(r"result \S+ from small: oom val_bpb -, accepted \((out of memory on "
                       r"(\S+ \S+/8GB/cpu/1t) .*)\)$", since=mark)
    small_class = m.group(2)
    assert "routed to classes with more than 8.0 GB (largest connected: " in m.group(1)
    assert "/64GB/cpu/1t, 64.0 GB)" in m.group(1)
    # measured from scratch on the big class: its head first, then the candidate, decided there
    coord.wait_for(rf"KEEP #{cid}\b", since=mark)
    big.wait_for(rf"assigned \S+: candidate #{cid}\b")
    assert small.count(rf"assigned \S+: candidate #{cid}\b") == 1   # never offered it again

    log = json.loads(cli("log", "--json", "--connect", ep).stdout)
    decision = next(d for d in log["decisions"] if d["candidate_id"] == cid)
    assert decision["verdict"] == "kept" and decision["hw_class"].endswith("/64GB/cpu/1t")
    runs = [(a["hw_class"], a["status"]) for a in log["attempts"]
            if a["candidate_id"] == cid and a["purpose"] == "candidate"]
    assert sorted(runs) == sorted([(small_class, "oom"), (decision["hw_class"], "ok")])
    heads = {a["hw_class"] for a in log["attempts"] if a["purpose"] == "head"}
    assert heads == {small_class, decision["hw_class"]}

    status = cli("status", "--connect", ep)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"routed away for memory .*:\n  {re.escape(small_class)}: #{cid} "
                     r"\(needs more than 8\.0 GB, now kept\)", status.stdout), status.stdout
