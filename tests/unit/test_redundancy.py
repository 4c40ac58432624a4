"""Redundancy judges and greedy clustering: the properties prune relies on."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from branchwise.errors import ConfigError, UnknownNameError
from branchwise.verifiers import QAGrader
from branchwise.verifiers.extraction import AnswerExtractor
from branchwise.verifiers.redundancy import (
    AnswerRedundancy,
    EmbeddingRedundancy,
    LexicalRedundancy,
    RedundancyJudge,
    get_redundancy_judge,
    greedy_clusters,
)

words = st.lists(st.sampled_from(["so", "the", "total", "is", "12", "13", "apples", "then", "we", "add"]), max_size=12)
texts = st.lists(words.map(" ".join), min_size=0, max_size=8)


def jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def shingles(text: str, k: int) -> set[tuple[str, ...]]:
    tokens = text.lower().split()
    if len(tokens) < k:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}


@given(batch=texts, ngram=st.integers(1, 3))
def test_lexical_similarity_is_the_jaccard_of_word_ngrams(batch: list[str], ngram: int) -> None:
    sims = asyncio.run(LexicalRedundancy(ngram=ngram, threshold=0.5).similarity_matrix(batch))
    for i, j in itertools.product(range(len(batch)), repeat=2):
        expected = 1.0 if i == j else jaccard(shingles(batch[i], ngram), shingles(batch[j], ngram))
        assert sims[i][j] == pytest.approx(expected)
        assert sims[i][j] == sims[j][i] and 0.0 <= sims[i][j] <= 1.0


@given(batch=texts, threshold=st.sampled_from([0.3, 0.5, 0.8, 1.0]))
def test_greedy_clusters_partition_the_traces_around_their_earliest_member(batch: list[str], threshold: float) -> None:
    judge = LexicalRedundancy(ngram=1, threshold=threshold)
    clusters = asyncio.run(greedy_clusters(judge, batch))
    sims = asyncio.run(judge.similarity_matrix(batch)) if batch else []
    assert sorted(i for c in clusters for i in c) == list(range(len(batch)))  # every trace, exactly once
    for cluster in clusters:
        rep = cluster[0]
        assert cluster == sorted(cluster)  # the representative is the earliest trace of its cluster
        assert all(sims[rep][i] >= threshold for i in cluster[1:])  # every other member duplicates it
    reps = [c[0] for c in clusters]
    for a, b in itertools.combinations(reps, 2):
        assert sims[a][b] < threshold  # a trace starts a cluster only when it duplicates no earlier representative


async def test_answer_redundancy_compares_current_answers_with_the_grader() -> None:
    numeric = AnswerRedundancy()
    assert await numeric.redundant("so far 12 apples", "we have 12.0 now")  # latest numbers agree
    assert await numeric.redundant("The answer is 1/2.", "halfway: 0.5")
    assert not await numeric.redundant("so far 12", "so far 13")
    assert not await numeric.redundant("no numbers yet", "none here either")  # no answer: never redundant
    qa = AnswerRedundancy(grader=QAGrader(), extractor=AnswerExtractor(rules=("answer_is",)))
    assert await qa.redundant("The answer is the Eiffel Tower.", "So the answer is Eiffel tower.")
    assert not await qa.redundant("The answer is Paris.", "The answer is Rome.")
    sims = await numeric.similarity_matrix(["x = 5", "y = 7", "so 5"])
    assert sims == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


async def test_judges_by_name_and_their_validation(tmp_path: object) -> None:
    assert isinstance(get_redundancy_judge("answer"), AnswerRedundancy)
    assert get_redundancy_judge("lexical", ngram=2, threshold=0.7).threshold == 0.7
    with pytest.raises(UnknownNameError, match="lexical"):
        get_redundancy_judge("lexicon")
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ConfigError, match="threshold"):
            LexicalRedundancy(threshold=bad)
    with pytest.raises(ConfigError, match="ngram"):
        LexicalRedundancy(ngram=0)
    with pytest.raises(ConfigError, match="not a local model folder"):
        EmbeddingRedundancy(model="/no/such/model")


async def test_any_judge_subclass_clusters_through_its_matrix() -> None:
    class FirstLetter(RedundancyJudge):
        name = "first_letter"

        async def similarity_matrix(self, texts: list[str]) -> list[list[float]]:  # type: ignore[override]
            return [[1.0 if a[:1] == b[:1] else 0.0 for b in texts] for a in texts]

    clusters = await greedy_clusters(FirstLetter(threshold=1.0), ["apple", "bean", "avocado", "beet", "corn"])
    assert clusters == [[0, 2], [1, 3], [4]]
    assert await greedy_clusters(FirstLetter(threshold=1.0), []) == []
