"""BM25 sparse vectors (pipeline.sparse): the tokenizer, the pinned term ids and weights, the collection record."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings, SparseSettings, StemmerLanguage
from pipeline.sparse import (
    LUCENE_ENGLISH_STOP_WORDS,
    SparseEncoder,
    TokenizerConfig,
    settings_record,
    term_id,
)
from pipeline.store.base import SparseVector

ENGLISH = SparseEncoder(TokenizerConfig())


def test_term_ids_are_pinned() -> None:
    """A vector written today must match a query tomorrow and on every machine: these never change."""
    assert term_id("kafka") == 279058215
    assert term_id("brca1") == 1686937028
    assert term_id("über") == 371579463


def test_term_id_is_the_documented_hash() -> None:
    for term in ("kafka", "größe", "x" * 64, "42"):
        digest = hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest()
        assert term_id(term) == int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
        assert 0 <= term_id(term) < 2**31


def test_tokenizer_splits_unicode_words_lowercases_drops_stop_words_and_stems() -> None:
    text = "The Running foxes, BRCA1-mutations and Über-Größe; naïve café_42"
    assert ENGLISH.terms(text) == ["run", "fox", "brca1", "mutat", "über", "größe", "naïv", "café_42"]
    assert ENGLISH.terms("the and of") == []
    assert ENGLISH.terms("a" * 65) == []  # longer than max_token_chars
    assert set(LUCENE_ENGLISH_STOP_WORDS) >= {"the", "and", "of", "is", "with"}


def test_document_weights_are_bm25_tf_saturation() -> None:
    k1, b, avg = 0.9, 0.4, 100.0
    vec = ENGLISH.encode_document("kafka kafka consumer the offsets")
    length = 4  # kafka, kafka, consumer, offset ("the" is a stop word)
    norm = k1 * (1 - b + b * length / avg)
    want = {
        term_id("kafka"): 2 * (k1 + 1) / (2 + norm),
        term_id("consum"): 1 * (k1 + 1) / (1 + norm),
        term_id("offset"): 1 * (k1 + 1) / (1 + norm),
    }
    assert list(vec.indices) == sorted(want)
    assert dict(zip(vec.indices, vec.values, strict=True)) == pytest.approx(want)
    # pinned: the same text gives these very numbers on any machine
    assert vec.values == pytest.approx((1.4876291888506106, 1.222336592897581, 1.222336592897581))


def test_longer_chunks_weigh_a_term_less_and_repeats_saturate() -> None:
    short = _weights(ENGLISH.encode_document("kafka broker"))
    long = _weights(ENGLISH.encode_document("kafka " + " ".join(f"w{i}" for i in range(300))))
    assert long[term_id("kafka")] < short[term_id("kafka")]
    many = ENGLISH.encode_document(" ".join(["kafka"] * 1000))
    assert many.values[0] < 0.9 + 1  # never above k1 + 1


def test_query_vector_counts_the_query_terms() -> None:
    vec = ENGLISH.encode_query("Kafka kafka offsets?")
    assert dict(zip(vec.indices, vec.values, strict=True)) == {term_id("kafka"): 2.0, term_id("offset"): 1.0}
    assert not ENGLISH.encode_query("the of and")  # nothing left: an empty vector


def test_record_roundtrip_and_refusals() -> None:
    record = ENGLISH.record()
    assert record["tokenizer"] == "vectorstream-bm25" and record["language"] == "english"
    assert SparseEncoder.from_record(record).record() == record
    with pytest.raises(ConfigurationError, match="tokenizer"):
        SparseEncoder.from_record({**record, "version": 99})
    with pytest.raises(ConfigurationError, match="Snowball"):
        SparseEncoder(TokenizerConfig(language="klingon"))


def test_settings_record_and_defaults() -> None:
    settings = Settings(_env_file=None)
    assert settings.sparse.enabled and settings.sparse.k1 == 0.9 and settings.sparse.b == 0.4
    assert settings_record(settings.sparse) == ENGLISH.record()
    assert settings_record(SparseSettings(enabled=False)) is None
    german = settings_record(SparseSettings(language="german", stop_words="Der, die"))
    assert german is not None and german["stop_words"] == ["der", "die"]
    assert settings_record(SparseSettings(language="german"))["stop_words"] == []  # type: ignore[index]
    assert settings_record(SparseSettings(stop_words=""))["stop_words"] == []  # type: ignore[index]
    with pytest.raises(ValidationError, match="language"):
        SparseSettings(language="klingon")  # type: ignore[arg-type]


def test_the_settings_languages_are_pystemmers() -> None:
    import typing

    import Stemmer

    assert set(typing.get_args(StemmerLanguage)) == set(Stemmer.algorithms())


def test_sparse_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VECTORSTREAM_SPARSE__ENABLED", "false")
    monkeypatch.setenv("VECTORSTREAM_SPARSE__AVG_LEN", "250")
    settings = Settings(_env_file=None)
    assert settings.sparse.enabled is False and settings.sparse.avg_len == 250


def _weights(vec: SparseVector) -> dict[int, float]:
    return dict(zip(vec.indices, vec.values, strict=True))
