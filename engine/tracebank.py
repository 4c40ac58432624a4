"""The trace bank format: sampled traces stored once (SQLite) and served again by the ``replay`` engine.

A bank is one SQLite file, or a folder of chunk files ``chunk-0000.db``, ``chunk-0001.db``... (one per block of
consecutive benchmark problems; `branchwise.evals.bank` writes them). Every file is complete on its own:

- ``meta``: key -> JSON value: ``format`` (`FORMAT_VERSION`), ``benchmark``, ``model``, ``chunk``,
  ``chunk_size``, ``n`` (samples per problem asked for), ``logprobs``, ``settings``...
- ``draws``: one row per invocation that added samples, with its reproducibility record (package versions,
  engine arguments, weights hash, seeds; see `branchwise.evals.repro`) and command line.
- ``problems``: one row per (benchmark problem, request): the canonical prompt (`prompt_key`: the raw prompt, or
  the chat messages as JSON, which is what replay matches), the prompt as the engine rendered it (chat template
  applied) when known, the sampling settings as canonical JSON (`sampling_settings`), ``max_tokens``, the
  ``logprobs`` top-k the samples were drawn with, a hash of all of these, and the prompt's token count.
- ``samples``: one row per trace: its index, token count, the ``max_tokens`` it was drawn under, finish and stop
  reason, time to first token and decode seconds, and per-token arrays, each packed (`pack_ints`,
  `pack_floats`: little-endian, zlib-compressed, float32 when every value survives the round trip exactly,
  else float64): token ids, sampled-token logprobs, the confidence signal (below), the decoded token texts, and
  the stream's delta boundaries (tokens and characters per delta), so a replayed stream has the live one's
  shape.

The confidence signal of a token is ``top_mean``, the mean of its top-k alternatives' logprobs as DeepConf reads
them (clamped like `branchwise.verifiers.confidence.token_confidence` clamps them), plus ``top_counts``, how many
alternatives the engine returned. Whole distributions are not stored: replay hands strategies two alternatives
both holding the mean, which gives `token_confidence` exactly the live value (``-(m + m) / 2 == -m``); with one
alternative it hands that one logprob; with none, none.

Nothing here imports anything above the engine layer; the writer (`branchwise.evals.bank`) computes the signal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .types import Delta, FinishReason, GenerationRequest, TokenLogprob

__all__ = [
    "CHUNK_GLOB",
    "FORMAT_VERSION",
    "SAMPLE_COLUMNS",
    "SCHEMA",
    "BankStats",
    "BankedProblem",
    "BankedSample",
    "TraceBank",
    "canonical_json",
    "chunk_files",
    "connect",
    "pack_floats",
    "pack_ints",
    "pack_text",
    "problem_hash",
    "prompt_key",
    "read_meta",
    "sampling_settings",
    "unpack",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_GLOB = "chunk-*.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS draws (
    draw_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    argv TEXT NOT NULL,
    repro TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS problems (
    problem_key INTEGER PRIMARY KEY AUTOINCREMENT,
    benchmark TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    position INTEGER,
    prompt TEXT NOT NULL,
    rendered TEXT,
    settings TEXT NOT NULL,
    max_tokens INTEGER NOT NULL,
    logprobs INTEGER,
    hash TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    UNIQUE (benchmark, problem_id, hash)
);
CREATE INDEX IF NOT EXISTS problems_by_hash ON problems (hash);
CREATE TABLE IF NOT EXISTS samples (
    problem_key INTEGER NOT NULL REFERENCES problems (problem_key),
    idx INTEGER NOT NULL,
    draw_id INTEGER REFERENCES draws (draw_id),
    num_tokens INTEGER NOT NULL,
    max_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    stop_reason TEXT,
    ttft_s REAL,
    decode_s REAL,
    text BLOB NOT NULL,
    token_ids BLOB NOT NULL,
    logprobs BLOB,
    top_mean BLOB,
    top_counts BLOB,
    token_texts BLOB,
    token_text_lens BLOB,
    delta_tokens BLOB NOT NULL,
    delta_chars BLOB NOT NULL,
    PRIMARY KEY (problem_key, idx)
) WITHOUT ROWID;
"""

_BIG_ENDIAN = sys.byteorder == "big"


# -- packing ------------------------------------------------------------------------------------------------------
def _pack(values: array[Any]) -> bytes:
    if _BIG_ENDIAN:  # pragma: no cover - the format is little-endian everywhere
        values = array(values.typecode, values)
        values.byteswap()
    return values.typecode.encode() + zlib.compress(values.tobytes(), 9)


