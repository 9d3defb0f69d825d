"""Run settings from the environment: defaults, parsing, clear errors, round trip."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.settings import RESEARCH_ENV, RunSettings


def test_defaults_match_the_seed():
    s = RunSettings.from_env({})
    assert (s.seq_len, s.eval_tokens, s.time_budget, s.seed, s.eval_batch) == \
        (2048, 3 * 524288, 300, 42, 16)
    assert s.cache == Path("~/.cache/autoresearch").expanduser()
    assert s.data is None and s.progress_path is None
    assert s.result_path == Path("result.json")


def test_reads_every_variable(tmp_path):
    env = {"AUTORESEARCH_SEQ_LEN": "256", "AUTORESEARCH_EVAL_TOKENS": "4096",
           "AUTORESEARCH_TIME_BUDGET": "15", "AUTORESEARCH_SEED": "0",
           "AUTORESEARCH_EVAL_BATCH": " 4 ", "AUTORESEARCH_CACHE": str(tmp_path / "c"),
           "AUTORESEARCH_DATA": str(tmp_path / "d"), "AUTORESEARCH_RESULT": str(tmp_path / "r.json"),
           "AUTORESEARCH_PROGRESS": str(tmp_path / "p.jsonl")}
    s = RunSettings.from_env(env)
    assert s.research() == {"seq_len": 256, "eval_tokens": 4096, "time_budget": 15,
                            "seed": 0, "eval_batch": 4}
    assert s.cache == tmp_path / "c" and s.data == tmp_path / "d"
    assert s.result_path == tmp_path / "r.json" and s.progress_path == tmp_path / "p.jsonl"


def test_to_env_round_trips_only_research_fields(tmp_path):
    s = RunSettings(seq_len=64, eval_tokens=640, time_budget=3, seed=7, eval_batch=2,
                    result_path=tmp_path / "x.json")
    env = s.to_env()
    assert set(env) == set(RESEARCH_ENV)
    assert all(isinstance(v, str) for v in env.values())
    assert RunSettings.from_env(env).research() == s.research()
    assert RunSettings.from_dict(s.research()) == RunSettings(**s.research())


@pytest.mark.parametrize("var,value", [
    ("AUTORESEARCH_SEQ_LEN", "abc"), ("AUTORESEARCH_SEQ_LEN", "0"),
    ("AUTORESEARCH_EVAL_TOKENS", "-5"), ("AUTORESEARCH_TIME_BUDGET", "1.5"),
    ("AUTORESEARCH_SEED", "-1"), ("AUTORESEARCH_EVAL_BATCH", "16x"),
])
def test_bad_values_name_the_variable(var, value):
    with pytest.raises(ValueError, match=var):
        RunSettings.from_env({var: value})


def test_bad_constructor_values_and_unknown_keys():
    with pytest.raises(ValueError, match="AUTORESEARCH_EVAL_BATCH"):
        RunSettings(eval_batch=0)
    with pytest.raises(ValueError, match="unknown run settings: bogus"):
        RunSettings.from_dict({"seq_len": 8, "bogus": 1})


def test_settings_module_stays_mlx_free():
    code = ("import sys, trainer.settings, trainer.backend, trainer.harness; "
            "assert 'mlx' not in sys.modules, 'mlx imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
