"""Fuzzing GGUF files through `import-gguf`: hostile counts, sizes, value types, nesting and tensor tables
are refused fast (ModelError) without allocating what they claim; never a traceback, a hang, a crash of
the process, or a modified input file."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given

from fuzz_harness import assert_holds, suite_settings
from fuzz_targets_io import GGUF, _replace_kvs, gguf_bytes, targets, valid_gguf

targets()  # builds GGUF's strategy and hand cases (they start from a real tiny GGUF)


@pytest.mark.parametrize("label", [label for label, _ in GGUF.hand])
def test_hand_written_gguf_files(label):
    assert_holds(GGUF, dict(GGUF.hand)[label])


@suite_settings(max_examples=40)
@given(GGUF.strategy)
def test_fuzzed_gguf_files(case):
    assert_holds(GGUF, case)


def test_float64_metadata_imports_instead_of_crashing_the_process(tmp_path):
    """mx.load (mlx 0.32) segfaults on a float64 metadata value; the importer must not hand it such a file.
    In a child process, so a crash fails this test instead of killing the test run."""
    raw, kvs, table, data = valid_gguf()
    path = tmp_path / "f64.gguf"
    path.write_bytes(gguf_bytes(_replace_kvs(kvs, [("general.some_float64", (12, 0.5))], set()), table, data=data))
    code = ("import sys; from mlxft.models.gguf_import import import_gguf; "
            f"print(import_gguf({str(path)!r}, {str(tmp_path / 'out')!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