def pack_ints(values: Iterable[int]) -> bytes:
    """Pack integers (token ids, counts) as zlib-compressed little-endian int32."""
    return _pack(array("i", values))


def pack_floats(values: Sequence[float]) -> bytes:
    """Pack floats as float32 when every value round-trips exactly (vLLM's logprobs are float32), else float64."""
    single = array("f", values)
    exact = all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(single, values, strict=True))
    return _pack(single if exact else array("d", values))


def pack_text(text: str) -> bytes:
    """Pack text as zlib-compressed UTF-8 (typecode ``s``)."""
    return b"s" + zlib.compress(text.encode("utf-8"), 9)


def unpack(blob: bytes) -> array[Any] | str:
    """Inverse of `pack_ints`, `pack_floats` and `pack_text`."""
    typecode, data = chr(blob[0]), zlib.decompress(blob[1:])
    if typecode == "s":
        return data.decode("utf-8")
    values: array[Any] = array(typecode)
    values.frombytes(data)
    if _BIG_ENDIAN:  # pragma: no cover
        values.byteswap()
    return values


def _ints(blob: bytes | None) -> tuple[int, ...]:
    return () if blob is None else tuple(int(v) for v in unpack(blob))


def _floats(blob: bytes | None) -> tuple[float, ...]:
    return () if blob is None else tuple(float(v) for v in unpack(blob))


def _text(blob: bytes | None) -> str:
    value = "" if blob is None else unpack(blob)
    assert isinstance(value, str)
    return value


# -- request identity ---------------------------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompt_key(request: GenerationRequest) -> str:
    """The prompt of ``request`` in a canonical form: the raw prompt, or its chat messages as canonical JSON.

    Replay has no tokenizer, so it matches on this rather than on the chat-template rendering; the model (and so
    its template) is pinned by the bank's metadata.
    """
    if request.prompt is not None:
        return request.prompt
    assert request.messages is not None
    messages = [m.to_dict() for m in request.messages]
    return canonical_json({"messages": messages, "continue_final_message": request.continue_final_message})


def sampling_settings(request: GenerationRequest) -> dict[str, Any]:
    """The settings that shape the distribution a request samples from.

    Not included: ``n`` and ``seed`` (how many samples, and which), ``max_tokens`` (a shorter cap gives a prefix
    of the same sample, kept apart) and ``logprobs`` (reported, not sampled; kept apart).
    """
    structured = request.structured
    return {
        "temperature": float(request.temperature),
        "top_p": float(request.top_p),
        "top_k": request.top_k,
        "min_p": float(request.min_p),
        "min_tokens": request.min_tokens,
        "stop": list(request.stop),
        "ignore_eos": request.ignore_eos,
        "presence_penalty": float(request.presence_penalty),
        "frequency_penalty": float(request.frequency_penalty),
        "repetition_penalty": float(request.repetition_penalty),
        "structured": None
        if structured is None
        else {
            "json_schema": None if structured.json_schema is None else dict(structured.json_schema),
            "regex": structured.regex,
            "choices": None if structured.choices is None else list(structured.choices),
        },
    }


def problem_hash(prompt: str, settings: Mapping[str, Any], max_tokens: int, logprobs: int | None) -> str:
    """sha256 over the canonical prompt, settings, token cap and logprobs top-k."""
    blob = canonical_json({"prompt": prompt, "settings": settings, "max_tokens": max_tokens, "logprobs": logprobs})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# -- records ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BankedProblem:
    """One problem's request as banked.

    Attributes:
        benchmark: the benchmark name.
        problem_id: the problem's id in the benchmark.
        position: its index in the benchmark (which chunk it belongs to), if known.
        prompt: the canonical prompt (`prompt_key`).
        rendered: the prompt as the engine rendered it, if known.
        settings: `sampling_settings` of the request.
        max_tokens: the token cap the samples were drawn with.
        logprobs: the top-k alternatives the samples were drawn with (None: no logprobs).
        prompt_tokens: the prompt's length in tokens.
    """

    benchmark: str
    problem_id: str
    position: int | None
    prompt: str
    rendered: str | None
    settings: Mapping[str, Any]
    max_tokens: int
    logprobs: int | None
    prompt_tokens: int

    @property
    def hash(self) -> str:
        return problem_hash(self.prompt, self.settings, self.max_tokens, self.logprobs)

    @classmethod
    def of(
        cls,
        request: GenerationRequest,
        *,
        benchmark: str,
        problem_id: str,
        prompt_tokens: int,
        position: int | None = None,
        rendered: str | None = None,
    ) -> BankedProblem:
        """The record of a problem whose samples were drawn with ``request``."""
        return cls(
            benchmark,
            problem_id,
            position,
            prompt_key(request),
            rendered,
            sampling_settings(request),
            request.max_tokens,
            request.logprobs,
            prompt_tokens,
        )


