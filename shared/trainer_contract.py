"""The trainer boundary: what the worker and a trainer subprocess agree on, defined once.

The worker starts ``train.py`` as a subprocess; ``train.py`` runs the fixed harness
(``trainer.harness``), which reads its run settings from the environment and writes one JSON
result file. This module is that seam's whole vocabulary, so the harness (which writes it) and
the worker and coordinator (which read it) can never drift apart:

  * environment variable names: the run settings and the file locations;
  * the run-setting fields that define a research run (what ``val_bpb`` means);
  * the result file: its schema number, statuses and figures;
  * exit codes and their status;
  * the words by which an out-of-memory death is recognised in an exception or a log.

mlx-free and dependency-free: the worker and coordinator import it without loading a backend.
It is part of the harness fingerprint (``shared.datasync.harness_files``), because changing it
changes how a run is classified.
"""
from __future__ import annotations

# ---- environment ------------------------------------------------------------------------------

ENV_RESULT = "AUTORESEARCH_RESULT"        # where the harness writes the result JSON
ENV_PROGRESS = "AUTORESEARCH_PROGRESS"    # where it appends one JSON line per logged step
ENV_CACHE = "AUTORESEARCH_CACHE"          # the machine's cache root (datasets live under it)
ENV_DATA = "AUTORESEARCH_DATA"            # one prepared dataset dir (overrides the cache's)

# env var -> field, for the settings that define a research run (all integers; seed may be 0).
RESEARCH_ENV: dict[str, str] = {
    "AUTORESEARCH_SEQ_LEN": "seq_len",
    "AUTORESEARCH_EVAL_TOKENS": "eval_tokens",
    "AUTORESEARCH_TIME_BUDGET": "time_budget",
    "AUTORESEARCH_SEED": "seed",
    "AUTORESEARCH_EVAL_BATCH": "eval_batch",
}
ENV_FOR_FIELD: dict[str, str] = {field: var for var, field in RESEARCH_ENV.items()}
# The run-setting fields an assignment carries and a result records under "settings".
RUN_FIELDS: tuple[str, ...] = tuple(RESEARCH_ENV.values())

# ---- result file ------------------------------------------------------------------------------

RESULT_SCHEMA = 1
# Statuses the harness itself writes (the worker adds timeout and cancelled: shared.outcome).
RESULT_STATUSES: tuple[str, ...] = ("ok", "crash", "nan", "oom")
# Every result carries these keys (null when unknown), so readers never need .get() guesses.
RESULT_FIGURES: tuple[str, ...] = (
    "training_seconds", "total_seconds", "startup_seconds", "eval_seconds", "peak_vram_mb",
    "mfu_percent", "total_tokens_M", "num_steps", "num_params_M", "depth", "eval_tokens",
    "crop_fraction", "tok_per_sec", "backend")

# ---- exit codes -------------------------------------------------------------------------------

EXIT_OK, EXIT_CRASH, EXIT_NAN, EXIT_OOM = 0, 1, 3, 4
EXIT_FOR_STATUS: dict[str, int] = {"ok": EXIT_OK, "crash": EXIT_CRASH, "nan": EXIT_NAN,
                                   "oom": EXIT_OOM}
# Exit codes that say what happened even when no result file was written. Exit 1 is not here:
# Python itself exits 1 on any uncaught exception, so it proves nothing about the harness.
STATUS_FOR_EXIT: dict[int, str] = {EXIT_NAN: "nan", EXIT_OOM: "oom"}

# ---- out of memory ----------------------------------------------------------------------------

# Lower-case phrases that mean the process ran out of memory: Python's MemoryError, glibc's
# ENOMEM text, C++'s bad_alloc, MLX's "[malloc] Unable to allocate" and Metal's "Resource limit
# (N) exceeded". The harness matches them in an exception's text; the worker in the log tail of
# a SIGKILLed trainer (the OS's OOM killer / jetsam leave no result file).
OOM_MARKERS: tuple[str, ...] = (
    "out of memory", "outofmemory", "memoryerror", "cannot allocate memory",
    "insufficient memory", "failed to allocate", "unable to allocate", "bad_alloc",
    "resource limit")


def mentions_oom(text: str | None) -> bool:
    """True if ``text`` contains one of the OOM_MARKERS (case-insensitive)."""
    low = (text or "").lower()
    return any(marker in low for marker in OOM_MARKERS)


__all__ = ["ENV_RESULT", "ENV_PROGRESS", "ENV_CACHE", "ENV_DATA", "RESEARCH_ENV",
           "ENV_FOR_FIELD", "RUN_FIELDS", "RESULT_SCHEMA", "RESULT_STATUSES", "RESULT_FIGURES",
           "EXIT_OK", "EXIT_CRASH", "EXIT_NAN", "EXIT_OOM", "EXIT_FOR_STATUS", "STATUS_FOR_EXIT",
           "OOM_MARKERS", "mentions_oom"]
