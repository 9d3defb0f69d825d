"""AUTORESEARCH_SEED drives both the model's initialisation and the training data order.

The decision rule pairs a candidate's run i with the head's run i because both ran with seed i;
that is only worth something if the seed really fixes both. Checked in-process with the real
harness, the real tiny-preset train.py (its GPT and init_weights) and the real dataloader.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from tests.test_harness import make_dataset
from trainer import harness, presets


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seedcache")
    make_dataset(root)
    return root


@pytest.fixture(scope="module")
def train_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("seedtrain") / "tiny_train.py"
    path.write_text(presets.baseline_train_py("tiny"))
    spec = importlib.util.spec_from_file_location("tiny_train_for_seeds", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def first_state(data_root, train_module, seed: int, tmp_path):
    """(init weights fingerprint, first two training batches) of a run started with ``seed``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update({"AUTORESEARCH_CACHE": str(data_root), "AUTORESEARCH_SEQ_LEN": "32",
                "AUTORESEARCH_SEED": str(seed),
                "AUTORESEARCH_RESULT": str(tmp_path / f"result-{seed}.json")})
    run = harness.start([], environ=env)
    assert run.settings.seed == seed
    model = train_module.GPT(train_module.build_config(run.vocab_size, 32))
    model.init_weights()
    weights = np.concatenate([np.array(v, dtype=np.float32).ravel()
                              for _, v in sorted(tree_flatten(model.parameters()))])
    loader = run.train_loader(4)
    batches = [np.array(next(loader)[0]) for _ in range(2)]
    mx.eval(model.parameters())
    return weights, batches


def test_seed_fixes_init_and_data_order(data_root, train_module, tmp_path):
    w5, b5 = first_state(data_root, train_module, 5, tmp_path)
    w5b, b5b = first_state(data_root, train_module, 5, tmp_path)
    w6, b6 = first_state(data_root, train_module, 6, tmp_path)
    # the same seed: bit-identical initial weights and batches
    assert np.array_equal(w5, w5b)
    assert all(np.array_equal(x, y) for x, y in zip(b5, b5b))
    # another seed: different initial weights AND a different data order
    assert not np.array_equal(w5, w6)
    assert not all(np.array_equal(x, y) for x, y in zip(b5, b6))
