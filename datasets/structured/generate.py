"""Generate the structured-output dataset: a meeting request in free text -> a JSON object.

Run it from the repository root:

    python datasets/structured/generate.py [--seed 0] [--out datasets/structured]

The task: read a short message that asks for a meeting and reply with only a JSON
object matching `schema.json`:

    {"name": "Maria Lopez", "company": "Acme Corp", "date": "2026-05-14",
     "time": "15:30", "duration_minutes": 30, "topic": "the Q3 budget", "urgent": false}

Dates appear in the text as "14 May 2026", "May 14, 2026" or "2026-05-14" and times
as "15:30", "3:30 pm" or "half past three in the afternoon", so the model has to
normalise them (ISO date, 24-hour time). Messages are built from independent pools
(names, companies, topics, openings, orderings) and no message appears in two
splits; test uses names, companies and topics that never occur in train or valid.
Writes train.jsonl (600), valid.jsonl (60) and test.jsonl (100) in chat format.
Standard library only and deterministic: the same seed gives identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mlxft.files import write_jsonl

SYSTEM_PROMPT = (
    "Extract the meeting request as JSON with the keys name, company, date (YYYY-MM-DD), "
    "time (HH:MM, 24-hour), duration_minutes, topic and urgent (true or false). Reply with only the JSON object."
)

FIRST = ["Maria", "James", "Aiko", "Tomas", "Priya", "Liam", "Sofia", "Noah", "Chen", "Fatima", "Lucas", "Emma",
         "Omar", "Hanna", "Diego", "Grace", "Ivan", "Leila", "Mateo", "Nora", "Ravi", "Zoe", "Felix", "Amara"]
LAST = ["Lopez", "Smith", "Tanaka", "Novak", "Sharma", "Murphy", "Rossi", "Becker", "Wang", "Haddad", "Silva",
        "Jensen", "Khan", "Berg", "Costa", "Okafor", "Petrov", "Nasser", "Ruiz", "Dubois", "Iyer", "Clarke"]
COMPANIES = ["Acme Corp", "Blue Harbor Logistics", "Northwind Foods", "Pinecrest Bank", "Solaris Energy",
             "Redline Studios", "Quartz Analytics", "Meadow Health", "Ironbridge Legal", "Atlas Freight",
             "Brightpath Schools", "Copperleaf Farms", "Vantage Realty", "Orbit Telecom", "Silverline Travel",
             "Kestrel Robotics", "Harborview Hotels", "Evergreen Insurance"]
TOPICS = ["the Q3 budget", "the new website", "the office move", "the hiring plan", "the annual report",
          "the supplier contract", "the product launch", "the training schedule", "the marketing campaign",
          "the security audit", "the customer survey results", "the holiday rota", "the data migration",
          "the price increase", "the partnership proposal", "the warehouse layout"]
# Test-only pools: generalisation to names, companies and topics never seen in training.
HELDOUT = {
    "first": ["Yusuf", "Ingrid", "Kofi", "Mei", "Pablo", "Sanna"],
    "last": ["Lindqvist", "Mensah", "Oyelaran", "Castellanos", "Hoang"],
    "company": ["Tidewater Ceramics", "Nimbus Drones", "Foxglove Pharmacy", "Granite Peak Outfitters"],
    "topic": ["the solar panel quote", "the fleet renewal", "the menu redesign", "the translation backlog"],
}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DURATIONS = [15, 20, 30, 45, 60, 90, 120]
HOUR_WORDS = ["twelve", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]

OPENINGS = ["Hi, this is {name} from {company}.", "Hello! {name} here, I work at {company}.",
            "Good morning, my name is {name} ({company}).", "{name} from {company} here.",
            "Hey, it's {name} at {company}."]
ASKS = ["Could we meet on {date} at {time} to talk about {topic}?",
        "I'd like to set up a meeting about {topic} on {date} at {time}.",
        "Are you free on {date} at {time}? I want to go over {topic}.",
        "Let's get together on {date}, {time}, to discuss {topic}.",
        "Can we book a slot at {time} on {date} for {topic}?"]
LENGTHS = ["It should take about {minutes} minutes.", "Please block {minutes} minutes.",
           "I expect we need {minutes} minutes.", "{minutes} minutes should be enough."]
URGENT = ["This is urgent, sorry for the short notice.", "It's quite urgent.", "Urgent, please confirm today."]
CALM = ["No rush on replying.", "Thanks a lot!", "Let me know if that works.", "Happy to move it if needed."]


def _date_text(rng: random.Random, year: int, month: int, day: int) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"{day} {MONTHS[month - 1]} {year}"
    if form == 1:
        return f"{MONTHS[month - 1]} {day}, {year}"
    return f"{year}-{month:02d}-{day:02d}"


def _time_text(rng: random.Random, hour: int, minute: int) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"{hour:02d}:{minute:02d}"
    h12, ampm = (hour % 12 or 12), ("am" if hour < 12 else "pm")
    if form == 1 or minute not in (0, 30):
        return f"{h12}:{minute:02d} {ampm}" if minute else f"{h12} {ampm}"
    part = "in the morning" if hour < 12 else "in the afternoon" if hour < 18 else "in the evening"
    word = HOUR_WORDS[hour % 12]
    return f"half past {word} {part}" if minute == 30 else f"{word} o'clock {part}"


def make_row(rng: random.Random, heldout: bool) -> tuple[str, dict]:
    pick = (lambda key, pool: rng.choice(HELDOUT[key])) if heldout else (lambda key, pool: rng.choice(pool))
    name = f"{pick('first', FIRST)} {pick('last', LAST)}"
    company, topic = pick("company", COMPANIES), pick("topic", TOPICS)
    year, month, day = rng.choice([2026, 2027]), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute = rng.randint(8, 18), rng.choice([0, 0, 15, 30, 30, 45])
    minutes, urgent = rng.choice(DURATIONS), rng.random() < 0.3
    parts = [rng.choice(OPENINGS).format(name=name, company=company),
             rng.choice(ASKS).format(date=_date_text(rng, year, month, day), time=_time_text(rng, hour, minute),
                                     topic=topic),
             rng.choice(LENGTHS).format(minutes=minutes), rng.choice(URGENT if urgent else CALM)]
    if rng.random() < 0.3:  # the length sentence sometimes comes last
        parts[2], parts[3] = parts[3], parts[2]
    answer = {"name": name, "company": company, "date": f"{year}-{month:02d}-{day:02d}",
              "time": f"{hour:02d}:{minute:02d}", "duration_minutes": minutes, "topic": topic, "urgent": urgent}
    return " ".join(parts), answer


def row(message: str, answer: dict) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": message},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def generate(seed: int = 0, n_train: int = 600, n_valid: int = 60, n_test: int = 100) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    targets = {"train": n_train, "valid": n_valid, "test": n_test}
    for split, n in targets.items():
        while len(splits[split]) < n:
            heldout = split == "test" and len(splits[split]) < n // 2  # half the test split is held out
            message, answer = make_row(rng, heldout)
            if message in seen:
                continue
            seen.add(message)
            splits[split].append(row(message, answer))
        rng.shuffle(splits[split])
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    for split, rows in generate(args.seed).items():
        write_jsonl(Path(args.out) / f"{split}.jsonl", rows)
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
