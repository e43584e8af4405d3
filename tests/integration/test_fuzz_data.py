"""Fuzzing what users hand mlxft as data: every reader (JSONL, JSON, CSV/TSV; one file or a folder) through
`data check`, `data prepare` and `train`'s loader, and `synth` seeds: a typed error or a valid result,
never a traceback, a hang or a modified input (fuzz_harness). Longer runs: bench/fuzz_bench.py."""

import time

import pytest
from hypothesis import given

from fuzz_harness import Tally, assert_holds, probe, suite_settings
from fuzz_targets import DATA, SEEDS


@pytest.mark.parametrize("label", [label for label, _ in DATA.hand])
def test_hand_written_data_files(label):
    assert_holds(DATA, dict(DATA.hand)[label])


@suite_settings(max_examples=40)
@given(DATA.strategy)
def test_fuzzed_data_files(case):
    assert_holds(DATA, case)


@pytest.mark.parametrize("label", [label for label, _ in SEEDS.hand])
def test_hand_written_seeds(label):
    assert_holds(SEEDS, dict(SEEDS.hand)[label])


@suite_settings(max_examples=60)
@given(SEEDS.strategy)
def test_fuzzed_seeds(case):
    assert_holds(SEEDS, case)


def test_the_harness_counts_what_breaks_the_property(tmp_path):
    """The counts in make bench are only as good as the probe: each way to break the property is seen."""
    from mlxft.errors import DataError

    src = tmp_path / "in.jsonl"
    src.write_text("x\n")

    def raises(error):
        raise error

    cases = {"ok": lambda: None, "refused": lambda: raises(DataError("no")), "traceback": lambda: raises(KeyError("k")),
             "modified": lambda: src.write_text("y\n"), "hang": lambda: time.sleep(5)}
    tally = Tally()
    for kind, call in cases.items():
        outcome = probe(call, [src], seconds=0.5)
        assert outcome.kind == kind, outcome
        tally.add("demo", outcome, fuzzed=kind != "ok")
    assert tally.rows["demo"] == {"hand": 1, "fuzzed": 4, "ok": 1, "refused": 1, "traceback": 1, "modified": 1, "hang": 1}
    assert "| demo | 5 (1 + 4) | 1 / 1 | 1 | 1 | 1 |" in tally.table()
