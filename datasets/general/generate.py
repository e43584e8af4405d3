"""Generate the general-ability regression set: held-out prose for perplexity + general instructions.

Run it from the repository root:

    python datasets/general/generate.py [--seed 0] [--out datasets/general]

Writes
- `heldout_text.jsonl`: {"text": ...} paragraphs of everyday English (cooking,
  weather, travel, science, history of tools, ...). No task data looks like this,
  so its perplexity shows whether a fine-tune damaged the model's general language.
- `instructions.jsonl`: general questions with a short reference answer and the
  `keywords` a correct answer contains (any one of them counts).

All text was written for this project (Apache-2.0); nothing is copied. Standard
library only; the seed only fixes the row order, so files are identical per seed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from mlxft.files import write_jsonl

PARAGRAPHS = [
    "Bread needs only flour, water, salt and yeast, but time is the ingredient most people forget. A slow rise in a cool kitchen gives the yeast hours to make gas and flavour, and the loaf that comes out of the oven has a crisp crust and an open, chewy crumb.",
    "When the wind turns to the north and the sky fills with thin, high clouds, many farmers expect rain within a day. The clouds are ice crystals far above the ground, and they often arrive ahead of a warm front that brings a long, steady shower.",
    "The first thing most travellers notice in a new city is the sound. Trams ring their bells, street sellers call out prices, and buses sigh at every stop. After a few days the noise fades into the background and the city starts to feel like home.",
    "A bicycle is one of the most efficient machines ever built. A rider turns the pedals, the chain carries the force to the rear wheel, and very little energy is lost along the way. On flat ground a person on a bicycle can travel four times as far as on foot for the same effort.",
    "Plants turn sunlight into food through photosynthesis. Inside their leaves, tiny green structures capture light and use its energy to join water and carbon dioxide into sugar, releasing oxygen into the air as a by-product.",
    "Libraries were once the only place where most people could read a book they did not own. Today they also lend laptops, teach classes and offer a quiet, warm room to anyone who needs one, which makes them some of the busiest public buildings in many towns.",
    "The moon has no light of its own. What we see at night is sunlight bouncing off its grey, dusty surface. As the moon travels around the Earth, we see different amounts of its sunlit side, which is why it seems to grow and shrink over a month.",
    "Learning to swim starts with learning to float. Once a beginner trusts the water to hold them up, they can relax, breathe slowly and begin to move their arms and legs in a steady rhythm instead of fighting to keep their head above the surface.",
    "A good cup of tea depends on the water as much as the leaves. Water that has boiled too long loses its oxygen and tastes flat, while water that is too cool will not draw out the flavour. Black tea likes water just off the boil; green tea prefers it a little cooler.",
    "Bees visit thousands of flowers every day. As they collect nectar, pollen sticks to their hairy bodies and is carried from one flower to the next, which allows many fruits and vegetables to grow. Without bees, apples, cherries and almonds would be much harder to find.",
    "The printing press changed the way ideas travelled. Before it, books were copied by hand and were rare and expensive. Afterwards, pamphlets and books could be made by the thousand, and news, arguments and stories spread across countries in weeks instead of years.",
    "Walking in the mountains asks for patience. The path climbs slowly, the air grows thinner and the weather can change within an hour. Experienced hikers start early, carry warm layers and turn back when the clouds close in, even if the summit looks close.",
    "Children learn language by listening long before they speak. They hear the rhythm of sentences, notice which sounds go together and slowly connect words with the things around them. By the age of three, most children use hundreds of words every day.",
    "A compass works because the Earth behaves like a giant magnet. The needle is a small magnet too, and it turns until it lines up with the planet's magnetic field, pointing roughly north. Sailors used this simple tool for centuries to cross open seas.",
    "Saving money is easier when it happens automatically. Many people ask their bank to move a small amount into a savings account on the day they are paid, before they have a chance to spend it. Over a year, these small amounts add up to a useful cushion.",
    "Rivers shape the land they flow through. Over thousands of years, moving water carries away sand and stone, cuts deep valleys and builds wide, flat plains near the sea. Many of the world's great cities grew up beside rivers for water, food and transport.",
    "Sleep is when the body repairs itself. During the night the brain sorts the day's memories, muscles recover and the immune system gets to work. Adults who sleep seven to nine hours tend to concentrate better and fall ill less often than those who sleep less.",
    "Markets are often the liveliest part of a town on a Saturday morning. Farmers bring vegetables picked the day before, bakers sell warm bread, and neighbours stop to talk between the stalls. Buying food there also keeps money in the local community.",
    "The human heart beats about one hundred thousand times a day. Each beat pushes blood through a network of vessels long enough to circle the Earth more than twice, carrying oxygen to every part of the body and taking waste away.",
    "Painting a room is mostly preparation. The walls need to be cleaned, cracks filled and edges covered with tape before any paint is opened. Once that work is done, two thin coats applied with a roller usually give a smoother finish than one thick one.",
    "Volcanoes form where melted rock from deep inside the Earth finds a way to the surface. Some erupt with huge explosions of ash, while others release slow rivers of lava. The soil around old volcanoes is often very rich, which is why farms grow on their slopes.",
    "A museum visit can be tiring if you try to see everything. Many visitors enjoy it more when they choose one or two rooms, sit in front of a few pieces for a while and read about them, then come back another day for the rest.",
    "Snow is made of tiny ice crystals that grow around specks of dust high in the clouds. Each crystal has six sides, and the exact shape depends on the temperature and moisture it meets as it falls, so no two flakes look exactly alike.",
    "Writing a clear email starts with the subject line. It should say what the message is about in a few words. The first sentence should give the main point or the question, and the rest can add the details the reader needs to act on it.",
]

# (question, reference answer, keywords: any one in the reply counts as answering it)
INSTRUCTIONS = [
    ("What is the capital of France?", "The capital of France is Paris.", ["Paris"]),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ["Tokyo"]),
    ("How many days are there in a week?", "There are seven days in a week.", ["seven", "7"]),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.", ["Jupiter"]),
    ("What gas do plants take in from the air to make food?", "Plants take in carbon dioxide.", ["carbon dioxide", "CO2"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", "Water boils at 100 degrees Celsius at sea level.", ["100"]),
    ("Which ocean lies between Europe and North America?", "The Atlantic Ocean.", ["Atlantic"]),
    ("What is 12 multiplied by 3?", "12 multiplied by 3 is 36.", ["36"]),
    ("Name the planet closest to the Sun.", "Mercury is the planet closest to the Sun.", ["Mercury"]),
    ("What colour do you get when you mix blue and yellow?", "Mixing blue and yellow gives green.", ["green"]),
    ("How many legs does a spider have?", "A spider has eight legs.", ["eight", "8"]),
    ("What is the chemical symbol for water?", "The chemical formula of water is H2O.", ["H2O", "H₂O"]),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.", ["lion"]),
    ("What do bees make from nectar?", "Bees make honey from nectar.", ["honey"]),
    ("In which continent is Egypt?", "Egypt is in Africa.", ["Africa"]),
    ("What is the opposite of 'hot'?", "The opposite of hot is cold.", ["cold"]),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", ["60", "sixty"]),
    ("Give one word that means 'very happy'.", "Joyful.", ["joyful", "delighted", "ecstatic", "elated", "thrilled", "overjoyed", "cheerful", "glad", "content"]),
    ("What is the freezing point of water in degrees Celsius?", "Water freezes at 0 degrees Celsius.", ["0", "zero"]),
    ("Which organ pumps blood around the human body?", "The heart pumps blood around the body.", ["heart"]),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth.", ["Everest"]),
    ("Translate 'thank you' into Spanish.", "Gracias.", ["gracias"]),
    ("What star is at the centre of our solar system?", "The Sun is the star at the centre of our solar system.", ["Sun"]),
    ("Write a short sentence about the sea.", "The sea was calm and blue under the morning sun.", ["sea", "ocean", "wave", "water"]),
]


def generate(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    text = [{"text": p} for p in PARAGRAPHS]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "keywords": k}
            for q, a, k in INSTRUCTIONS]
    rng.shuffle(text)
    rng.shuffle(rows)
    return text, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    text, rows = generate(args.seed)
    write_jsonl(Path(args.out) / "heldout_text.jsonl", text)
    write_jsonl(Path(args.out) / "instructions.jsonl", rows)
    print(f"wrote {len(text)} paragraphs and {len(rows)} instructions to {args.out}")


if __name__ == "__main__":
    main()
