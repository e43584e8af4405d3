"""Fuzzing what clients send `mlxft serve`: request bodies (parsed, then rendered through the chat template),
and raw HTTP requests (methods, paths, headers, Content-Length lies, bodies) against a live server with an
API key: a 4xx or a valid answer, never a 500, a dropped connection, a hang or a dead server."""

import pytest
from hypothesis import given

from fuzz_harness import assert_holds, suite_settings
from fuzz_targets_io import SERVE_BODY, SERVE_HTTP, stop


@pytest.fixture(scope="module", autouse=True)
def _server():
    yield
    stop()


@pytest.mark.parametrize("label", [label for label, _ in SERVE_BODY.hand])
def test_hand_written_bodies(label):
    assert_holds(SERVE_BODY, dict(SERVE_BODY.hand)[label])


@suite_settings(max_examples=80)
@given(SERVE_BODY.strategy)
def test_fuzzed_bodies(case):
    assert_holds(SERVE_BODY, case)


@pytest.mark.parametrize("label", [label for label, _ in SERVE_HTTP.hand])
def test_hand_written_http_requests(label):
    assert_holds(SERVE_HTTP, dict(SERVE_HTTP.hand)[label])


@suite_settings(max_examples=80)
@given(SERVE_HTTP.strategy)
def test_fuzzed_http_requests(case):
    assert_holds(SERVE_HTTP, case)
