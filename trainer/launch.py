"""Run a train.py with the trainer environment (system OpenBLAS preloaded on Linux).

    python -m trainer.launch [--threads N] train.py [train.py args...]

LD_PRELOAD only takes effect when a process starts, so this replaces itself (os.execvpe)
with a fresh Python running the script under trainer_env(). The worker does the same for
every attempt; this is the manual-run way.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer.backend import preloaded_openblas, trainer_env


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m trainer.launch",
        description="Run a train.py with the system OpenBLAS preloaded (Linux) and optional "
                    "BLAS thread count. AUTORESEARCH_OPENBLAS=PATH picks the library, "
                    "AUTORESEARCH_OPENBLAS= (empty) disables preloading.")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="OPENBLAS_NUM_THREADS / OMP_NUM_THREADS for the trainer")
    ap.add_argument("script", help="the train.py to run")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    ns = ap.parse_args(argv)
    try:
        env = trainer_env(os.environ, ns.threads)
    except ValueError as e:
        ap.error(str(e))
    lib = preloaded_openblas(env)
    threads = f", {ns.threads} threads" if ns.threads else ""
    if lib:
        print(f"trainer.launch: OpenBLAS preloaded ({lib}{threads})", flush=True)
    else:
        print(f"trainer.launch: OpenBLAS not preloaded{threads} "
              f"({'not Linux' if not sys.platform.startswith('linux') else 'none found or disabled'})",
              flush=True)
    sys.stderr.flush()
    argv2 = [sys.executable, ns.script, *ns.args]
    os.execvpe(sys.executable, argv2, env)


if __name__ == "__main__":
    main()
