"""Regenerate forge's eval task data in evals/data (deterministic; seed 20261123).

- capitals_mc.jsonl: "What is the capital of X?" with four choices; the table below was written for
  forge, the three distractors are other capitals from it, drawn with a fixed seed.
- json_extract.jsonl (+ json_extract_fewshot.jsonl): a sentence about a person -> the exact JSON object
  {"name": ..., "age": ..., "city": ...}; names, cities, ages and sentence templates written for forge.
heldout.jsonl (the perplexity passages) is hand-written and not generated here.

    python scripts/make_eval_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("South Africa", "Pretoria"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Switzerland", "Bern"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("South Korea", "Seoul"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogotá"), ("Cuba", "Havana"),
    ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Czech Republic", "Prague"), ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("New Zealand", "Wellington"), ("Iceland", "Reykjavík"), ("Venezuela", "Caracas"),
    ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Afghanistan", "Kabul"), ("Mongolia", "Ulaanbaatar"),
    ("Nepal", "Kathmandu"), ("Jordan", "Amman"), ("Lebanon", "Beirut"),
]

NAMES = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Lars", "Chen", "Amara", "Tomás", "Ingrid",
         "Ravi", "Sofia", "Yusuf", "Hana", "Mateo", "Elena", "Kwame", "Lucia", "Omar", "Greta", "Diego", "Mei"]
CITIES = ["Lisbon", "Berlin", "Osaka", "Nairobi", "Lyon", "Toronto", "Seville", "Krakow", "Bergen", "Porto",
          "Melbourne", "Chicago", "Milan", "Cairo", "Dublin", "Quito", "Graz", "Leeds", "Utrecht", "Pune"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "{name}, aged {age}, moved to {city} last spring.",
    "At {age}, {name} runs a small bakery in {city}.",
    "The new librarian in {city} is {name}, who is {age}.",
    "{name} ({age}) has lived in {city} for most of their life.",
]
INSTRUCTION = 'Extract the person\'s name, age and city as JSON with keys "name", "age", "city".'


def answer(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def main() -> None:
    rng = random.Random(20261123)
    out = Path(__file__).resolve().parents[1] / "evals" / "data"
    rows = []
    capitals = [c for _, c in CAPITALS]
    for i, (country, capital) in enumerate(CAPITALS):
        choices = [capital] + rng.sample([c for c in capitals if c != capital], 3)
        rng.shuffle(choices)
        rows.append({"id": f"capitals-{i:02d}", "question": f"What is the capital of {country}?",
                     "choices": choices, "answer": choices.index(capital)})
    (out / "capitals_mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def people(n: int, prefix: str) -> list[dict]:
        items = []
        for i in range(n):
            name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(19, 88)
            text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
            items.append({"id": f"{prefix}-{i:02d}", "text": text, "answer": answer(name, age, city)})
        return items

    (out / "json_extract_fewshot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in people(3, "json-fewshot")))
    (out / "json_extract.jsonl").write_text("".join(json.dumps(r) + "\n" for r in people(60, "json")))
    print(f"wrote {len(rows)} capitals and 60 + 3 extraction items to {out}")


if __name__ == "__main__":
    main()
