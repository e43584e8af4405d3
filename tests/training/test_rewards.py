"""GRPO's rewards (mlxft/training/rewards.py): the suites' own scorers, length limits, user functions
and a local judge, weighted; every bad spec named in one error."""

import pytest

from mlxft.config import GrpoConfig
from mlxft.errors import ConfigError
from mlxft.evaluation.scorers import Example
from mlxft.training.rewards import build_rewards


def ex(reference=None):
    return Example([{"role": "user", "content": "What is the capital of Chile?"}], reference)


def test_a_suite_scorer_is_the_suites_own_with_its_parameters():
    """house_style is evals/house-style.yaml's regex (one sentence, <= 20 words, no filler)."""
    rewards = build_rewards(GrpoConfig(reward_suite="house-style", rewards=["house_style:2", "json_valid:0.5"]))
    totals, per = rewards(["The capital of Chile is Santiago.", "Great question! Santiago, I think, is it."],
                          [ex(), ex()])
    assert per["house_style"] == [1.0, 0.0] and per["json_valid"] == [0.0, 0.0]
    assert totals == [2.0, 0.0]


def test_length_limits_fall_off_linearly_past_the_limit():
    rewards = build_rewards(GrpoConfig(rewards=["max_words=4", "max_chars=10:0.5"]))
    _, per = rewards(["one two three", "one two three four five six", " ".join(["w"] * 8)], [ex()] * 3)
    assert per["max_words=4"] == [1.0, 0.5, 0.0]
    assert per["max_chars=10"] == pytest.approx([0.7, 0.0, 0.5])  # 13, 27 and 15 characters: 2 - n / 10


def test_every_bad_reward_is_named_in_one_error(tmp_path):
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(ConfigError) as e:
        build_rewards(GrpoConfig(rewards=["no_such_scorer", "max_words=zero", "house_style:1"],
                                 reward_functions=[f"{tmp_path}/r.py:missing", "not-a-spec"]))
    message = str(e.value)
    for part in ("rewards[0] 'no_such_scorer'", "rewards[1] 'max_words=zero'", "rewards[2] 'house_style:1'",
                 "reward_functions[0]", "has no function missing", "reward_functions[1]"):
        assert part in message, part


def test_a_user_function_that_fails_scores_zero_and_is_counted(tmp_path):
    (tmp_path / "r.py").write_text("def fn(completion, example):\n    return {'a': 1.0, 'b': 'x'}[completion]\n")
    rewards = build_rewards(GrpoConfig(reward_functions=[f"{tmp_path}/r.py:fn:3"]))
    totals, _ = rewards(["a", "b", "c"], [ex()] * 3)  # b: not a number; c: KeyError
    assert totals == [3.0, 0.0, 0.0] and rewards.errors() == 2


def test_a_local_judge_scores_each_completion_against_its_reference(tiny_model):
    rewards = build_rewards(GrpoConfig(rewards=[f"judge={tiny_model}"]))
    assert rewards.needs_reference
    _, per = rewards(["Santiago.", "Lima."], [ex("Santiago."), ex("Santiago.")])
    assert len(per["judge"]) == 2 and all(v in (0.0, 0.5, 1.0) for v in per["judge"])
