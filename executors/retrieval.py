"""The ``retrieve`` tool: BM25 (bm25s) over a local document collection.

A corpus is a directory of ``.txt``/``.md`` files (searched recursively; the title is a leading ``# heading``,
else the file name), a JSONL file of ``{"id", "title", "text"}`` records, or a list of `Document`. Documents are
loaded and indexed once, lazily, on the first search (in the worker thread the tool runs in, never on the event
loop); concurrent first calls build the index once. Title and text are indexed together, lower-cased, with
English stop words removed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic

from ..errors import ConfigError, MissingDependencyError
from .registry import Tool

__all__ = ["BM25Retriever", "Document", "load_documents", "retrieve_tool"]

logger = logging.getLogger(__name__)

MAX_K = 50


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        id: unique identifier.
        title: title (may be empty).
        text: body text.
    """

    id: str
    title: str
    text: str


def _from_markdown(path: Path, root: Path) -> Document:
    raw = path.read_text(encoding="utf-8", errors="replace")
    lines = raw.strip().splitlines()
    title = path.stem
    if lines and lines[0].startswith("# "):
        title = lines[0][2:].strip()
        lines = lines[1:]
    doc_id = path.relative_to(root).with_suffix("").as_posix()
    return Document(id=doc_id, title=title, text="\n".join(lines).strip())


def _from_jsonl(path: Path) -> list[Document]:
    documents = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"corpus {path}: line {number} is not valid JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"corpus {path}: line {number} needs an object with a string 'text' field")
            documents.append(
                Document(
                    id=str(record.get("id", number)),
                    title=str(record.get("title") or ""),
                    text=record["text"],
                )
            )
    return documents


def load_documents(corpus: str | Path | Sequence[Document]) -> list[Document]:
    """Load a corpus (directory, JSONL file or list of documents).

    Raises:
        ConfigError: the path does not exist, a JSONL line is invalid, ids repeat, or there are no documents.
    """
    if isinstance(corpus, str | Path):
        path = Path(corpus).expanduser()
        if not path.exists():
            raise ConfigError(f"corpus {str(path)!r} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in {".txt", ".md"})
            documents = [_from_markdown(p, path) for p in files]
        elif path.suffix.lower() in {".jsonl", ".json"}:
            documents = _from_jsonl(path)
        else:
            raise ConfigError(f"corpus {str(path)!r} must be a directory of .txt/.md files or a .jsonl file")
        where = repr(str(path))
    else:
        documents = list(corpus)
        for item in documents:
            if not isinstance(item, Document):
                raise ConfigError(f"corpus entries must be Document objects, got {type(item).__name__}")
        where = "(list)"
    if not documents:
        raise ConfigError(f"corpus {where} has no documents")
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise ConfigError(f"corpus {where}: duplicate document id {doc.id!r}")
        seen.add(doc.id)
    return documents


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    tokens: list[list[str]] = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    return tokens


class BM25Retriever:
    """A lazily built BM25 index over a corpus. Thread-safe; `search` is synchronous (CPU-bound).

    Args:
        corpus: a directory, a JSONL file or a list of `Document`.

    Raises:
        ConfigError: a corpus path that does not exist (checked now; the rest is checked on first use).
        MissingDependencyError: bm25s is not installed.
    """

    def __init__(self, corpus: str | Path | Sequence[Document]) -> None:
        if importlib.util.find_spec("bm25s") is None:
            raise MissingDependencyError("the retrieve tool", "bm25s", "pip install 'branchwise[retrieval]'")
        if isinstance(corpus, str | Path) and not Path(corpus).expanduser().exists():
            raise ConfigError(f"corpus {str(corpus)!r} does not exist")
        self._source = corpus
        self._lock = threading.Lock()
        self._documents: list[Document] | None = None
        self._index: Any = None

    @property
    def documents(self) -> list[Document]:
        """The loaded documents (loads and indexes on first access)."""
        self._ensure_index()
        assert self._documents is not None
        return self._documents

    def _ensure_index(self) -> None:
        if self._index is not None:
            return
        with self._lock:
            if self._index is not None:
                return
            import bm25s

            documents = load_documents(self._source)
            tokens = _tokenize([f"{doc.title}\n{doc.text}" for doc in documents])
            index = bm25s.BM25()
            index.index(tokens, show_progress=False)
            self._documents = documents
            self._index = index
            logger.info("retrieve: indexed %d documents", len(documents))

    def search(self, query: str, k: int = 3) -> list[dict[str, Any]]:
        """The top-``k`` documents for ``query``, best first, as dicts with id, title, text and score.

        Documents that share no term with the query are not returned, so fewer than ``k`` may come back.
        """
        import numpy as np

        self._ensure_index()
        assert self._documents is not None
        query_tokens = _tokenize([query])[0]
        if not query_tokens:
            return []
        scores = np.asarray(self._index.get_scores(query_tokens), dtype=float)
        k = min(k, len(scores))
        # stable order for ties: by score, then corpus order
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        results = []
        for i in order:
            if scores[i] <= 0:
                break
            doc = self._documents[int(i)]
            results.append({"id": doc.id, "title": doc.title, "text": doc.text, "score": round(float(scores[i]), 4)})
        return results


def retrieve_tool(corpus: str | Path | Sequence[Document] | BM25Retriever) -> Tool:
    """A `Tool` named ``retrieve`` searching ``corpus`` with BM25."""
    retriever = corpus if isinstance(corpus, BM25Retriever) else BM25Retriever(corpus)

    def retrieve(query: str, k: Annotated[int, pydantic.Field(ge=1, le=MAX_K)] = 3) -> list[dict[str, Any]]:
        """Search the local document collection (BM25) and return the k best documents (id, title, text, score).

        Args:
            query: search words, e.g. an entity name.
            k: how many documents to return.
        """
        return retriever.search(query, k)

    return Tool(retrieve)
