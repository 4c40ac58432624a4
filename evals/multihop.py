"""Generated multi-hop comparison questions over a fictional knowledge base: seeded, reproducible, exact answers.

A `KnowledgeBase` holds fictional cities, people, companies, rivers and mountains with integer attributes
(founding year, population, birth year, length, height...). Each entity becomes one short encyclopedia-style
`Document` stating its attributes in fixed sentences (``"Valdoria was founded in 1743."``), mixed with
distractor sentences that carry other numbers and mention other entities. Names are built from syllables so
every entity has a distinctive token: BM25 with the entity's name as the query finds its document first.

Questions need 2-8 independent lookups (one per entity, the ``hops``) followed by one comparison or aggregation:

- ``argmax`` / ``argmin``: "Which of A, B and C was founded first?" (answer: an entity name);
- ``difference`` (2 hops): "How many years older is X than Y?";
- ``sum``: "What is the combined population of A, B and C?";
- ``count``: "How many of A, B, C and D were founded before 1850?";
- ``range``: "What is the difference between the largest and the smallest population among A, B and C?".

Each `MultiHopQuestion` carries its gold answer, the entity names and the attribute it needs (so an oracle
planner can build the ideal DAG: one ``retrieve(name)`` per entity, then a join), and `MultiHopQuestion.compute`
derives the answer from looked-up values; `extract_attribute` reads a value back from a document's text.
Attribute values are distinct within an entity type, so superlatives have one answer.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from ..executors.retrieval import Document
from .multihop_vocabulary import (
    ATTRIBUTES,
    CODAS,
    COMPANY_KINDS,
    ENTITY_TYPES,
    FIRST_NAMES,
    ONSETS,
    PROFESSIONS,
    REGIONS,
    SUFFIXES,
    VOWELS,
    Attribute,
    EntityType,
)

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Entity",
    "KnowledgeBase",
    "MultiHopQuestion",
    "extract_attribute",
    "multihop_dataset",
    "multihop_questions",
]

QuestionKind = Literal["argmax", "argmin", "difference", "sum", "count", "range"]


@dataclass(frozen=True)
class Entity:
    """One fictional entity.

    Attributes:
        name: its full name (e.g. "Valdoria", "Orsolya Thrandek", "Mount Keldravar").
        entity_type: city, person, company, river or mountain.
        doc_id: id of its document.
        values: attribute key -> integer value.
    """

    name: str
    entity_type: EntityType
    doc_id: str
    values: Mapping[str, int]


@dataclass(frozen=True)
class MultiHopQuestion:
    """A comparison or aggregation question over several entities.

    Attributes:
        id: stable identifier (``multihop-<seed>-<index>``).
        question: the question text.
        answer: the exact gold answer: an entity name (argmax/argmin) or an integer as a string.
        entities: the entity names to look up, one lookup each (for ``difference``: the larger value first).
        attribute: the attribute key needed from each entity (see `ATTRIBUTES`).
        kind: argmax, argmin, difference, sum, count or range.
        hops: number of independent lookups (``len(entities)``).
        threshold: the threshold of a ``count`` question, else ``None``.
    """

    id: str
    question: str
    answer: str
    entities: tuple[str, ...]
    attribute: str
    kind: QuestionKind
    hops: int
    threshold: int | None = None
    answer_type: Literal["entity", "number"] = field(default="number")

    def compute(self, values: Mapping[str, int]) -> str:
        """The answer given each entity's attribute value (what a perfect reader would conclude).

        Raises:
            ConfigError: a value for one of the entities is missing.
        """
        missing = [name for name in self.entities if name not in values]
        if missing:
            raise ConfigError(f"question {self.id}: no value for {', '.join(missing)}")
        numbers = [values[name] for name in self.entities]
        if self.kind == "argmax":
            return self.entities[numbers.index(max(numbers))]
        if self.kind == "argmin":
            return self.entities[numbers.index(min(numbers))]
        if self.kind == "difference":
            return str(numbers[0] - numbers[1])
        if self.kind == "sum":
            return str(sum(numbers))
        if self.kind == "count":
            assert self.threshold is not None
            return str(sum(1 for v in numbers if v < self.threshold))
        return str(max(numbers) - min(numbers))


def extract_attribute(text: str, name: str, attribute: str) -> int | None:
    """Read ``attribute`` of entity ``name`` from a document's text (its fixed fact sentence), or ``None``.

    Raises:
        ConfigError: an unknown attribute key.
    """
    spec = ATTRIBUTES.get(attribute)
    if spec is None:
        raise ConfigError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")
    pattern = re.escape(spec.fact.format(name=name, value="\0")).replace("\\\0", "\0").replace("\0", r"(\d+)")
    match = re.search(pattern, text)
    return int(match.group(1)) if match else None


def _round_number_between(lower: int, upper: int, rng: random.Random) -> int:
    """A random number in [lower, upper], as round as possible (a multiple of the largest power of ten that fits)."""
    step = 10 ** len(str(max(upper, 1)))
    while step > 1:
        first = -(-lower // step) * step
        if first <= upper:
            return rng.choice(range(first, upper + 1, step))
        step //= 10
    return rng.randint(lower, upper)


def _join(names: Sequence[str], word: str) -> str:
    if len(names) == 2:
        return f"{names[0]} {word} {names[1]}"
    return f"{', '.join(names[:-1])} {word} {names[-1]}"


class _NameMaker:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = {n.lower() for n in FIRST_NAMES}

    def core(self, entity_type: EntityType) -> str:
        for _ in range(10_000):
            syllables = [
                self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                for _ in range(self.rng.randint(1, 2))
            ]
            word = ("".join(syllables) + self.rng.choice(SUFFIXES[entity_type])).capitalize()
            if len(word) >= 5 and word.lower() not in self.used:
                self.used.add(word.lower())
                return word
        raise ConfigError("could not generate enough distinct names; lower n_entities")


@dataclass(frozen=True)
class KnowledgeBase:
    """A generated set of entities and their documents.

    Attributes:
        seed: the generation seed.
        entities: every entity, grouped by type in `ENTITY_TYPES` order.
    """

    seed: int
    entities: tuple[Entity, ...]
    _documents: tuple[Document, ...] = field(repr=False, default=())

    @classmethod
    def generate(cls, seed: int = 0, n_entities: int = 100) -> KnowledgeBase:
        """Generate a knowledge base of ``n_entities`` (spread evenly over the five types, at least 8 each).

        Raises:
            ConfigError: fewer than 40 entities, or more than the attribute ranges can keep distinct (1000).
        """
        # Values are distinct within a type, so the narrowest attribute range bounds the entities per type.
        most = len(ENTITY_TYPES) * min(spec.high - spec.low for spec in ATTRIBUTES.values())
        if not 40 <= n_entities <= most:
            raise ConfigError(
                f"n_entities must be in 40..{most} (8 per type for 8-hop questions; distinct values), got {n_entities}"
            )
        rng = random.Random(seed)
        names = _NameMaker(rng)
        per_type = {t: n_entities // len(ENTITY_TYPES) + (1 if i < n_entities % len(ENTITY_TYPES) else 0)
                    for i, t in enumerate(ENTITY_TYPES)}  # fmt: skip
        entities: list[Entity] = []
        for entity_type in ENTITY_TYPES:
            count = per_type[entity_type]
            columns = {
                key: rng.sample(range(spec.low, spec.high), count)
                for key, spec in ATTRIBUTES.items()
                if spec.entity_type == entity_type
            }
            for index in range(count):
                core = names.core(entity_type)
                if entity_type == "person":
                    name = f"{FIRST_NAMES[index % len(FIRST_NAMES)]} {core}"
                elif entity_type == "company":
                    name = f"{core} {rng.choice(COMPANY_KINDS)}"
                elif entity_type == "river":
                    name = f"{core} River"
                elif entity_type == "mountain":
                    name = f"Mount {core}"
                else:
                    name = core
                values = {key: column[index] for key, column in columns.items()}
                entities.append(Entity(name, entity_type, f"{entity_type}-{core.lower()}", values))
        kb = cls(seed=seed, entities=tuple(entities))
        documents = tuple(kb._render(entity, random.Random(f"{seed}:{entity.doc_id}")) for entity in entities)
        object.__setattr__(kb, "_documents", documents)
        return kb

    def _of_type(self, entity_type: EntityType) -> list[Entity]:
        return [e for e in self.entities if e.entity_type == entity_type]

    def _render(self, entity: Entity, rng: random.Random) -> Document:
        name = entity.name
        others = {t: [e.name for e in self._of_type(t) if e.name != name] for t in ENTITY_TYPES}
        region = rng.choice(REGIONS)

        def year() -> int:  # distractor years in the same range as the facts
            return rng.randint(1750, 2020)

        if entity.entity_type == "city":
            intro = f"{name} is a city in {region}."
            distractors = [
                f"Its old harbour was rebuilt in {year()}.",
                f"A great fire swept through its old town in {year()}.",
                f"The {rng.choice(PROFESSIONS)} {rng.choice(others['person'])} lived here for many years.",
                f"Its annual lantern festival draws about {rng.randint(2000, 90000)} visitors.",
                f"It is twinned with {rng.choice(others['city'])}.",
            ]
        elif entity.entity_type == "person":
            profession = rng.choice(PROFESSIONS)
            intro = f"{name} is a {profession} from {rng.choice(others['city'])}."
            surname = name.split()[-1]
            distractors = [
                f"In {year()} {surname} moved to {rng.choice(others['city'])}.",
                f"{surname} published {rng.randint(3, 40)} works over a long career.",
                f"{surname} worked for {rng.choice(others['company'])} for {rng.randint(2, 30)} years.",
                f"A retrospective of {surname}'s work opened in {year()}.",
            ]
        elif entity.entity_type == "company":
            intro = f"{name} is a company headquartered in {rng.choice(others['city'])}."
            distractors = [
                f"In {year()} it opened its first factory.",
                f"Its annual report lists {rng.randint(100, 50000)} shareholders.",
                f"Its chief executive is {rng.choice(others['person'])}.",
                f"It was listed on the stock exchange in {year()}.",
            ]
        elif entity.entity_type == "river":
            intro = f"The {name} is a river in {region}."
            distractors = [
                f"It rises in the hills above {rng.choice(others['city'])}.",
                f"It has {rng.randint(2, 60)} named tributaries.",
                f"The first bridge across it was completed in {year()}.",
                f"Its basin covers about {rng.randint(500, 90000)} square kilometres.",
            ]
        else:
            intro = f"{name} is a mountain in {region}."
            distractors = [
                f"It stands {rng.randint(10, 400)} kilometres from {rng.choice(others['city'])}.",
                f"A weather station was built on its slopes in {year()}.",
                f"Its glacier has retreated by {rng.randint(50, 2500)} metres since records began.",
                f"The {rng.choice(PROFESSIONS)} {rng.choice(others['person'])} painted it many times.",
            ]
        facts = [ATTRIBUTES[key].fact.format(name=name, value=value) for key, value in entity.values.items()]
        chosen = rng.sample(distractors, k=min(3, len(distractors)))
        body = facts + chosen
        rng.shuffle(body)
        return Document(id=entity.doc_id, title=name, text=" ".join([intro, *body]))

    def documents(self) -> list[Document]:
        """One document per entity, in entity order."""
        return list(self._documents)

    def entity(self, name: str) -> Entity:
        """The entity called ``name``.

        Raises:
            ConfigError: no such entity.
        """
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise ConfigError(f"no entity named {name!r} in this knowledge base")

    def write_corpus(self, directory: str | Path) -> Path:
        """Write one Markdown file per document (``# Title`` then the text) into ``directory``; return it.

        The directory loads back into the same documents with `branchwise.executors.load_documents`.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for doc in self._documents:
            (path / f"{doc.id}.md").write_text(f"# {doc.title}\n\n{doc.text}\n", encoding="utf-8")
        return path

    def write_jsonl(self, path: str | Path) -> Path:
        """Write the documents as JSONL records ``{"id", "title", "text"}``; return the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8") as handle:
            for doc in self._documents:
                handle.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
        return target

    def questions(
        self,
        n: int = 20,
        *,
        seed: int | None = None,
        min_hops: int = 2,
        max_hops: int = 8,
        kinds: Sequence[QuestionKind] | None = None,
    ) -> list[MultiHopQuestion]:
        """Generate ``n`` questions with ``min_hops``..``max_hops`` lookups each.

        Args:
            n: number of questions.
            seed: question seed (default: the knowledge base's seed).
            min_hops: fewest entities per question (>= 2).
            max_hops: most entities per question (<= 8, and no more than entities per type).
            kinds: restrict to these question kinds (default: all that fit the hop range).

        Raises:
            ConfigError: an invalid count, hop range or kind.
        """
        per_type_min = min(len(self._of_type(t)) for t in ENTITY_TYPES)
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if not 2 <= min_hops <= max_hops <= min(8, per_type_min):
            raise ConfigError(f"need 2 <= min_hops <= max_hops <= {min(8, per_type_min)}, got {min_hops}..{max_hops}")
        all_kinds: tuple[QuestionKind, ...] = ("argmax", "argmin", "difference", "sum", "count", "range")
        wanted = tuple(kinds) if kinds is not None else all_kinds
        unknown = [k for k in wanted if k not in all_kinds]
        if unknown or not wanted:
            raise ConfigError(f"unknown question kinds {unknown}; known: {', '.join(all_kinds)}")
        hop_ranges: dict[QuestionKind, tuple[int, int]] = {
            "argmax": (2, 8), "argmin": (2, 8), "difference": (2, 2), "sum": (2, 5), "count": (3, 8),
            "range": (3, 8),
        }  # fmt: skip
        usable = [k for k in wanted if max(min_hops, hop_ranges[k][0]) <= min(max_hops, hop_ranges[k][1])]
        if not usable:
            raise ConfigError(f"no question kind among {list(wanted)} fits {min_hops}..{max_hops} hops")
        rng = random.Random(self.seed * 1_000_003 + 17 if seed is None else seed)
        base = self.seed if seed is None else seed
        out = []
        for index in range(n):
            kind = usable[index % len(usable)] if index < len(usable) else rng.choice(usable)
            low, high = max(min_hops, hop_ranges[kind][0]), min(max_hops, hop_ranges[kind][1])
            hops = rng.randint(low, high)
            keys = [k for k, spec in ATTRIBUTES.items() if kind != "sum" or spec.total]
            attribute = ATTRIBUTES[rng.choice(keys)]
            chosen = rng.sample(self._of_type(attribute.entity_type), hops)
            out.append(self._question(f"multihop-{base}-{index}", kind, attribute, chosen, rng))
        return out

    def _question(
        self, qid: str, kind: QuestionKind, attribute: Attribute, chosen: list[Entity], rng: random.Random
    ) -> MultiHopQuestion:
        key = attribute.key
        threshold = None
        if kind == "difference":
            chosen.sort(key=lambda e: e.values[key], reverse=True)  # a has the larger value: a positive answer
            a, b = chosen[0].name, chosen[1].name
            text = attribute.difference.format(a=a, b=b)
        else:
            names = [e.name for e in chosen]
            if kind in ("argmax", "argmin"):
                text = getattr(attribute, kind).format(names=_join(names, "or"))
            elif kind == "sum":
                text = attribute.total.format(names=_join(names, "and"))
            elif kind == "count":
                ordered = sorted(e.values[key] for e in chosen)
                cut = rng.randint(1, len(ordered) - 1)  # how many values fall below the threshold ("below" is strict)
                lower, upper = ordered[cut - 1] + 1, ordered[cut]
                threshold = _round_number_between(lower, upper, rng)
                text = attribute.count.format(names=_join(names, "and"), threshold=threshold)
            else:
                text = (
                    f"What is the difference between the largest and the smallest {attribute.label} among "
                    f"{_join(names, 'and')}?"
                )
        question = MultiHopQuestion(
            id=qid,
            question=text,
            answer="",
            entities=tuple(e.name for e in chosen),
            attribute=key,
            kind=kind,
            hops=len(chosen),
            threshold=threshold,
            answer_type="entity" if kind in ("argmax", "argmin") else "number",
        )
        answer = question.compute({e.name: e.values[key] for e in chosen})
        return MultiHopQuestion(**{**question.__dict__, "answer": answer})


def multihop_questions(
    seed: int = 0, n: int = 20, *, min_hops: int = 2, max_hops: int = 8, n_entities: int = 100
) -> list[MultiHopQuestion]:
    """``n`` questions over ``KnowledgeBase.generate(seed, n_entities)`` (rebuild the KB with the same arguments).

    Raises:
        ConfigError: invalid arguments (see `KnowledgeBase.questions`).
    """
    return KnowledgeBase.generate(seed, n_entities).questions(n, min_hops=min_hops, max_hops=max_hops)


def multihop_dataset(
    seed: int = 0, n: int = 20, *, min_hops: int = 2, max_hops: int = 8, n_entities: int = 100
) -> tuple[KnowledgeBase, list[MultiHopQuestion]]:
    """The knowledge base and ``n`` questions over it (same as `multihop_questions`, plus the KB)."""
    kb = KnowledgeBase.generate(seed, n_entities)
    return kb, kb.questions(n, min_hops=min_hops, max_hops=max_hops)
