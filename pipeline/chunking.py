"""Token-aware chunking with the embedding model's own tokenizer.

Every chunk fits the model's max sequence length, windows overlap by a configurable number of tokens,
cuts prefer sentence ends and never split a word, so nothing is silently truncated by the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

_SENTENCE_END = (".", "!", "?", "\n", ";", ":")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    #: tokens the model will see for this chunk, not counting special tokens
    tokens: int
    start_char: int
    end_char: int

    @property
    def content_hash(self) -> str:
        return hashlib.blake2b(self.text.encode("utf-8"), digest_size=16).hexdigest()


class Chunker:
    """Split text into windows of at most ``max_tokens`` tokens with ``overlap`` tokens shared."""

    def __init__(self, tokenizer: Any, *, max_tokens: int, overlap: int) -> None:
        if max_tokens < 8:
            raise ValueError("max_tokens must be at least 8")
        if not 0 <= overlap < max_tokens:
            raise ValueError("overlap must be in [0, max_tokens)")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap

    def document_text(self, title: str, text: str) -> str:
        """What gets chunked and embedded: the title leads the text, as in the model's benchmark setup."""
        title = title.strip()
        return f"{title}\n\n{text}" if title else text

    def split(self, text: str) -> list[Chunk]:
        if not text.strip():
            return []
        enc = self.tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        n = len(offsets)
        if n == 0:
            return []
        # a token may start a chunk only if it starts a word: re-tokenizing the substring then
        # yields the very same tokens, so the count below is exact
        word_start = [
            i == 0
            or offsets[i][0] > offsets[i - 1][1]
            or self._is_punct(text, offsets[i])
            or self._is_punct(text, offsets[i - 1])
            for i in range(n)
        ]
        chunks: list[Chunk] = []
        start = 0
        while start < n:
            end = min(start + self.max_tokens, n)
            if end < n:
                end = self._best_cut(text, offsets, word_start, start, end)
            s_char, e_char = offsets[start][0], offsets[end - 1][1]
            tokens = end - start
            if not word_start[start] or (end < n and not word_start[end]):
                # cut inside a word: the substring may tokenize differently, so count it and shrink to fit
                tokens = self._count(text[s_char:e_char])
                while tokens > self.max_tokens and end - start > 1:
                    end -= 1
                    e_char = offsets[end - 1][1]
                    tokens = self._count(text[s_char:e_char])
            chunks.append(Chunk(len(chunks), text[s_char:e_char], tokens, s_char, e_char))
            if end >= n:
                break
            nxt = max(end - self.overlap, start + 1)
            while nxt < end and not word_start[nxt]:
                nxt += 1
            start = nxt
        return chunks

    def _count(self, text: str) -> int:
        return len(
            self.tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        )

    @staticmethod
    def _is_punct(text: str, span: tuple[int, int]) -> bool:
        piece = text[span[0] : span[1]]
        return len(piece) == 1 and not piece.isalnum()

    def _best_cut(self, text: str, offsets: list[tuple[int, int]], word_start: list[bool], start: int, end: int) -> int:
        """Largest cut in (start, end] at a sentence end in the window's last half, else at a word start."""
        floor = start + max(1, (end - start) // 2)
        for cut in range(end, floor - 1, -1):
            if word_start[cut] and text[offsets[cut - 1][0] : offsets[cut - 1][1]].endswith(_SENTENCE_END):
                return cut
        # sentence ends are also visible as a newline between two tokens
        for cut in range(end, floor - 1, -1):
            if word_start[cut] and "\n" in text[offsets[cut - 1][1] : offsets[cut][0]]:
                return cut
        for cut in range(end, start, -1):
            if word_start[cut]:
                return cut
        return end  # one "word" longer than a whole window: cut inside it rather than loop forever
