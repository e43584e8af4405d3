"""Build the mined + template + replay mix: real commit subjects + the template rows + replay rows.

Run it from the repository root (standard library only, seconds, no model needed):

    python datasets/commit-type-real-replay/build.py [--real-per-label 40] [--synthetic 900] [--replay-sentences N]
    mlxft train smollm2-135m --data datasets/commit-type-real-replay --compare

train.jsonl = the first `--real-per-label` rows of each label in datasets/commit-type-real/train.jsonl
              (mined from 21 repositories; 40 by default, at most 160)
            + the 139 replay rows of datasets/commit-type-replay (everyday questions answered by the
              base SmolLM2 itself, refusals of harmful requests; they keep general ability and
              safety, see that folder's build.py, which made them with the model), each answer cut
              after `--replay-sentences` sentences if given
            + `--synthetic N` rows drawn (seeded) from the template generator's datasets/commit-type
              train split (900 by default: measured, without them held-out repositories and the
              hand-written set score lower),
shuffled (seeded). valid.jsonl / test.jsonl are datasets/commit-type-real's: repositories that
train never saw (valid: 2 repositories, test: 6 others).

Not the default: at the default recipe's budget no mix of this kind beat datasets/commit-type-replay
on held-out repositories with every gate passing (datasets/commit-type-real/README.md, "Training on it").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "datasets" / "commit-type-real"
REPLAY = ROOT / "datasets" / "commit-type-replay"
SYNTHETIC = ROOT / "datasets" / "commit-type"
TASK_SYSTEM = ("Classify the git commit message. Reply with exactly one label: "
               "feat, fix, docs, refactor, test, perf, build, ci, chore or style.")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, written to a temporary file and renamed (never half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def replay_rows(sentences: int | None = None) -> list[dict]:
    """The rows of commit-type-replay that are not commit-type rows (their system prompt is another),
    each answer cut after its first `sentences` sentences (None: whole)."""
    rows = [r for r in read_jsonl(REPLAY / "train.jsonl") if r["messages"][0]["content"] != TASK_SYSTEM]
    if sentences is None:
        return rows
    return [{"messages": [*r["messages"][:-1], {"role": "assistant",
                                                 "content": first_sentences(r["messages"][-1]["content"], sentences)}]}
            for r in rows]


def first_sentences(text: str, count: int) -> str:
    """The text up to the end of its `count`-th sentence ('. ', '! ', '? '), or all of it."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text)]
    return text[: ends[count - 1]] if len(ends) >= count else text


def first_per_label(rows: list[dict], per_label: int) -> list[dict]:
    """The first `per_label` rows of each label, in file order (the file is already shuffled, seeded)."""
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        label = row["messages"][-1]["content"]
        if taken.get(label, 0) < per_label:
            taken[label] = taken.get(label, 0) + 1
            out.append(row)
    return out


def build(synthetic: int, seed: int, real_dir: Path = REAL, real_per_label: int = 40,
          replay_sentences: int | None = None) -> dict[str, list[dict]]:
    real = first_per_label(read_jsonl(real_dir / "train.jsonl"), real_per_label)
    templated = random.Random(seed).sample(read_jsonl(SYNTHETIC / "train.jsonl"), synthetic) if synthetic else []
    train = real + replay_rows(replay_sentences) + templated
    random.Random(seed).shuffle(train)
    return {"train": train, "valid": read_jsonl(real_dir / "valid.jsonl"), "test": read_jsonl(real_dir / "test.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-per-label", type=int, default=40, help="mined rows per label (at most 160)")
    parser.add_argument("--synthetic", type=int, default=900, help="template-generator rows to add (at most 900)")
    parser.add_argument("--replay-sentences", type=int, default=None,
                        help="cut each replay answer after this many sentences (default: whole answers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default=str(REAL), help="the mined rows (mine.py's output folder)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = build(args.synthetic, args.seed, Path(args.real), args.real_per_label, args.replay_sentences)
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    print(f"train: {len(splits['train'])} rows ({10 * args.real_per_label} mined, {len(replay_rows())} replay, "
          f"{args.synthetic} template rows); "
          f"valid {len(splits['valid'])}, test {len(splits['test'])}")


if __name__ == "__main__":
    main()
