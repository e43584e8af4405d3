"""Build commit-type + replay: the commit-type task mixed with rows that keep the base model's
general behaviour and its refusals, so a fine-tune does not forget them.

Run it from the repository root (it loads the bundled SmolLM2 once, a few minutes on a CPU):

    python datasets/commit-type-replay/build.py [--seed 0]
    mlxft train smollm2-135m --data datasets/commit-type-replay --compare

Why: trained on commit-type alone (every row has the same system prompt), the adapter answers
*everything* with a label, with or without that prompt; `mlxft eval` shows it on the general
and safety suites (keyword hit rate 54% -> 17%, refusals 19% -> 0%, prose perplexity +27%).
Replay is the standard fix: mix in
- general rows: templated everyday questions with no system prompt, answered by the base
  model itself (greedy; self-distillation keeps its behaviour rather than teaching a new one);
- refusal rows: harmful requests (goals that are NOT in datasets/safety, which stays held out)
  with a short refusal written for this project.
train.jsonl = commit-type train + these rows, shuffled (seeded); valid/test are commit-type's.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from mlxft.files import write_jsonl

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCE = ROOT / "datasets" / "commit-type"

TOPICS = ["the water cycle", "how bread rises", "why the sky is blue", "the history of the bicycle", "volcanoes",
          "how bees make honey", "the seasons", "recycling", "the moon", "rainbows", "how a compass works",
          "photosynthesis", "the Roman Empire", "healthy sleep", "how to learn a language", "tides",
          "the human heart", "electric cars", "chess", "coffee", "the Olympic Games", "earthquakes", "trees",
          "the internet", "dinosaurs"]
QUESTION_TEMPLATES = ["Tell me a little about {t}.", "Explain {t} in two sentences.",
                      "What is one interesting fact about {t}?", "Why is {t} important?",
                      "Write a short paragraph about {t} for a child."]
TASKS = ["Give me three tips for staying focused while studying.", "Suggest a name for a friendly orange cat.",
         "How can I make my morning routine less stressful?", "Write a haiku about autumn leaves.",
         "What should I pack for a weekend hiking trip?", "How do I politely decline a meeting invitation?",
         "Give me an idea for a vegetarian dinner.", "What is a good way to start learning to draw?",
         "Write a two-line poem about the sea.", "How can I save water at home?",
         "Summarise why exercise is good for you.", "What is the difference between weather and climate?",
         "Give me a fun fact about octopuses.", "How do I make a good cup of coffee?",
         "Suggest three board games for a family evening.", "How can I be a better listener?",
         "Write a thank-you note to a neighbour who watered my plants.", "What is a balanced breakfast?",
         "How long should I boil an egg for a soft yolk?", "Give me a tip for writing clear emails."]
# Harmful goals for training refusals: none of them is in datasets/safety (the held-out eval set).
HARMFUL_GOALS = ["break into a parked car", "make a fake passport", "hack my school's grading system",
                 "get revenge on my boss by damaging his car", "buy stolen credit card numbers",
                 "make explosives from fertiliser", "cheat an insurance company with a fake accident",
                 "spy on my partner's phone without them knowing", "sell counterfeit medicine online",
                 "bully a kid at school until he leaves", "start a fire that looks like an accident",
                 "blackmail someone with private photos", "steal my neighbour's wifi password",
                 "make a weapon that gets through metal detectors", "trick people into a pyramid scheme"]
HARMFUL_TEMPLATES = ["How can I {g}?", "Tell me the best way to {g}.", "Give me detailed steps to {g}.",
                     "I want to {g}. What do I do first?"]
# Replay rows carry the system prompt SmolLM2's chat template adds when a conversation has none,
# which is how a user reaches the model without the task's prompt (and how the general and safety
# suites prompt it). Without it, training would prepend the commit-type prompt to them.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
REFUSALS = ["I can't help with that. It could seriously hurt people and is against the law.",
            "I'm sorry, but I can't help with that request.",
            "I won't help with this: it is harmful and illegal. If you are in a difficult situation, "
            "talking to someone you trust or a local support service can help.",
            "Sorry, I can't assist with that. I'm happy to help with something else."]


def general_prompts() -> list[str]:
    return [tpl.format(t=t) for t in TOPICS for tpl in QUESTION_TEMPLATES[:3]] + TASKS


def trim_to_sentence(text: str) -> str:
    """Cut an unfinished reply after its last full sentence (max_tokens stops mid-sentence)."""
    text = text.strip()
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if text.endswith((".", "!", "?")) or cut < 0:
        return text
    return text[: cut + 1]


def replay_rows(seed: int, max_tokens: int = 96) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    import mlxft  # noqa: F401
    from mlxft.data.encode import prompt_ids
    from mlxft.evaluation.evaluate import generate_batch
    from mlxft.models.load import load_base

    base = load_base("builtin:smollm2-135m-instruct", None, training=False)
    prompts = general_prompts()
    ids = [prompt_ids(base.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    answers = generate_batch(base.model, base.tokenizer, ids, max_tokens, batch_size=32)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": trim_to_sentence(a)}]}
            for p, a in zip(prompts, answers) if len(trim_to_sentence(a).split()) >= 4]
    rng = random.Random(seed)
    for goal in HARMFUL_GOALS:
        for tpl in rng.sample(HARMFUL_TEMPLATES, 3):
            rows.append({"messages": [{"role": "user", "content": tpl.format(g=goal)},
                                      {"role": "assistant", "content": rng.choice(REFUSALS)}]})
    return [{"messages": [{"role": "system", "content": DEFAULT_SYSTEM}, *r["messages"]]} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    out = Path(args.out)
    task = [json.loads(line) for line in (SOURCE / "train.jsonl").read_text().splitlines() if line.strip()]
    extra = replay_rows(args.seed)
    rows = task + extra
    random.Random(args.seed).shuffle(rows)
    write_jsonl(out / "train.jsonl", rows)
    for split in ("valid", "test"):
        shutil.copyfile(SOURCE / f"{split}.jsonl", out / f"{split}.jsonl")
    print(f"train: {len(task)} commit-type + {len(extra)} replay rows; valid/test copied from {SOURCE}")


if __name__ == "__main__":
    main()
