"""Synthetic SQuAD-v1.1-style reading comprehension for the offline demo.

Paragraphs describe two or three made-up entities (people and organisations) with attributes such as birthplace,
birth year, employer, job, pet and founding year, so every paragraph contains distractors of the same type as the
answer. Questions come from several templates and their answer is always a span of the context.

Entity names are built from syllables. Every name *word* (first name, surname, city, organisation stem) belongs to
exactly one pool, decided by a hash of the word: words of the ``"heldout"`` pool never occur in the ``"train"`` pool
or in :func:`pretraining_documents`, so held-out questions are about people, cities and organisations that the model
has never seen: the answer has to be copied from the context, it cannot be memorised.

Everything is deterministic given the seed (``random.Random``).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

NamePool = Literal["train", "heldout"]

# The small pretrained dense T5 shipped for the demo (made by scripts/make_demo_checkpoint.py on this module's text);
# `mixt5 demo` fine-tunes it and sweeps name it `demo`. Read at call time, so that tests can point it elsewhere.
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "resources" / "demo-t5"

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "", "n", "r", "l", "s")
_CITY_SUFFIXES = ("burg", "ville", "ton", "port", "field", "stad", "mouth", "ford")
_ORG_KINDS = ("Labs", "Motors", "Bank", "Press", "Systems", "Foods", "Records", "Airlines", "Textiles", "Robotics")
_JOBS = (
    "pilot", "painter", "chemist", "baker", "lawyer", "nurse", "farmer", "teacher", "architect", "engineer",
    "journalist", "sailor", "dentist", "librarian", "carpenter", "musician", "surgeon", "plumber", "gardener", "actor",
)  # fmt: skip
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "orange", "purple", "brown", "pink", "silver")
_PETS = ("cat", "dog", "parrot", "horse", "rabbit", "goat", "turtle", "hamster", "pony", "duck")
_HELDOUT_MODULUS = 4  # one name word in four is held out


def is_heldout_word(word: str) -> bool:
    """Whether a generated name word belongs to the held-out pool (stable hash, independent of any seed)."""
    return zlib.crc32(word.lower().encode()) % _HELDOUT_MODULUS == 0


class _Names:
    """Draws fresh, pool-restricted name words; never returns the same word twice within one paragraph."""

    def __init__(self, rng: random.Random, pool: NamePool) -> None:
        self.rng = rng
        self.pool = pool
        self.used: set[str] = set()

    def word(self, min_syllables: int = 2, max_syllables: int = 3, suffix: str = "") -> str:
        while True:
            n = self.rng.randint(min_syllables, max_syllables)
            syllables = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            syllables[-1] += self.rng.choice(_CODAS) if not suffix else ""
            word = "".join(syllables).capitalize() + suffix
            if is_heldout_word(word) == (self.pool == "heldout") and word not in self.used:
                self.used.add(word)
                return word

    def person(self) -> str:
        return f"{self.word(2, 2)} {self.word(2, 3)}"

    def city(self) -> str:
        return self.word(1, 2, suffix=self.rng.choice(_CITY_SUFFIXES))

    def organisation(self) -> str:
        return f"{self.word(2, 3)} {self.rng.choice(_ORG_KINDS)}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- facts -----------------------------------------------------------------------------------------------------------
# A fact group is rendered by one sentence template; the slots hold the attribute values, `{ref}` the subject. Each
# question template asks for one slot of one group; the answer span is that slot in the rendered sentence.

_PERSON_SENTENCES: dict[str, tuple[str, ...]] = {
    "birth": (
        "{ref} was born in {birthplace} in {birth_year}.",
        "{ref} was born in {birth_year} in the city of {birthplace}.",
        "Born in {birthplace} in {birth_year}, {ref} grew up near the river.",
        "In {birth_year}, {ref} was born in {birthplace}.",
    ),
    "work": (
        "{ref} works for {employer} as {a_job} {job}.",
        "{ref} is {a_job} {job} at {employer}.",
        "Today {ref} is employed by {employer} as {a_job} {job}.",
        "{ref} has worked as {a_job} {job} for {employer} for many years.",
    ),
    "pet": (
        "{ref} owns {a_colour} {pet_colour} {pet}.",
        "{ref} has {a_colour} {pet_colour} {pet} at home.",
        "At home, {ref} keeps {a_colour} {pet_colour} {pet}.",
    ),
}
_ORG_SENTENCES: dict[str, tuple[str, ...]] = {
    "founding": (
        "{ref} was founded in {founded} by {founder}.",
        "{ref} was founded by {founder} in {founded}.",
        "In {founded}, {founder} founded {ref}.",
    ),
    "site": (
        "{ref} is based in {hq} and has {employees} employees.",
        "The headquarters of {ref} are in {hq}, where its {employees} employees work.",
        "With {employees} employees, {ref} is based in {hq}.",
    ),
}
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
    "birth_year": ("When was {name} born?", "In what year was {name} born?", "What year was {name} born in?"),
    "employer": (
        "Who does {name} work for?",
        "Which organisation employs {name}?",
        "What company does {name} work for?",
    ),
    "job": ("What is the job of {name}?", "What does {name} do for a living?", "What is {name}'s profession?"),
    "pet_colour": ("What colour is {name}'s {pet}?", "What is the colour of the {pet} owned by {name}?"),
    "pet": ("What animal does {name} own?", "What kind of pet does {name} have?"),
    "founded": ("When was {name} founded?", "In which year was {name} founded?", "What year was {name} founded?"),
    "founder": ("Who founded {name}?", "Who was the founder of {name}?", "By whom was {name} founded?"),
    "hq": ("Where is {name} based?", "In which city is {name} based?", "Where are the headquarters of {name}?"),
    "employees": ("How many employees does {name} have?", "How many people work at {name}?"),
}
QUESTION_TEMPLATES: tuple[str, ...] = tuple(t for templates in _QUESTIONS.values() for t in templates)
"""All question templates (placeholders ``{name}`` and ``{pet}``), e.g. for a tokenizer's training text."""