@dataclass(frozen=True)
class BankedSample:
    """One banked trace.

    Attributes:
        index: its index among the problem's samples.
        token_ids: generated token ids.
        logprobs: the sampled tokens' logprobs (empty when drawn without logprobs).
        top_mean: per token, the mean of the (clamped) top-k alternatives' logprobs; NaN where there were none.
        top_counts: per token, how many alternatives the engine returned.
        token_texts: per token, its decoded text (empty when drawn without logprobs).
        delta_tokens: tokens in each delta of the live stream, in order.
        delta_texts: text of each delta of the live stream.
        finish_reason: how it ended ("stop", "length", or "abort" when the live consumer cut it).
        stop_reason: the stop string or token that ended it, if reported.
        max_tokens: the token cap it was drawn under.
        ttft_s: seconds from the request to its first token.
        decode_s: seconds from its first token to its last.
    """

    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_mean: tuple[float, ...]
    top_counts: tuple[int, ...]
    token_texts: tuple[str, ...]
    delta_tokens: tuple[int, ...]
    delta_texts: tuple[str, ...]
    finish_reason: FinishReason
    stop_reason: str | int | None
    max_tokens: int
    ttft_s: float | None = None
    decode_s: float | None = None

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if sum(self.delta_tokens) != n or len(self.delta_tokens) != len(self.delta_texts):
            raise DatasetError("trace bank", f"sample {self.index}: delta boundaries do not cover its {n} tokens")
        for name in ("logprobs", "top_mean", "top_counts", "token_texts"):
            if len(getattr(self, name)) not in (0, n):
                raise DatasetError("trace bank", f"sample {self.index}: {name} has the wrong length for {n} tokens")

    @property
    def text(self) -> str:
        return "".join(self.delta_texts)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def has_logprobs(self) -> bool:
        return len(self.logprobs) == len(self.token_ids)

    def token_logprobs(self, start: int, stop: int, top_k: int) -> tuple[TokenLogprob, ...]:
        """`TokenLogprob` of tokens ``start..stop-1`` as a live engine asked for ``top_k`` alternatives gives them.

        ``top_k == 0``: no alternatives. Otherwise the alternatives are summarised as described in the module
        docstring, so `token_confidence` reads exactly the live value.
        """
        out = []
        for i in range(start, stop):
            top: tuple[tuple[str, float], ...] = ()
            count = self.top_counts[i] if top_k and self.top_counts else 0
            if count >= 2:
                top = (("", self.top_mean[i]), ("", self.top_mean[i]))
            elif count == 1:
                top = (("", self.top_mean[i]),)
            text = self.token_texts[i] if self.token_texts else ""
            out.append(TokenLogprob(self.token_ids[i], text, self.logprobs[i], top))
        return tuple(out)

    def deltas(self, max_tokens: int, top_k: int | None) -> list[Delta]:
        """This sample's live deltas for a request with cap ``max_tokens`` asking ``top_k`` alternatives (None: no
        logprobs), all with index 0.

        A sample longer than the cap is cut there and finishes for "length", as the live engine would have cut
        it. A sample that was itself cut while banked ("abort", or "length" under a smaller cap than asked) is
        served as far as it goes and its last delta has no finish reason: the bank does not know how it goes on.
        """
        n = self.num_tokens
        truncated = n > max_tokens
        limit = min(max_tokens, n)
        out: list[Delta] = []
        start = 0
        for count, delta_text in zip(self.delta_tokens, self.delta_texts, strict=True):
            if truncated and start >= limit:
                break
            stop = min(start + count, limit)
            text = delta_text
            if stop < start + count:  # the cap falls inside this delta: keep its first tokens
                text = "".join(self.token_texts[start:stop]) if self.token_texts else delta_text
            logprobs = None if top_k is None else self.token_logprobs(start, stop, top_k)
            out.append(Delta(index=0, text=text, token_ids=self.token_ids[start:stop], logprobs=logprobs))
            start = stop
        if not out:
            out.append(Delta(index=0, text="", logprobs=None if top_k is None else ()))
        finish: FinishReason | None = None
        stop_reason: str | int | None = None
        if truncated or (n == max_tokens and self.finish_reason != "stop"):
            finish = "length"
        elif self.finish_reason == "stop":
            finish, stop_reason = "stop", self.stop_reason
        last = out[-1]
        out[-1] = Delta(0, last.text, last.token_ids, last.logprobs, finish_reason=finish, stop_reason=stop_reason)
        return out

    # -- rows ------------------------------------------------------------------------------------------------
    def to_row(self, problem_key: int, draw_id: int | None) -> tuple[Any, ...]:
        has_lp = self.has_logprobs and self.num_tokens > 0
        joined = "".join(self.token_texts)
        return (
            problem_key,
            self.index,
            draw_id,
            self.num_tokens,
            self.max_tokens,
            self.finish_reason,
            json.dumps(self.stop_reason),
            self.ttft_s,
            self.decode_s,
            pack_text(self.text),
            pack_ints(self.token_ids),
            pack_floats(self.logprobs) if has_lp else None,
            pack_floats(self.top_mean) if has_lp and self.top_mean else None,
            pack_ints(self.top_counts) if has_lp and self.top_counts else None,
            pack_text(joined) if self.token_texts else None,
            pack_ints(len(t) for t in self.token_texts) if self.token_texts else None,
            pack_ints(self.delta_tokens),
            pack_ints(len(t) for t in self.delta_texts),
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> BankedSample:
        (_, index, _, num_tokens, max_tokens, finish, stop, ttft, decode, text_blob, ids, lps, means, counts,
         texts, text_lens, delta_tokens, delta_chars) = row  # fmt: skip
        text = _text(text_blob)
        delta_texts = []
        pos = 0
        for length in _ints(delta_chars):
            delta_texts.append(text[pos : pos + length])
            pos += length
        joined = _text(texts)
        token_texts = []
        pos = 0
        for length in _ints(text_lens):
            token_texts.append(joined[pos : pos + length])
            pos += length
        token_ids = _ints(ids)
        if len(token_ids) != num_tokens:
            raise DatasetError("trace bank", f"sample {index}: {len(token_ids)} token ids for {num_tokens} tokens")
        return cls(
            index=index,
            token_ids=token_ids,
            logprobs=_floats(lps),
            top_mean=_floats(means),
            top_counts=_ints(counts),
            token_texts=tuple(token_texts),
            delta_tokens=_ints(delta_tokens),
            delta_texts=tuple(delta_texts),
            finish_reason=finish,
            stop_reason=json.loads(stop) if stop is not None else None,
            max_tokens=max_tokens,
            ttft_s=ttft,
            decode_s=decode,
        )


SAMPLE_COLUMNS = (
    "problem_key, idx, draw_id, num_tokens, max_tokens, finish_reason, stop_reason, ttft_s, decode_s, text, "
    "token_ids, logprobs, top_mean, top_counts, token_texts, token_text_lens, delta_tokens, delta_chars"
)


@dataclass(frozen=True)
class BankStats:
    """Size and speed of a bank.

    Attributes:
        files: chunk files.
        problems: banked problem records.
        samples: banked traces.
        tokens: generated tokens over all traces.
        bytes: bytes on disk.
        decode_rate: tokens per second of one sequence while decoding (tokens after the first over decode
            seconds, summed over traces), None when no timing was recorded.
        mean_ttft_s: mean time to first token, None when unknown.
    """

    files: int
    problems: int
    samples: int
    tokens: int
    bytes: int
    decode_rate: float | None
    mean_ttft_s: float | None

    @property
    def bytes_per_100k_tokens(self) -> float:
        return self.bytes / self.tokens * 100_000 if self.tokens else math.nan


def chunk_files(path: str | os.PathLike[str]) -> list[Path]:
    """The SQLite files of a bank: ``path`` itself, or the ``chunk-*.db`` files of a folder, in order."""
    root = Path(path).expanduser()
    if root.is_dir():
        return sorted(root.glob(CHUNK_GLOB))
    return [root] if root.is_file() else []


def connect(path: Path) -> sqlite3.Connection:
    """Open a bank file (creating its tables if needed) in rollback-journal mode with full syncs.

    Not WAL: a WAL file holds committed transactions outside the ``.db`` until a checkpoint, so copying or
    committing the ``.db`` alone (what chunked banks are for) could lose them. With a rollback journal the
    ``.db`` is complete after every commit, and a crash leaves a journal SQLite rolls back on the next open.
    """
    conn = sqlite3.connect(str(path), timeout=60.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    return conn


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {key: json.loads(value) for key, value in conn.execute("SELECT key, value FROM meta")}


class TraceBank:
    """A bank opened for reading: every problem indexed by its canonical prompt; samples loaded on demand.

    Args:
        path: a bank file, or a folder of ``chunk-*.db`` files.

    Raises:
        DatasetError: no bank there, or a file of an unknown format.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        files = chunk_files(self.path)
        if not files:
            raise DatasetError(str(self.path), "no trace bank here (expected a .db file or a folder of chunk-*.db)")
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._by_prompt: dict[str, list[tuple[int, int, BankedProblem]]] = {}
        self._samples: dict[tuple[int, int], tuple[BankedSample, ...]] = {}
        self.meta: dict[str, Any] = {}
        self.problem_count = 0
        try:
            for file in files:
                # Not read-only: a crash while writing leaves a journal that the first reader must roll back.
                conn = sqlite3.connect(str(file), check_same_thread=False)
                self._conns.append(conn)
                self._index(len(self._conns) - 1, file, conn)
        except sqlite3.DatabaseError as err:
            self.close()
            raise DatasetError(str(self.path), f"not a readable trace bank: {err}") from err

    def _index(self, which: int, file: Path, conn: sqlite3.Connection) -> None:
        meta = read_meta(conn)
        if meta.get("format") != FORMAT_VERSION:
            raise DatasetError(str(file), f"trace bank format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        for key, value in meta.items():
            self.meta.setdefault(key, value)
        rows = conn.execute(
            "SELECT problem_key, benchmark, problem_id, position, prompt, rendered, settings, max_tokens, logprobs, "
            "prompt_tokens FROM problems WHERE EXISTS (SELECT 1 FROM samples s WHERE s.problem_key = "
            "problems.problem_key) ORDER BY problem_key"
        )
        for key, bench, pid, pos, prompt, rendered, settings, max_tokens, logprobs, prompt_tokens in rows:
            problem = BankedProblem(
                bench, pid, pos, prompt, rendered, json.loads(settings), max_tokens, logprobs, prompt_tokens
            )
            self._by_prompt.setdefault(prompt, []).append((which, key, problem))
            self.problem_count += 1

    @property
    def model(self) -> str | None:
        model = self.meta.get("model")
        return str(model) if model else None

    def find(self, prompt: str) -> list[BankedProblem]:
        """Every banked problem record with this canonical prompt."""
        return [p for _, _, p in self._by_prompt.get(prompt, ())]

    def problems(self) -> Iterator[BankedProblem]:
        """Every banked problem record."""
        for entries in self._by_prompt.values():
            for _, _, problem in entries:
                yield problem

    def samples(self, problem: BankedProblem) -> tuple[BankedSample, ...]:
        """The banked samples of ``problem``, by index (loaded once, then cached)."""
        for which, key, candidate in self._by_prompt.get(problem.prompt, ()):
            if candidate is problem or candidate == problem:
                return self._load(which, key)
        raise DatasetError(str(self.path), f"problem {problem.problem_id!r} is not in this bank")

    def _load(self, which: int, key: int) -> tuple[BankedSample, ...]:
        cached = self._samples.get((which, key))
        if cached is None:
            with self._lock:
                rows = (
                    self._conns[which]
                    .execute(f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE problem_key = ? ORDER BY idx", (key,))
                    .fetchall()
                )
            cached = tuple(BankedSample.from_row(r) for r in rows)
            self._samples[(which, key)] = cached
        return cached

    def stats(self) -> BankStats:
        """Counts, size on disk and measured speed."""
        samples = tokens = 0
        decode_tokens, decode_s, ttft_sum, ttft_n = 0, 0.0, 0.0, 0
        with self._lock:
            for conn in self._conns:
                row = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(num_tokens), 0), "
                    "COALESCE(SUM(CASE WHEN decode_s > 0 THEN num_tokens - 1 END), 0), "
                    "COALESCE(SUM(CASE WHEN decode_s > 0 THEN decode_s END), 0), "
                    "COALESCE(SUM(ttft_s), 0), COUNT(ttft_s) FROM samples"
                ).fetchone()
                samples += row[0]
                tokens += row[1]
                decode_tokens += row[2]
                decode_s += row[3]
                ttft_sum += row[4]
                ttft_n += row[5]
        files = chunk_files(self.path)
        return BankStats(
            files=len(files),
            problems=self.problem_count,
            samples=samples,
            tokens=tokens,
            bytes=sum(f.stat().st_size for f in files),
            decode_rate=decode_tokens / decode_s if decode_s > 0 else None,
            mean_ttft_s=ttft_sum / ttft_n if ttft_n else None,
        )

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()

    def __repr__(self) -> str:
        return f"TraceBank({str(self.path)!r}, problems={self.problem_count})"
