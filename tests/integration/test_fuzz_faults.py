"""Faults besides a kill, counted like hostile input: a full disk at each place mlxft writes a file a user keeps,
and a newest checkpoint damaged at random: a typed error naming the path or a checkpoint that loads, with every
file that was there before unchanged (fuzz_targets_faults)."""

import pytest
from hypothesis import given

from fuzz_harness import assert_holds, suite_settings
from fuzz_targets_faults import faults_target

FAULTS = faults_target()


@pytest.mark.parametrize("label", [label for label, _ in FAULTS.hand])
def test_hand_written_faults(label):
    assert_holds(FAULTS, dict(FAULTS.hand)[label])


@suite_settings(max_examples=25)
@given(FAULTS.strategy)
def test_randomly_damaged_newest_checkpoint(case):
    assert_holds(FAULTS, case)
