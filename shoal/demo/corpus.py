"""The demo's data, written by code: a small invented world, a pretraining corpus about it and an
instruction task in the same language.

Nothing here is text taken from elsewhere. The world is a few hundred invented people with a home
city, a pet, a favourite colour, a job and a favourite food, each known by an English and a
Traditional Chinese name (the seed's users train on zh-TW text, so non-ASCII paths get exercised
end to end). The corpus tells profiles, short stories, dialogues, quizzes (facts, then questions
answered from them) and sums about them, in both languages.

The instruction task is reading comprehension: the input gives a fact about each of two or three
people and asks for one person's city, pet or colour; the output is the word the input gives. A tiny
model learns it in a few hundred steps, yet cannot answer it untrained, and exact match checks it.
The pretraining corpus uses the same sentence forms, so continual pretraining teaches the
"language" the task is written in. Every generator is deterministic for a seed.

`python -m shoal.demo.corpus --corpus FILE --sft-dir DIR` writes the files the demo consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shoal.checkpoint.atomic import atomic_directory, check_output_dir

# Each vocabulary entry is (English, Traditional Chinese).
CITIES = [
    ("Taipei", "台北"), ("Taichung", "台中"), ("Tainan", "台南"), ("Kaohsiung", "高雄"),
    ("Hsinchu", "新竹"), ("Hualien", "花蓮"), ("Keelung", "基隆"), ("Yilan", "宜蘭"),
    ("Taitung", "台東"), ("Chiayi", "嘉義"), ("Pingtung", "屏東"), ("Nantou", "南投"),
]
PETS = [
    ("cat", "貓"), ("dog", "狗"), ("rabbit", "兔子"), ("fish", "魚"), ("bird", "鳥"),
    ("turtle", "烏龜"), ("hamster", "倉鼠"), ("goat", "山羊"),
]
COLORS = [
    ("red", "紅色"), ("blue", "藍色"), ("green", "綠色"), ("yellow", "黃色"), ("white", "白色"),
    ("black", "黑色"), ("purple", "紫色"), ("pink", "粉紅色"),
]
JOBS = [
    ("teacher", "老師"), ("doctor", "醫生"), ("farmer", "農夫"), ("baker", "麵包師傅"), ("driver", "司機"),
    ("painter", "畫家"), ("engineer", "工程師"), ("nurse", "護理師"), ("cook", "廚師"), ("singer", "歌手"),
]
FOODS = [
    ("apple", "蘋果"), ("mango", "芒果"), ("banana", "香蕉"), ("pineapple", "鳳梨"), ("guava", "芭樂"),
    ("peach", "桃子"), ("lychee", "荔枝"), ("dumpling", "水餃"),
]
DAYS = [
    ("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
    ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日"),
]

# Name parts. English names are two invented syllables (plus an optional ending); Chinese names a
# common surname and one or two given-name characters.
_SYLLABLES = ["ka", "mi", "ro", "lu", "ta", "ne", "bo", "si", "da", "ve", "ri", "pa", "zo", "fe",
              "gu", "ha", "jo", "li", "mo", "nu", "sa", "te", "wi", "yo"]
_ENDINGS = ["", "", "n", "r", "s"]
_SURNAMES = "王李陳林張周吳劉蔡楊許鄭謝郭洪曾"
_GIVEN = "美華志雅文宏欣婷俊安明玉家佳建怡偉芳淑慧"

# The attributes the instruction task asks about: (attribute, English question, Chinese question).
QUESTION_KINDS = ("city", "pet", "color")


@dataclass(frozen=True)
class Person:
    name: str  # English name
    name_zh: str
    city: tuple[str, str]
    pet: tuple[str, str]
    color: tuple[str, str]
    job: tuple[str, str]
    food: tuple[str, str]


# English words the corpus and the task are written with: an invented name must not be one of them,
# or a sentence such as "What pet does Have have?" would be ambiguous.
_TEMPLATE_WORDS = set(
    "a across and answer answered as asked brought color does evening favorite food friend from had has have "
    "home in is like likes live lives minus nearby of on pet plus question said slept so thank the they to together "
    "took train visit walked went what where works you".split()
)


def _english_name(rng: random.Random) -> str:
    while True:
        name = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_ENDINGS)
        if name not in _TEMPLATE_WORDS:
            return name.capitalize()


def _chinese_name(rng: random.Random) -> str:
    return rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2, 2))))


def _unique_names(rng: random.Random, count: int, make) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = make(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_world(num_people: int = 240, seed: int = 0) -> list[Person]:
    """The invented people, each with fixed facts the corpus repeats."""
    rng = random.Random(f"world-{seed}")
    names = _unique_names(rng, num_people, _english_name)
    names_zh = _unique_names(rng, num_people, _chinese_name)
    return [
        Person(name, name_zh, rng.choice(CITIES), rng.choice(PETS), rng.choice(COLORS), rng.choice(JOBS),
               rng.choice(FOODS))
        for name, name_zh in zip(names, names_zh)
    ]


# ---------------------------------------------------------------------------------------------
# Sentences shared by the corpus and the instruction task. The task's facts and questions are
# written exactly as the corpus writes them, so pretraining teaches the task's language.


def fact_sentence(name: str, kind: str, value: str, zh: bool) -> str:
    """One fact about one person: where they live, their pet or their favourite colour."""
    if zh:
        return {"city": f"{name}住在{value}。", "pet": f"{name}養了一隻{value}。",
                "color": f"{name}最喜歡{value}。"}[kind]
    return {"city": f"{name} lives in {value}.", "pet": f"{name} has a {value}.",
            "color": f"{name} likes the color {value}."}[kind]


def question_sentence(name: str, kind: str, zh: bool) -> str:
    if zh:
        return {"city": f"{name}住在哪裡？", "pet": f"{name}養了什麼動物？", "color": f"{name}最喜歡什麼顏色？"}[kind]
    return {"city": f"Where does {name} live?", "pet": f"What pet does {name} have?",
            "color": f"What color does {name} like?"}[kind]


def _value(person: Person, kind: str, zh: bool) -> str:
    return getattr(person, kind)[1 if zh else 0]


# ---------------------------------------------------------------------------------------------
# The pretraining corpus.


def _profile(rng: random.Random, p: Person, zh: bool) -> str:
    kinds = list(QUESTION_KINDS)
    rng.shuffle(kinds)
    facts = [fact_sentence(p.name_zh if zh else p.name, k, _value(p, k, zh), zh) for k in kinds]
    if zh:
        facts.insert(rng.randrange(len(facts) + 1), f"{p.name_zh}是一位{p.job[1]}。")
        facts.append(f"{p.name_zh}最愛吃{p.food[1]}。")
        return "".join(facts)
    facts.insert(rng.randrange(len(facts) + 1), f"{p.name} works as a {p.job[0]}.")
    facts.append(f"The favorite food of {p.name} is the {p.food[0]}.")
    return " ".join(facts)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("ch", "sh", "o")) else "s")


def _story(rng: random.Random, p: Person, q: Person, zh: bool) -> str:
    day = rng.choice(DAYS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    same_city = p.city == q.city
    if zh:
        trip = f"走路去找住在同一個城市的{q.name_zh}" if same_city else f"從{p.city[1]}搭火車到{q.city[1]}去找{q.name_zh}"
        return (f"{day[1]}，{p.name_zh}{trip}。"
                f"{p.name_zh}帶了{a}個{p.food[1]}，{q.name_zh}拿出{b}個，所以他們一共有{a + b}個{p.food[1]}。"
                f"{q.name_zh}的{q.pet[1]}在旁邊睡覺。晚上{p.name_zh}回到{p.city[1]}。")
    trip = (f"walked across {p.city[0]} to visit {q.name}" if same_city
            else f"took the train from {p.city[0]} to {q.city[0]} to visit {q.name}")
    return (f"On {day[0]}, {p.name} {trip}. "
            f"{p.name} brought {a} {_plural(p.food[0])} and {q.name} had {b}, so together they had {a + b}. "
            f"The {q.pet[0]} of {q.name} slept nearby. In the evening {p.name} went home to {p.city[0]}.")


def _dialogue(rng: random.Random, p: Person, asker: Person, zh: bool) -> str:
    kind = rng.choice(QUESTION_KINDS)
    name, other = (p.name_zh, asker.name_zh) if zh else (p.name, asker.name)
    question = question_sentence(name, kind, zh)
    answer = fact_sentence(name, kind, _value(p, kind, zh), zh)
    if zh:
        return f"{other}問：「{question}」朋友回答：「{answer}」{other}說：「謝謝！」"
    return f'{other} asked, "{question}" A friend answered, "{answer}" {other} said, "Thank you!"'


def _quiz(rng: random.Random, world: list[Person], zh: bool) -> str:
    """Facts about a few people, then questions answered from them: reading comprehension in plain
    text, the skill the instruction task asks for in chat form."""
    people = rng.sample(world, rng.choice((2, 3, 4)))
    stated = [(p, kind) for p in people for kind in rng.sample(QUESTION_KINDS, rng.choice((1, 2, 3)))]
    rng.shuffle(stated)
    parts = [fact_sentence(p.name_zh if zh else p.name, k, _value(p, k, zh), zh) for p, k in stated]
    for p, kind in rng.sample(stated, min(len(stated), rng.choice((1, 2, 3)))):
        question = question_sentence(p.name_zh if zh else p.name, kind, zh)
        value = _value(p, kind, zh)
        parts.append(f"問題：{question}答案：{value}。" if zh else f"Question: {question} Answer: {value}.")
    return ("" if zh else " ").join(parts)


def _sums(rng: random.Random, zh: bool) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if rng.random() < 0.5:
            lines.append(f"{a}加{b}等於{a + b}。" if zh else f"{a} plus {b} is {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a}減{b}等於{a - b}。" if zh else f"{a} minus {b} is {a - b}.")
    return ("" if zh else " ").join(lines)


def pretraining_documents(num_documents: int = 3000, seed: int = 0) -> list[str]:
    """Short documents about the world: profiles, stories, dialogues, quizzes and sums, about a third
    in Chinese."""
    world = make_world(seed=seed)
    rng = random.Random(f"corpus-{seed}")
    docs = []
    for _ in range(num_documents):
        zh = rng.random() < 0.35
        kind = rng.choices(("profile", "story", "dialogue", "quiz", "sums"), weights=(3, 2, 2, 4, 1))[0]
        p, q = rng.sample(world, 2)
        if kind == "profile":
            docs.append(_profile(rng, p, zh))
        elif kind == "story":
            docs.append(_story(rng, p, q, zh))
        elif kind == "dialogue":
            docs.append(_dialogue(rng, p, q, zh))
        elif kind == "quiz":
            docs.append(_quiz(rng, world, zh))
        else:
            docs.append(_sums(rng, zh))
    return docs


# ---------------------------------------------------------------------------------------------
# The instruction task.


def _distinct_starts(rng: random.Random, names: list[str], count: int, prefix: int) -> list[str]:
    """`count` names that differ in their first `prefix` characters (surname, or first syllable):
    names sharing a start (張明, 張佳明) are the tiny model's most common confusion."""
    chosen: list[str] = []
    while len(chosen) < count:
        name = rng.choice(names)
        if all(name[:prefix] != other[:prefix] for other in chosen):
            chosen.append(name)
    return chosen


