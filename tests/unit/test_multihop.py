"""Generated multi-hop knowledge base and questions: reproducible, exact, answerable from the documents' text."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from branchwise.errors import ConfigError
from branchwise.evals.multihop import (
    ATTRIBUTES,
    KnowledgeBase,
    MultiHopQuestion,
    extract_attribute,
    multihop_dataset,
    multihop_questions,
)
from branchwise.executors import load_documents


@pytest.fixture(scope="module")
def dataset() -> tuple[KnowledgeBase, list[MultiHopQuestion]]:
    return multihop_dataset(seed=1, n=200)


def test_reproducible_for_a_seed() -> None:
    first = multihop_questions(seed=5, n=30)
    assert first == multihop_questions(seed=5, n=30)
    assert first != multihop_questions(seed=6, n=30)
    assert KnowledgeBase.generate(5).documents() == KnowledgeBase.generate(5).documents()


def test_knowledge_base_shape(dataset: tuple[KnowledgeBase, list[MultiHopQuestion]]) -> None:
    kb, _ = dataset
    assert len(kb.entities) == 100
    assert collections.Counter(e.entity_type for e in kb.entities) == dict.fromkeys(
        ("city", "person", "company", "river", "mountain"), 20
    )
    assert len({e.name for e in kb.entities}) == 100
    assert len({d.id for d in kb.documents()}) == 100
    for key, spec in ATTRIBUTES.items():  # distinct values per type: superlatives have one answer
        values = [e.values[key] for e in kb.entities if e.entity_type == spec.entity_type]
        assert len(set(values)) == len(values)
        assert all(spec.low <= v < spec.high for v in values)


def test_documents_state_facts_among_distractors(dataset: tuple[KnowledgeBase, list[MultiHopQuestion]]) -> None:
    kb, _ = dataset
    for entity, doc in zip(kb.entities, kb.documents(), strict=True):
        assert doc.title == entity.name and doc.id == entity.doc_id
        numbers = {int(n) for n in re.findall(r"\b\d+\b", doc.text)}
        assert set(entity.values.values()) <= numbers
        assert numbers - set(entity.values.values()), "every document carries distractor numbers"
        for key, value in entity.values.items():
            assert extract_attribute(doc.text, entity.name, key) == value
    some = kb.entities[0]
    assert extract_attribute(kb.documents()[1].text, some.name, "city.founded") is None
    with pytest.raises(ConfigError, match="unknown attribute"):
        extract_attribute("", "x", "colour")


def test_questions_cover_kinds_and_hops(dataset: tuple[KnowledgeBase, list[MultiHopQuestion]]) -> None:
    kb, questions = dataset
    assert {q.kind for q in questions} == {"argmax", "argmin", "difference", "sum", "count", "range"}
    assert {q.hops for q in questions} == set(range(2, 9))
    assert len({q.id for q in questions}) == len(questions)
    for q in questions:
        assert q.hops == len(q.entities) == len(set(q.entities))
        assert all(name in q.question for name in q.entities)
        assert {kb.entity(name).entity_type for name in q.entities} == {ATTRIBUTES[q.attribute].entity_type}
        if q.kind == "difference":
            assert q.hops == 2 and int(q.answer) > 0
        if q.kind == "count":
            assert q.threshold is not None and str(q.threshold) in q.question
            assert 0 < int(q.answer) < q.hops  # thresholds split the entities
        if q.kind in ("argmax", "argmin"):
            assert q.answer_type == "entity" and q.answer in q.entities
        else:
            assert q.answer_type == "number" and q.answer.lstrip("-").isdigit()


def test_every_gold_answer_is_computable_from_the_documents(
    dataset: tuple[KnowledgeBase, list[MultiHopQuestion]], tmp_path: Path
) -> None:
    kb, questions = dataset
    by_title = {doc.title: doc for doc in load_documents(kb.write_corpus(tmp_path))}
    for q in questions:
        values = {}
        for name in q.entities:
            value = extract_attribute(by_title[name].text, name, q.attribute)
            assert value is not None
            values[name] = value
        assert q.compute(values) == q.answer, q.question
    with pytest.raises(ConfigError, match="no value"):
        questions[0].compute({})


def test_written_corpora_round_trip(tmp_path: Path) -> None:
    kb = KnowledgeBase.generate(2, n_entities=40)
    assert load_documents(kb.write_corpus(tmp_path / "dir")) == sorted(kb.documents(), key=lambda d: d.id)
    assert load_documents(kb.write_jsonl(tmp_path / "corpus.jsonl")) == kb.documents()


def test_hop_range_and_kind_filters() -> None:
    kb = KnowledgeBase.generate(0, n_entities=50)
    few = kb.questions(40, min_hops=2, max_hops=3)
    assert {q.hops for q in few} <= {2, 3}
    many = kb.questions(40, min_hops=6, max_hops=8)
    assert {q.hops for q in many} <= {6, 7, 8} and "difference" not in {q.kind for q in many}
    assert {q.kind for q in kb.questions(10, kinds=["sum"])} == {"sum"}
    assert kb.questions(5, seed=9) == kb.questions(5, seed=9) != kb.questions(5, seed=10)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="n_entities"):
        KnowledgeBase.generate(0, n_entities=10)
    with pytest.raises(ConfigError, match=r"n_entities must be in 40\.\.1000"):
        KnowledgeBase.generate(0, n_entities=1001)
    kb = KnowledgeBase.generate(0, n_entities=40)
    with pytest.raises(ConfigError, match="min_hops"):
        kb.questions(5, min_hops=1)
    with pytest.raises(ConfigError, match="min_hops"):
        kb.questions(5, max_hops=9)
    with pytest.raises(ConfigError, match="unknown question kinds"):
        kb.questions(5, kinds=["median"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="no question kind"):
        kb.questions(5, min_hops=4, max_hops=4, kinds=["difference"])
    with pytest.raises(ConfigError, match="n must be"):
        kb.questions(0)
    with pytest.raises(ConfigError, match="no entity"):
        kb.entity("Atlantis")
