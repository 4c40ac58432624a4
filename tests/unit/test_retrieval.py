"""retrieve: corpus loading (directory, JSONL, documents), clear errors, BM25 ranking, lazy one-time indexing,
and rank-1 lookups of every entity of the generated multi-hop corpus."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from branchwise.errors import ConfigError, ToolArgumentError
from branchwise.evals.multihop import KnowledgeBase
from branchwise.executors import BM25Retriever, Document, load_documents, retrieve_tool

DOCS = [
    Document("rivers", "Rivers of Valdoria", "The Ulvane River flows through Valdoria and is 812 kilometres long."),
    Document("bread", "Baking bread", "Flour, water, salt and yeast make a simple bread dough."),
    Document("cats", "Domestic cats", "Cats sleep for most of the day and hunt at dusk."),
    Document("valdoria", "Valdoria", "Valdoria is a city. Valdoria was founded in 1743. Valdoria has a harbour."),
]


def test_load_directory_jsonl_and_documents(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Alpha title\n\nAlpha body.\n")
    (tmp_path / "sub" / "b.txt").write_text("Beta body without a heading.")
    (tmp_path / "ignored.pdf").write_text("not a text file")
    docs = load_documents(tmp_path)
    assert docs == [Document("a", "Alpha title", "Alpha body."), Document("sub/b", "b", "Beta body without a heading.")]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        json.dumps({"id": "x", "title": "X", "text": "ex"}) + "\n\n" + json.dumps({"text": "no id"}) + "\n"
    )
    assert load_documents(jsonl) == [Document("x", "X", "ex"), Document("3", "", "no id")]
    assert load_documents(DOCS) == DOCS


def test_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_documents(tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        BM25Retriever(tmp_path / "nope")  # checked at construction, before any search
    with pytest.raises(ConfigError, match="no documents"):
        load_documents(tmp_path)
    with pytest.raises(ConfigError, match="no documents"):
        load_documents([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        load_documents(bad)
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(ConfigError, match="line 1 needs an object with a string 'text'"):
        load_documents(bad)
    with pytest.raises(ConfigError, match="duplicate document id 'a'"):
        load_documents([Document("a", "", "x"), Document("a", "", "y")])
    other = tmp_path / "corpus.csv"
    other.write_text("a,b")
    with pytest.raises(ConfigError, match=r"directory of \.txt/\.md files or a \.jsonl file"):
        load_documents(other)
    with pytest.raises(ConfigError, match="Document objects"):
        load_documents(["plain string"])  # type: ignore[list-item]


def test_search_ranks_and_scores() -> None:
    retriever = BM25Retriever(DOCS)
    top = retriever.search("Valdoria", k=2)
    assert [hit["id"] for hit in top] == ["valdoria", "rivers"]
    assert top[0]["score"] > top[1]["score"] > 0
    assert set(top[0]) == {"id", "title", "text", "score"}
    assert retriever.search("bread dough", k=1)[0]["title"] == "Baking bread"
    assert retriever.search("quantum chromodynamics") == []  # nothing shares a term: nothing is returned
    assert retriever.search("the and of") == []  # stop words only
    assert len(retriever.search("Valdoria", k=50)) == 2  # only documents that match


def test_index_is_built_lazily_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import bm25s

    calls = []
    real_index = bm25s.BM25.index

    def counting(self: bm25s.BM25, *args: object, **kwargs: object) -> object:
        calls.append(threading.get_ident())
        return real_index(self, *args, **kwargs)

    monkeypatch.setattr(bm25s.BM25, "index", counting)
    retriever = BM25Retriever(DOCS)
    assert calls == []
    barrier = threading.Barrier(4)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(retriever.search("cats")[0]["id"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["cats"] * 4
    assert len(calls) == 1


async def test_retrieve_tool_off_the_event_loop() -> None:
    t = retrieve_tool(DOCS)
    hits = await t.call({"query": "cats hunting", "k": "1"})
    assert [h["id"] for h in hits] == ["cats"]
    with pytest.raises(ToolArgumentError) as info:
        await t.call({"query": "cats", "k": 0})
    assert info.value.field == "k"
    results = await asyncio.gather(*(t.call({"query": q}) for q in ("bread", "cats", "Ulvane")))
    assert [r[0]["id"] for r in results] == ["bread", "cats", "rivers"]


def test_multihop_entities_are_found_at_rank_one(tmp_path: Path) -> None:
    kb = KnowledgeBase.generate(seed=3, n_entities=100)
    retriever = BM25Retriever(kb.write_corpus(tmp_path / "corpus"))  # through the files, as a pipeline would
    assert len(retriever.documents) == 100
    hits = sum(retriever.search(e.name, k=1)[0]["id"] == e.doc_id for e in kb.entities)
    assert hits >= 95, f"only {hits}/100 entities ranked first"