def instruction_example(rng: random.Random, names: list[str], names_zh: list[str]) -> dict[str, str]:
    """Two or three people, one fact each (each of a different kind), and a question about one.

    The facts are drawn afresh rather than taken from the world, so the answer can only come from
    reading the input. Giving each person a different kind of fact keeps the task within reach of a
    tiny model trained for a few hundred steps: with two cities in one input it must also match the
    name, which takes it several times longer to learn.
    """
    zh = rng.random() < 0.35
    people = _distinct_starts(rng, names_zh if zh else names, rng.choice((2, 3)), prefix=1 if zh else 2)
    kinds = rng.sample(QUESTION_KINDS, len(people))
    vocab = {"city": CITIES, "pet": PETS, "color": COLORS}
    stated = [(name, kind, rng.choice(vocab[kind])[1 if zh else 0]) for name, kind in zip(people, kinds)]
    name, kind, value = rng.choice(stated)
    facts = ("" if zh else " ").join(fact_sentence(n, k, v, zh) for n, k, v in stated)
    return {"input": f"{facts}{'' if zh else ' '}{question_sentence(name, kind, zh)}", "output": value}


def instruction_examples(num_examples: int, seed: int = 0, split: str = "training") -> list[dict[str, str]]:
    """`num_examples` rows of the task; each split has its own random stream, so they differ."""
    world = make_world(seed=seed)
    names = [p.name for p in world]
    names_zh = [p.name_zh for p in world]
    rng = random.Random(f"instructions-{seed}-{split}")
    return [instruction_example(rng, names, names_zh) for _ in range(num_examples)]