@dataclass
class _Entity:
    name: str
    kind: Literal["person", "organisation"]
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class _Sentence:
    """A rendered sentence with the character span of each slot value (relative to the sentence)."""

    text: str
    spans: dict[str, tuple[int, int]]
    entity: _Entity


def _render(template: str, slots: Mapping[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Format `template` and return the text plus the span of every named slot."""
    text, spans = "", {}
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name is not None:
            value = slots[name]
            spans[name] = (len(text), len(text) + len(value))
            text += value
    return text[0].upper() + text[1:], spans


def _distinct(rng: random.Random, options: Sequence[str], used: set[str]) -> str:
    value = rng.choice([o for o in options if o not in used])
    used.add(value)
    return value


def _make_entities(rng: random.Random, names: _Names) -> list[_Entity]:
    """Two or three entities whose attributes of the same type differ (so they are real distractors)."""
    used: set[str] = set()
    years = rng.sample(range(1801, 2000), 6)
    people = [_Entity(names.person(), "person") for _ in range(rng.choice((1, 2, 2)))]
    orgs = [_Entity(names.organisation(), "organisation") for _ in range(3 - len(people) if rng.random() < 0.5 else 1)]
    for person in people:
        job, colour = _distinct(rng, _JOBS, used), _distinct(rng, _COLOURS, used)
        person.values = {
            "birthplace": names.city(),
            "birth_year": str(years.pop()),
            "employer": orgs[0].name if rng.random() < 0.4 else names.organisation(),
            "job": job,
            "a_job": _article(job),
            "pet_colour": colour,
            "a_colour": _article(colour),
            "pet": _distinct(rng, _PETS, used),
        }
    for org in orgs:
        founder = people[0].name if rng.random() < 0.3 else names.person()
        org.values = {
            "founded": str(years.pop()),
            "founder": founder,
            "hq": names.city(),
            "employees": str(rng.randint(12, 9800)),
        }
    entities = people + orgs
    rng.shuffle(entities)
    return entities


def _short_ref(entity: _Entity) -> str:
    """How a person is referred to after the first mention: by surname (the organisations keep their full name)."""
    return entity.name.split()[-1] if entity.kind == "person" else entity.name


def _make_sentences(rng: random.Random, entities: list[_Entity], min_groups: int, max_groups: int) -> list[_Sentence]:
    """One sentence per fact group; each entity gets between `min_groups` and `max_groups` groups."""
    sentences = []
    for entity in entities:
        table = _PERSON_SENTENCES if entity.kind == "person" else _ORG_SENTENCES
        groups = rng.sample(sorted(table), k=min(rng.randint(min_groups, max_groups), len(table)))
        for i, group in enumerate(groups):
            ref = entity.name if i == 0 else _short_ref(entity)
            text, spans = _render(rng.choice(table[group]), {**entity.values, "ref": ref})
            sentences.append(_Sentence(text, spans, entity))
    return sentences


def _join(sentences: Sequence[_Sentence]) -> tuple[str, list[tuple[_Sentence, int]]]:
    """Join sentences with spaces; return the context and each sentence's offset."""
    context, offsets = "", []
    for sentence in sentences:
        if context:
            context += " "
        offsets.append((sentence, len(context)))
        context += sentence.text
    return context, offsets


@dataclass(frozen=True)
class _Fact:
    """One askable attribute value as stated in a context: `context[start : start + len(answer)] == answer`."""

    entity: _Entity
    slot: str
    start: int
    answer: str


def _context(rng: random.Random, entities: list[_Entity]) -> tuple[str, list[_Fact]]:
    """A paragraph about `entities` (3-6 sentences, 4.3 on average) and the facts it states."""
    min_groups = 2 if len(entities) == 2 else 1
    context, offsets = _join(_make_sentences(rng, entities, min_groups, max_groups=2))
    facts = []
    for sentence, offset in offsets:
        for slot, (start, end) in sentence.spans.items():
            if slot in _QUESTIONS:
                facts.append(_Fact(sentence.entity, slot, offset + start, context[offset + start : offset + end]))
    return context, facts


def _question(rng: random.Random, fact: _Fact) -> str:
    return rng.choice(_QUESTIONS[fact.slot]).format(name=fact.entity.name, pet=fact.entity.values.get("pet", ""))


def _paragraph(rng: random.Random, names: _Names, questions_per_paragraph: int, qid: str) -> dict[str, Any]:
    names.used.clear()
    context, facts = _context(rng, _make_entities(rng, names))
    qas = []
    for i, fact in enumerate(rng.sample(facts, min(questions_per_paragraph, len(facts)))):
        answers = [{"text": fact.answer, "answer_start": fact.start}]
        qas.append({"id": f"{qid}-{i}", "question": _question(rng, fact), "answers": answers})
    return {"context": context, "qas": qas}


def make_demo_squad(
    num_paragraphs: int,
    seed: int,
    name_pool: NamePool = "train",
    questions_per_paragraph: int = 4,
) -> dict[str, Any]:
    """Generate a SQuAD-v1.1-format dataset (``{"version", "data": [{"title", "paragraphs": [...]}]}``).

    Args:
        num_paragraphs: number of paragraphs (one article each).
        seed: random seed; the output is a pure function of the arguments.
        name_pool: ``"train"`` or ``"heldout"``; the two pools share no name word.
        questions_per_paragraph: questions asked about each paragraph (at most one per stated attribute).
    """
    if name_pool not in ("train", "heldout"):
        raise ValueError(f"name_pool must be 'train' or 'heldout', got {name_pool!r}")
    rng = random.Random(f"mixt5-demo-{name_pool}-{seed}")
    names = _Names(rng, name_pool)
    data = []
    for p in range(num_paragraphs):
        paragraph = _paragraph(rng, names, questions_per_paragraph, qid=f"{name_pool}-{seed}-{p:05d}")
        data.append({"title": f"Demo {name_pool} {p}", "paragraphs": [paragraph]})
    return {"version": "1.1", "data": data}


def write_demo_splits(
    out_dir: str | Path,
    num_train_paragraphs: int = 1500,
    num_validation_paragraphs: int = 100,
    seed: int = 0,
    questions_per_paragraph: int = 4,
) -> tuple[Path, Path]:
    """Write ``train.json`` (train names) and ``validation.json`` (held-out names) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.json", out / "validation.json"
    splits = (
        make_demo_squad(num_train_paragraphs, seed, "train", questions_per_paragraph),
        make_demo_squad(num_validation_paragraphs, seed, "heldout", questions_per_paragraph),
    )
    for path, split in zip(paths, splits, strict=True):
        path.write_text(json.dumps(split, indent=1) + "\n")
    return paths


def iter_examples(squad: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Flatten a SQuAD dict into ``{"id", "question", "context", "answers": [str, ...]}`` records."""
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                yield {"id": qa["id"], "question": qa["question"], "context": paragraph["context"], "answers": answers}


def most_frequent_answer(squad: Mapping[str, Any]) -> str:
    """The trivial baseline: the most frequent (first) answer of the training questions."""
    counts = Counter(example["answers"][0] for example in iter_examples(squad))
    return counts.most_common(1)[0][0]


@dataclass(frozen=True)
class PretrainingDocument:
    """A pre-training text and the character spans of values it repeats (recoverable by copying, if masked)."""

    text: str
    copy_spans: list[tuple[int, int]]


def pretraining_documents(num_documents: int, seed: int) -> Iterator[PretrainingDocument]:
    """Unlabelled text for the tokenizer and the denoising pre-training of the demo checkpoint (train names only).

    Each document is a paragraph like the QA contexts followed, FAQ-style, by one to three question-answer lines about
    it ("Where was Kalo Veradi born? Tumaburg.") and up to two statements repeating its facts in other words.
    `copy_spans` are the answers and repeated values after the paragraph: masked, they can be copied from it, which is
    the skill reading comprehension needs.
    """
    rng = random.Random(f"mixt5-demo-pretrain-{seed}")
    names = _Names(rng, "train")
    for _ in range(num_documents):
        names.used.clear()
        entities = _make_entities(rng, names)
        context, facts = _context(rng, entities)
        stated = {(f.entity.name, f.slot) for f in facts}
        lines = []
        for fact in rng.sample(facts, min(rng.randint(1, 3), len(facts))):
            question = _question(rng, fact)
            spans = {fact.slot: (len(question) + 1, len(question) + 1 + len(fact.answer))}
            lines.append(_Sentence(f"{question} {fact.answer}.", spans, fact.entity))
        lines += _make_sentences(rng, entities, min_groups=1, max_groups=1)[: rng.randint(0, 2)]
        rng.shuffle(lines)
        tail, offsets = _join(lines)
        copy_spans = []
        for sentence, offset in offsets:
            for slot, (start, end) in sentence.spans.items():
                if (sentence.entity.name, slot) in stated:
                    shift = len(context) + 1 + offset
                    copy_spans.append((shift + start, shift + end))
        yield PretrainingDocument(f"{context} {tail}", sorted(copy_spans))
