"""Chunks fit the model, overlap as configured, cover the whole text, and nothing is truncated."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.chunking import Chunker


@pytest.fixture(scope="module")
def tokenizer(embedder):
    return embedder.tokenizer


def count(tok, text):
    return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def test_model_chunker_respects_max_seq_length(embedder):
    ch = embedder.chunker()
    assert ch.max_tokens <= embedder.max_seq_length - 2
    assert ch.overlap == min(embedder.settings.model.chunk_overlap_tokens, ch.max_tokens // 2)


def test_long_document_becomes_many_chunks_and_its_last_sentence_is_kept(tokenizer):
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(300)]
    text = " ".join(sentences) + " The final sentence mentions zebras."
    chunks = Chunker(tokenizer, max_tokens=128, overlap=16).split(text)
    assert len(chunks) > 10
    assert chunks[-1].text.endswith("The final sentence mentions zebras.")
    assert all(count(tokenizer, c.text) <= 128 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_windows_overlap_and_prefer_sentence_ends(tokenizer):
    text = " ".join(f"This is sentence {i} of the test." for i in range(100))
    chunks = Chunker(tokenizer, max_tokens=64, overlap=12).split(text)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start_char < a.end_char, "consecutive chunks share an overlap"
        assert a.text.endswith("."), "a window ends at a sentence end when one is in reach"


def test_whitespace_only_gives_no_chunk(tokenizer):
    assert Chunker(tokenizer, max_tokens=64, overlap=8).split("  \n\t ") == []


def test_title_leads_the_text(tokenizer):
    ch = Chunker(tokenizer, max_tokens=64, overlap=8)
    assert ch.document_text("Title", "Body").startswith("Title\n\nBody")
    assert ch.document_text("", "Body") == "Body"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30),
        min_size=1,
        max_size=400,
    ),
    max_tokens=st.integers(min_value=16, max_value=254),
    overlap_frac=st.floats(min_value=0, max_value=0.5),
)
def test_property_every_chunk_fits_and_every_word_is_covered(tokenizer, words, max_tokens, overlap_frac):
    text = " ".join(words)
    overlap = int(max_tokens * overlap_frac)
    chunks = Chunker(tokenizer, max_tokens=max_tokens, overlap=overlap).split(text)
    if not text.strip():
        assert chunks == []
        return
    for c in chunks:
        assert count(tokenizer, c.text) <= max_tokens
        assert c.text == text[c.start_char : c.end_char]
    # coverage: every non-space character of the text lies in some chunk
    covered = [False] * len(text)
    for c in chunks:
        for i in range(c.start_char, c.end_char):
            covered[i] = True
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for s, e in enc["offset_mapping"]:
        assert all(covered[s:e]), f"token at {s}:{e} not in any chunk"
