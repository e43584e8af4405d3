"""Fuzzing what users write as configuration: recipe YAML with --set values, and eval suite YAML (with the
data it names): a ConfigError/DataError or a valid result, never a traceback, a hang or a modified input."""

import pytest
from hypothesis import given

from fuzz_harness import assert_holds, suite_settings
from fuzz_targets import RECIPE, SUITE


@pytest.mark.parametrize("label", [label for label, _ in RECIPE.hand])
def test_hand_written_recipes(label):
    assert_holds(RECIPE, dict(RECIPE.hand)[label])


@suite_settings(max_examples=60)
@given(RECIPE.strategy)
def test_fuzzed_recipes_and_overrides(case):
    assert_holds(RECIPE, case)


@pytest.mark.parametrize("label", [label for label, _ in SUITE.hand])
def test_hand_written_suites(label):
    assert_holds(SUITE, dict(SUITE.hand)[label])


@suite_settings(max_examples=60)
@given(SUITE.strategy)
def test_fuzzed_suites(case):
    assert_holds(SUITE, case)
