"""Generate the house-style preference dataset (train/valid/test JSONL of preference pairs).

Run it from the repository root:

    python datasets/house-style/generate.py [--seed 0] [--out datasets/house-style]

Every row is a preference pair for one question:

    {"prompt": "<question>", "chosen": "<house-style answer>", "rejected": "<rambling answer>"}

The house style: the answer first, in one sentence of at most MAX_WORDS words, with no
greeting, filler or sign-off. The rejected answer carries the same (correct) fact, but
wrapped in an opener, background, a worked explanation and a closing offer of more help,
so the pair differs in style only. Questions come from independent task families (unit
conversions, arithmetic, opposites, plurals, capitals, days, letters, colours), each with
several phrasings; the rambling parts come from pools that are combined at random.

The test split is held out: it uses values (units, words, countries) and question
phrasings that never occur in train or valid, so a model must learn the style, not the rows.

Standard library only and deterministic: the same seed gives byte-identical files.
Besides the three splits it writes ``suite.jsonl``: the test pairs as chat rows (chosen =
the reference answer, plus ``rejected``) for the eval suite ``evals/house-style.yaml``.

Importable too: ``SYSTEM_PROMPT``, ``FILLER``, ``MAX_WORDS``, ``generate(seed)``,
``suite_rows(rows)``, ``write_splits(splits, out_dir)``.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from mlxft.files import write_jsonl

# A neutral system prompt: the style is what training has to teach, not what the prompt asks for.
SYSTEM_PROMPT = "You are the help desk assistant of Acme Learning."
MAX_WORDS = 20  # the house style's longest answer (the eval's generation scorer uses the same limit)
SIZES = {"train": 360, "valid": 40, "test": 80}

# Phrases the house style never uses; the eval's generation scorer looks for them.
FILLER = (
    "great question", "good question", "sure", "certainly", "absolutely", "of course", "happy to help",
    "i'd be happy", "i hope this helps", "let me know", "feel free", "let me", "hope that helps",
    "interesting question", "fun question", "happy learning",
)

# --------------------------------------------------------------------------- #
# Values. Each list is split: the last part of every pool is held out for test.
# --------------------------------------------------------------------------- #

UNITS = [  # (big, small, factor)
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("feet", "inches", 12),
    ("yards", "feet", 3), ("years", "months", 12),
    # held out
    ("dozens", "eggs", 12), ("centuries", "years", 100), ("decades", "years", 10),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
    ("light", "dark"), ("early", "late"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"),
    ("young", "old"), ("loud", "quiet"), ("hard", "soft"), ("wet", "dry"), ("up", "down"),
    ("high", "low"), ("near", "far"), ("thick", "thin"), ("clean", "dirty"), ("first", "last"),
    # held out
    ("heavy", "light"), ("long", "short"), ("safe", "dangerous"), ("sweet", "sour"),
    ("inside", "outside"), ("buy", "sell"),
]
PLURALS = [
    ("child", "children"), ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"),
    ("woman", "women"), ("person", "people"), ("goose", "geese"), ("leaf", "leaves"), ("knife", "knives"),
    ("box", "boxes"), ("city", "cities"), ("bus", "buses"), ("wolf", "wolves"), ("baby", "babies"),
    ("ox", "oxen"), ("cactus", "cacti"), ("half", "halves"),
    # held out
    ("sheep", "sheep"), ("fish", "fish"), ("life", "lives"), ("potato", "potatoes"),
    ("story", "stories"), ("shelf", "shelves"),
]
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Chile", "Santiago"),
    # held out
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Cuba", "Havana"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = [  # for letter counting (held-out: the last ones)
    "apple", "river", "garden", "pencil", "window", "market", "planet", "bottle", "candle", "forest",
    "guitar", "rabbit", "castle", "silver", "orange", "ladder", "butter", "jacket", "mirror", "tunnel",
    "kitten", "pillow", "rocket", "saddle", "violin", "harbor",
    # held out
    "blanket", "compass", "lantern", "meadow", "printer", "whistle",
]
COLOURS = [  # (a, b, mix)
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "gray"),
    # held out
    ("blue", "white", "light blue"),
]
HELDOUT_COUNTS = {"units": 3, "opposites": 6, "plurals": 6, "capitals": 6, "words": 6, "colours": 1}


def _pools(held_out: bool) -> dict[str, list]:
    out = {}
    for name, pool in (("units", UNITS), ("opposites", OPPOSITES), ("plurals", PLURALS),
                       ("capitals", CAPITALS), ("words", WORDS), ("colours", COLOURS)):
        k = HELDOUT_COUNTS[name]
        out[name] = pool[-k:] if held_out else pool[:-k]
    out["days"] = DAYS
    return out


# --------------------------------------------------------------------------- #
# Tasks: each returns (question, answer sentence, topic, worked explanation).
# Phrasings: the first ones are for train/valid, the last one only for test.
# --------------------------------------------------------------------------- #


def _pick(rng: random.Random, phrasings: list[str], held_out: bool) -> str:
    return phrasings[-1] if held_out else rng.choice(phrasings[:-1])


def task_units(rng, pools, held_out):
    big, small, factor = rng.choice(pools["units"])
    n = rng.randint(2, 12)
    q = _pick(rng, ["How many {s} are in {n} {b}?", "Convert {n} {b} to {s}.", "{n} {b} is how many {s}?",
                    "How many {s} make up {n} {b}?", "What is {n} {b} in {s}?"], held_out)
    answer = f"{n} {big} is {n * factor} {small}."
    why = f"Since one {big[:-1] if big.endswith('s') else big} has {factor} {small}, we multiply {n} by {factor}."
    return q.format(s=small, n=n, b=big), answer, "converting units", why


def task_arithmetic(rng, pools, held_out):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op, word, value = rng.choice([("+", "plus", a + b), ("*", "times", a * b), ("-", "minus", a - b)])
    q = _pick(rng, ["What is {a} {w} {b}?", "Calculate {a} {w} {b}.", "Can you work out {a} {w} {b}?",
                    "What do you get for {a} {o} {b}?"], held_out)
    answer = f"{a} {word} {b} is {value}."
    why = f"Working it out step by step, {a} {word} {b} comes to {value}."
    return q.format(a=a, w=word, b=b, o=op), answer, "arithmetic", why


def task_opposite(rng, pools, held_out):
    word, opp = rng.choice(pools["opposites"])
    if rng.random() < 0.5:
        word, opp = opp, word
    q = _pick(rng, ["What is the opposite of '{w}'?", "Give me the antonym of '{w}'.",
                    "Which word means the opposite of '{w}'?", "What's an antonym for '{w}'?"], held_out)
    answer = f"The opposite of '{word}' is '{opp}'."
    why = f"An antonym is a word with the opposite meaning, and '{opp}' is the usual opposite of '{word}'."
    return q.format(w=word), answer, "opposites", why


def task_plural(rng, pools, held_out):
    word, plural = rng.choice(pools["plurals"])
    q = _pick(rng, ["What is the plural of '{w}'?", "How do you write more than one '{w}'?",
                    "What's the plural form of '{w}'?", "Pluralize the word '{w}'."], held_out)
    answer = f"The plural of '{word}' is '{plural}'."
    why = f"English plurals do not always just add an s, and for '{word}' the plural form is '{plural}'."
    return q.format(w=word), answer, "plurals", why


def task_capital(rng, pools, held_out):
    country, capital = rng.choice(pools["capitals"])
    q = _pick(rng, ["What is the capital of {c}?", "Which city is the capital of {c}?",
                    "Name the capital city of {c}.", "What city serves as the capital of {c}?"], held_out)
    answer = f"The capital of {country} is {capital}."
    why = f"{capital} is where the government of {country} sits, and it is also one of its best known cities."
    return q.format(c=country), answer, "world capitals", why


def task_day(rng, pools, held_out):
    i = rng.randrange(7)
    day, after = pools["days"][i], pools["days"][(i + 1) % 7]
    before = pools["days"][(i - 1) % 7]
    if rng.random() < 0.5:
        q = _pick(rng, ["What day comes after {d}?", "Which day follows {d}?",
                        "If today is {d}, what day is tomorrow?", "What is the day after {d}?"], held_out)
        answer, why = f"{after} comes after {day}.", f"The week runs in order, and right after {day} comes {after}."
    else:
        q = _pick(rng, ["What day comes before {d}?", "Which day is just before {d}?",
                        "If today is {d}, what day was yesterday?", "What is the day before {d}?"], held_out)
        answer, why = f"{before} comes before {day}.", f"The week runs in order, and right before {day} comes {before}."
    return q.format(d=day), answer, "days of the week", why


def task_letters(rng, pools, held_out):
    word = rng.choice(pools["words"])
    q = _pick(rng, ["How many letters are in the word '{w}'?", "Count the letters in '{w}'.",
                    "How long is the word '{w}' in letters?", "What is the letter count of '{w}'?"], held_out)
    answer = f"The word '{word}' has {len(word)} letters."
    why = f"Spelling it out, {'-'.join(word.upper())}, gives {len(word)} letters in total."
    return q.format(w=word), answer, "spelling", why


def task_colour(rng, pools, held_out):
    a, b, mix = rng.choice(pools["colours"])
    if rng.random() < 0.5:
        a, b = b, a
    q = _pick(rng, ["What color do you get by mixing {a} and {b}?", "What happens if I mix {a} and {b} paint?",
                    "Mixing {a} with {b} gives which color?", "Which color comes from combining {a} and {b}?"],
              held_out)
    answer = f"Mixing {a} and {b} gives {mix}."
    why = f"When you blend {a} paint with {b} paint, the two pigments combine into {mix}."
    return q.format(a=a, b=b), answer, "mixing colors", why


TASKS = (task_units, task_arithmetic, task_opposite, task_plural, task_capital, task_day, task_letters, task_colour)

# --------------------------------------------------------------------------- #
# Rambling pieces.
# --------------------------------------------------------------------------- #

OPENERS = [
    "Great question!", "Sure thing! I'd be happy to help you with that.", "Certainly! That's a really interesting question.",
    "Oh, what a fun question to think about!", "Absolutely, let me walk you through it.", "Good question, let me explain.",
    "Of course! I'm always happy to help with questions like this.", "Sure! Let me think about this carefully.",
]
CONTEXT = [
    "Questions about {topic} come up all the time, and they are easy once you know the trick.",
    "Many people find {topic} a little confusing at first, so it's worth going through it slowly.",
    "When it comes to {topic}, there are a few things to keep in mind.",
    "{Topic} is one of those topics that is really useful in everyday life.",
]
LEAD_INS = [
    "So, putting it all together, the answer is that", "After thinking it through, we can say that",
    "In short, and to answer your question directly,", "So the final answer to your question is that",
]
CLOSERS = [
    "I hope this helps! Let me know if you have any other questions.", "Feel free to ask if anything is unclear!",
    "Let me know if you'd like more examples. Happy learning!", "I hope that helps, and feel free to ask me anything else!",
]


def ramble(rng: random.Random, answer: str, topic: str, why: str) -> str:
    lead = rng.choice(LEAD_INS)
    context = rng.choice(CONTEXT).format(topic=topic, Topic=topic[0].upper() + topic[1:])
    body = answer[0].lower() + answer[1:] if answer.startswith(("The ", "Mixing ")) else answer
    return " ".join([rng.choice(OPENERS), context, why, f"{lead} {body}", rng.choice(CLOSERS)])


# --------------------------------------------------------------------------- #


def make_row(rng: random.Random, held_out: bool) -> dict:
    task = rng.choice(TASKS)
    question, answer, topic, why = task(rng, _pools(held_out), held_out)
    return {"prompt": question, "chosen": answer, "rejected": ramble(rng, answer, topic, why)}


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Train, valid and test rows; each question appears once across all splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in SIZES.items():
        rows = splits[split] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 100 * n:
                raise RuntimeError(f"could not draw {n} distinct {split} questions")
            row = make_row(rng, held_out=split == "test")
            key = re.sub(r"\W+", " ", row["prompt"].lower()).strip()
            if key in seen:
                continue
            seen.add(key)
            assert len(row["chosen"].split()) <= MAX_WORDS, row
            rows.append({"system": SYSTEM_PROMPT, **row})
    return splits


def write_splits(splits: dict[str, list[dict]], out_dir: Path) -> None:
    """Write <split>.jsonl, each atomically."""
    for split, rows in splits.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)


def suite_rows(rows: list[dict]) -> list[dict]:
    """Test pairs as chat rows for the eval suite (evals/house-style.yaml): the chosen answer is the
    reference, the rejected one rides along for the log-prob preference scorer."""
    return [{"messages": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["chosen"]}], "rejected": r["rejected"]} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    splits = generate(args.seed)
    write_splits({**splits, "suite": suite_rows(splits["test"])}, args.out)
    print(", ".join(f"{s}: {len(r)}" for s, r in splits.items()), f"(+ suite.jsonl) -> {args.out}")


if __name__ == "__main__":
    main()
