"""The MLX trainer: a fixed harness (data, evaluation, result file) and the baseline train.py.

Importing this package must stay cheap (no MLX import): the worker and coordinator read
``HARNESS_VERSION`` from it without loading a backend.
"""

# Bump when anything that changes val_bpb for the same train.py changes: the dataloader,
# evaluate_bpb, the run settings' meaning, the result schema. Peers with different
# harness versions never compare numbers.
HARNESS_VERSION = "1"