# ---------------------------------------------------------------------------------------------
# Writers.

SFT_SPLITS = ("training", "validation", "test")


def _write_jsonl_rows(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_pretraining_corpus(
    path: str | os.PathLike, num_documents: int = 3000, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the corpus as JSONL, one `{"text": ...}` per line, published only when complete."""
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write_jsonl_rows(tmp, ({"text": doc} for doc in pretraining_documents(num_documents, seed)))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_instruction_set(
    out_dir: str | os.PathLike,
    sizes: tuple[int, int, int] = (2000, 200, 200),
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write `training.jsonl`, `validation.jsonl` and `test.jsonl` (`{"input", "output"}` rows)."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for split, size in zip(SFT_SPLITS, sizes):
            _write_jsonl_rows(tmp / f"{split}.jsonl", instruction_examples(size, seed, split))
    return {split: Path(out_dir) / f"{split}.jsonl" for split in SFT_SPLITS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.demo.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="write the pretraining corpus (JSONL) here")
    parser.add_argument("--sft-dir", help="write training/validation/test.jsonl into this folder")
    parser.add_argument("--num-documents", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--rebuild-tokenizer", action="store_true",
                        help="retrain the shipped demo tokenizer (shoal/demo/assets/tokenizer) from the corpus")
    args = parser.parse_args(argv)
    if args.corpus:
        print(write_pretraining_corpus(args.corpus, args.num_documents, args.seed, args.overwrite))
    if args.sft_dir:
        for path in write_instruction_set(args.sft_dir, seed=args.seed, overwrite=args.overwrite).values():
            print(path)
    if args.rebuild_tokenizer:
        from shoal.demo.tokenizer import TOKENIZER_DIR, write_tokenizer

        print(write_tokenizer(TOKENIZER_DIR, overwrite=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
