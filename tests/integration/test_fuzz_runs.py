"""Fuzzing run folders as another tool or a damaged disk leaves them: adapter_config.json, adapters.safetensors
and config.json read by serve (adapter folder and run folder), `mlxft runs` and `train --resume`: a typed error
or a valid result, never a traceback, a hang or a modified run folder."""

import pytest
from hypothesis import given

from fuzz_harness import assert_holds, suite_settings
from fuzz_targets_runs import runs_target

RUNS = runs_target()


@pytest.mark.parametrize("label", [label for label, _ in RUNS.hand])
def test_hand_written_run_folders(label):
    assert_holds(RUNS, dict(RUNS.hand)[label])


@suite_settings(max_examples=40)
@given(RUNS.strategy)
def test_fuzzed_run_folders(case):
    assert_holds(RUNS, case)
