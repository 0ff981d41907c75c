"""BM25 sparse vectors: the text of a chunk (or a query) into term ids and weights for the engine's sparse index.

The engine computes IDF (Qdrant's ``Modifier.IDF``), so the worker holds no corpus statistics: a document's
vector carries only BM25's term-frequency saturation, a query's vector the count of each query term.

The tokenizer, in order (Lucene's ``EnglishAnalyzer`` shape, which Anserini's BM25 baselines use):

1. split into words with a Unicode-aware regular expression (``\\w+``: letters, digits and underscore of
   any script; everything else separates words);
2. lowercase (``str.lower``);
3. drop stop words (by default Lucene's English stop set for English, none for other languages) and words
   longer than ``max_token_chars``;
4. stem with PyStemmer's Snowball stemmer for ``language`` (``english``, ``porter``, ``german``, ...);
5. map each stemmed term to a stable id: the first 4 bytes of ``blake2b(term.encode("utf-8"),
   digest_size=8)``, read little-endian, masked to 31 bits (``& 0x7FFF_FFFF``). A vector written today
   therefore matches a query tomorrow, on any machine, in the server and in Edge alike; distinct terms that
   collide (about one pair in 2^31) share a dimension, which only merges their weights.

A document term's weight is ``tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))`` with ``len`` the
chunk's token count after step 3; with the engine's ``idf(t) = ln(1 + (N - n + 0.5) / (n + 0.5))`` the dot
product with a query vector is Lucene's BM25 score. Everything that changes the vectors is in
:meth:`SparseEncoder.record`, which the store keeps in the collection record: a process whose tokenizer
differs refuses to start instead of writing vectors that do not match the stored ones.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import Stemmer

from pipeline.errors import ConfigurationError
from pipeline.store.base import SparseVector

if TYPE_CHECKING:
    from pipeline.settings import SparseSettings

#: the name and version of this tokenizer in the collection record; bump the version when the output changes
TOKENIZER = "vectorstream-bm25"
TOKENIZER_VERSION = 1
#: how a term becomes an id (see the module docstring)
TERM_HASH = "blake2b8-first4-le-31bit"

#: Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`` (also Anserini's default), the stop words of English
LUCENE_ENGLISH_STOP_WORDS: tuple[str, ...] = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
    "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with",
)  # fmt: skip

#: languages whose default stop words are LUCENE_ENGLISH_STOP_WORDS
_ENGLISH = frozenset({"english", "porter"})

_WORD = re.compile(r"\w+")


def term_id(term: str) -> int:
    """The stable sparse-vector dimension of a (stemmed) term: see the module docstring, step 5."""
    digest = hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def default_stop_words(language: str) -> tuple[str, ...]:
    return LUCENE_ENGLISH_STOP_WORDS if language in _ENGLISH else ()


def stemmer_languages() -> list[str]:
    return sorted(Stemmer.algorithms())


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything that decides the vectors; equal configs give equal vectors."""

    language: str = "english"
    stop_words: tuple[str, ...] = LUCENE_ENGLISH_STOP_WORDS
    k1: float = 0.9
    b: float = 0.4
    avg_len: float = 100.0
    max_token_chars: int = 64

    def record(self) -> dict[str, Any]:
        """The config as the collection record keeps it (JSON, canonical order of stop words)."""
        return {
            "tokenizer": TOKENIZER,
            "version": TOKENIZER_VERSION,
            "term_hash": TERM_HASH,
            "language": self.language,
            "stop_words": sorted(set(self.stop_words)),
            "k1": float(self.k1),
            "b": float(self.b),
            "avg_len": float(self.avg_len),
            "max_token_chars": int(self.max_token_chars),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TokenizerConfig:
        """The config a collection record names; ConfigurationError when this code cannot produce its vectors."""
        if record.get("tokenizer") != TOKENIZER or record.get("version") != TOKENIZER_VERSION:
            raise ConfigurationError(
                f"the collection's sparse vectors were made by tokenizer {record.get('tokenizer')!r} version "
                f"{record.get('version')!r}; this build makes {TOKENIZER!r} version {TOKENIZER_VERSION}"
            )
        return cls(
            language=str(record["language"]),
            stop_words=tuple(str(w) for w in record.get("stop_words") or ()),
            k1=float(record["k1"]),
            b=float(record["b"]),
            avg_len=float(record["avg_len"]),
            max_token_chars=int(record["max_token_chars"]),
        )

    @classmethod
    def from_settings(cls, settings: SparseSettings) -> TokenizerConfig:
        if settings.stop_words is None:
            stop_words: Iterable[str] = default_stop_words(settings.language)
        else:
            stop_words = (w.strip() for w in settings.stop_words.split(",") if w.strip())
        return cls(
            language=settings.language,
            stop_words=tuple(w.lower() for w in stop_words),
            k1=settings.k1,
            b=settings.b,
            avg_len=settings.avg_len,
            max_token_chars=settings.max_token_chars,
        )


class SparseEncoder:
    """Texts into BM25 sparse vectors under one :class:`TokenizerConfig`. Pure CPU, thread-safe for reading
    (PyStemmer's stemmer is used under the GIL, one call at a time)."""

    def __init__(self, config: TokenizerConfig) -> None:
        if config.language not in Stemmer.algorithms():
            raise ConfigurationError(
                f"sparse.language {config.language!r} has no Snowball stemmer; one of {', '.join(stemmer_languages())}"
            )
        self.config = config
        self._stemmer = Stemmer.Stemmer(config.language)
        self._stop = frozenset(config.stop_words)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SparseEncoder:
        return cls(TokenizerConfig.from_record(record))

    def record(self) -> dict[str, Any]:
        return self.config.record()

    def terms(self, text: str) -> list[str]:
        """The stemmed terms of ``text``, in order (steps 1-4 of the module docstring)."""
        limit = self.config.max_token_chars
        words = [w for w in _WORD.findall(text.lower()) if w not in self._stop and len(w) <= limit]
        return self._stemmer.stemWords(words) if words else []

    def encode_document(self, text: str) -> SparseVector:
        """The BM25 term weights of a chunk (tf saturation and length normalisation; IDF is the engine's)."""
        counts = _counts(self.terms(text))
        if not counts:
            return SparseVector((), ())
        k1, b = self.config.k1, self.config.b
        length = sum(counts.values())
        norm = k1 * (1.0 - b + b * length / self.config.avg_len)
        return _vector((tid, tf * (k1 + 1.0) / (tf + norm)) for tid, tf in counts.items())

    def encode_query(self, text: str) -> SparseVector:
        """The query vector: each distinct query term with its count (a repeated term counts as often as
        Lucene's bag-of-words query counts it)."""
        return _vector((tid, float(n)) for tid, n in _counts(self.terms(text)).items())


def _counts(terms: Iterable[str]) -> Counter[int]:
    return Counter(term_id(t) for t in terms)


def _vector(weights: Iterable[tuple[int, float]]) -> SparseVector:
    pairs = sorted(weights)
    return SparseVector(tuple(i for i, _ in pairs), tuple(float(w) for _, w in pairs))


def settings_record(settings: SparseSettings) -> dict[str, Any] | None:
    """The tokenizer record a process opens its store with: None when ``sparse.enabled`` is off (a new
    collection is then dense-only; an existing one keeps its own record, see ``VectorStore.open``)."""
    if not settings.enabled:
        return None
    return SparseEncoder(TokenizerConfig.from_settings(settings)).record()
