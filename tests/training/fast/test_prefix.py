"""The shared prefix (mlxft/training/fast/prefix.py): its length on rows a training run can meet."""

import json

import numpy as np

from mlxft.data.encode import Encoded
from mlxft.recipes import load_recipe
from mlxft.training.fast.prefix import shared_prefix_length
from mlxft.training.setup import train


def test_prefix_stops_before_the_first_supervised_position():
    ids = np.arange(12, dtype=np.int32)
    rows = [Encoded(ids, np.array([0] * 7 + [1] * 5, bool)), Encoded(ids.copy(), np.array([0] * 9 + [1] * 3, bool))]
    assert shared_prefix_length(rows) == 6  # the target at input position 6 is supervised


def test_identical_rows_with_nothing_supervised_keep_one_input_each():
    """Rows cut at max_seq_length before their answer: the same ids, no supervised token."""
    ids = np.arange(10, dtype=np.int32)
    rows = [Encoded(ids, np.zeros(10, bool)) for _ in range(4)]
    assert shared_prefix_length(rows) == 8  # 10 ids = 9 inputs: 8 shared + 1 of each row's own


def test_training_on_rows_cut_before_their_answer_does_not_crash(tiny_model, tmp_path):
    """Found by fuzzing (issue 21): a long system prompt and a short max_seq_length made a batch's
    shared prefix the whole row, and the empty rest a reshape error."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}"}, {"role": "assistant", "content": w}]}
            for i in range(24) for w in ("alpha", "beta")]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    recipe = load_recipe("smollm2-135m", tier=8, overrides=[
        f"model.source={tiny_model}", "train.iters=4", "train.batch_size=4", "train.val_every=40", "lora.num_layers=2",
        "lora.rank=4", "train.max_seq_length=64"])
    res = train(recipe, data, tmp_path / "runs", log=lambda *_: None)
    assert res.steps == 4 and np.isfinite(res.final_train_loss)
