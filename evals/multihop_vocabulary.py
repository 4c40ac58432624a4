"""The vocabulary of the generated multi-hop knowledge base: entity types, their numeric attributes (how each is
stated in a document and asked about), and the syllables and words fictional names and distractors are made of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ATTRIBUTES",
    "CODAS",
    "COMPANY_KINDS",
    "ENTITY_TYPES",
    "FIRST_NAMES",
    "ONSETS",
    "PROFESSIONS",
    "REGIONS",
    "SUFFIXES",
    "TYPE_WORDS",
    "VOWELS",
    "Attribute",
    "EntityType",
]

EntityType = Literal["city", "person", "company", "river", "mountain"]

ENTITY_TYPES: tuple[EntityType, ...] = ("city", "person", "company", "river", "mountain")


@dataclass(frozen=True)
class Attribute:
    """A numeric attribute of one entity type and how it is written and asked about.

    Attributes:
        key: identifier, unique across types (e.g. ``city.founded``).
        entity_type: the type of entity that has it.
        label: a noun phrase ("founding year").
        fact: the sentence stating it, with ``{name}`` and ``{value}`` slots.
        low: smallest value (inclusive).
        high: largest value (exclusive).
        is_year: values are calendar years (phrasing of comparisons).
        argmax: question asking which entity has the largest value (``{names}`` = "A, B or C").
        argmin: question asking which entity has the smallest value.
        difference: question for ``value(A) - value(B)`` (A has the larger value).
        count: question counting entities below ``{threshold}`` (``{names}`` = "A, B and C").
        total: question for the sum of the values, or empty when a sum is meaningless (years).
    """

    key: str
    entity_type: EntityType
    label: str
    fact: str
    low: int
    high: int
    is_year: bool
    argmax: str
    argmin: str
    difference: str
    count: str
    total: str = ""


ATTRIBUTES: dict[str, Attribute] = {
    a.key: a
    for a in (
        Attribute(
            "city.founded",
            "city",
            "founding year",
            "{name} was founded in {value}.",
            1100,
            1950,
            True,
            "Which of {names} was founded most recently?",
            "Which of {names} was founded first?",
            "How many years earlier was {b} founded than {a}?",
            "How many of {names} were founded before {threshold}?",
        ),
        Attribute(
            "city.population",
            "city",
            "population",
            "{name} has a population of {value}.",
            5000,
            2_000_000,
            False,
            "Which of {names} has the largest population?",
            "Which of {names} has the smallest population?",
            "How many more inhabitants does {a} have than {b}?",
            "How many of {names} have a population below {threshold}?",
            "What is the combined population of {names}?",
        ),
        Attribute(
            "city.elevation",
            "city",
            "elevation in metres",
            "{name} lies at an elevation of {value} metres.",
            2,
            2500,
            False,
            "Which of {names} lies at the highest elevation?",
            "Which of {names} lies at the lowest elevation?",
            "How many metres higher does {a} lie than {b}?",
            "How many of {names} lie below {threshold} metres?",
        ),
        Attribute(
            "person.born",
            "person",
            "birth year",
            "{name} was born in {value}.",
            1800,
            2000,
            True,
            "Who was born last: {names}?",
            "Who was born first: {names}?",
            "How many years older is {b} than {a}?",
            "How many of {names} were born before {threshold}?",
        ),
        Attribute(
            "company.founded",
            "company",
            "founding year",
            "{name} was established in {value}.",
            1800,
            2016,
            True,
            "Which of {names} was established most recently?",
            "Which of {names} was established first?",
            "How many years earlier was {b} established than {a}?",
            "How many of {names} were established before {threshold}?",
        ),
        Attribute(
            "company.employees",
            "company",
            "number of employees",
            "{name} employs {value} people.",
            40,
            250_000,
            False,
            "Which of {names} employs the most people?",
            "Which of {names} employs the fewest people?",
            "How many more people does {a} employ than {b}?",
            "How many of {names} employ fewer than {threshold} people?",
            "How many people do {names} employ in total?",
        ),
        Attribute(
            "river.length",
            "river",
            "length in kilometres",
            "The {name} is {value} kilometres long.",
            30,
            4000,
            False,
            "Which is the longest river: {names}?",
            "Which is the shortest river: {names}?",
            "How many kilometres longer is the {a} than the {b}?",
            "How many of {names} are shorter than {threshold} kilometres?",
            "What is the total length in kilometres of {names}?",
        ),
        Attribute(
            "mountain.height",
            "mountain",
            "height in metres",
            "{name} rises to a height of {value} metres.",
            900,
            8200,
            False,
            "Which is the highest mountain: {names}?",
            "Which is the lowest mountain: {names}?",
            "How many metres higher is {a} than {b}?",
            "How many of {names} are lower than {threshold} metres?",
        ),
        Attribute(
            "mountain.first_ascent",
            "mountain",
            "year of first ascent",
            "{name} was first climbed in {value}.",
            1780,
            1995,
            True,
            "Which of {names} was first climbed most recently?",
            "Which of {names} was climbed first?",
            "How many years earlier was {b} first climbed than {a}?",
            "How many of {names} were first climbed before {threshold}?",
        ),
    )
}

ONSETS = ("b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th", "sh", "qu",
           "f", "h", "j", "w", "pl", "tr")  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y", "ia")
CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "sk")
SUFFIXES = {
    "city": ("ia", "mark", "grad", "holm", "ford", "heim", "burg", "ora", "ene", "wick"),
    "person": ("ek", "ov", "ard", "ien", "sen", "ani", "orn", "esk"),
    "company": ("ex", "on", "ix", "ara", "eon", "ium"),
    "river": ("ane", "ess", "wyn", "ode", "ire"),
    "mountain": ("var", "horn", "dor", "kul", "ash"),
}
FIRST_NAMES = ("Orsolya", "Bertil", "Ximena", "Tadeusz", "Ilka", "Radomir", "Selvi", "Oskarine", "Jorunn",
                "Emerik", "Liesa", "Vasko", "Amarante", "Teodric", "Ysolde", "Kasimir", "Mireille", "Dragan",
                "Sunniva", "Leopold", "Ottilie", "Bohdan", "Valeska", "Anselm", "Perpetua", "Ivar", "Zdenka",
                "Casimira", "Ulrich", "Henrike")  # fmt: skip
COMPANY_KINDS = ("Analytics", "Shipping", "Foods", "Dynamics", "Textiles", "Optics", "Ceramics", "Robotics",
                  "Pharmaceuticals", "Instruments")  # fmt: skip
REGIONS = ("the Northern Reach", "the Lowmarch", "Eastvale", "the Coastlands", "the High Plateau", "Westmoor")
PROFESSIONS = ("painter", "chemist", "novelist", "architect", "composer", "engineer", "botanist", "cartographer")
TYPE_WORDS = {"city": "a city", "person": "a", "company": "a company", "river": "a river", "mountain": "a mountain"}
