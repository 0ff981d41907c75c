"""The error taxonomy: one root class whose ``retriable`` flag decides the retry policy.

Retry policy is data, not ``except`` ladders: the ingest loop retries anything retriable (and anything
unexpected) with backoff and pauses consumption; a non-retriable error stops the batch, uncommitted.
A record that can never be processed raises a :class:`BadRecordError` where the fault is found (decoding,
validation, chunking, embedding); that step turns it into a :class:`pipeline.decode.Rejected` value, so it
never reaches the retry loop: the record becomes a dead letter with the error's reason and stage, and the
rest of its batch goes on.
"""

from __future__ import annotations

from typing import ClassVar

from schemas.dead_letter import DeadLetterReason, DeadLetterStage


class VectorstreamError(Exception):
    """Root of every error the pipeline raises on purpose."""

    retriable: bool = False
    #: a short, bounded code: used as a metric label and in dead-letter headers
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


# --- permanent, per-record: these become dead letters -------------------------------------------------


class BadRecordError(VectorstreamError):
    """A record that can never be processed, whatever is retried: it belongs in the dead-letter topic.

    ``reason`` is one of the bounded dead-letter reasons; the subclass says at which stage the record failed.
    """

    retriable = False
    stage: ClassVar[DeadLetterStage]
    reason: DeadLetterReason

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


class DecodeError(BadRecordError):
    """The bytes are not a document event: a bad key, not UTF-8, not JSON, not an object, too deep, too large."""

    stage = DeadLetterStage.DECODE


class SchemaError(BadRecordError):
    """The JSON is well formed but breaks the document event contract (or its key does not match the record's)."""

    stage = DeadLetterStage.VALIDATE


class ContentError(BadRecordError):
    """The event is valid but its content cannot be indexed (e.g. nothing to embed)."""

    stage = DeadLetterStage.CHUNK


class EmbeddingError(BadRecordError):
    """The model could not embed the document's text (the rest of the batch is embedded without it)."""

    stage = DeadLetterStage.EMBED


# --- configuration: refuse to start ---------------------------------------------------------------------


class ConfigurationError(VectorstreamError):
    """Settings that cannot work together; the message says what to change."""

    reason = "configuration"


class ModelMismatchError(ConfigurationError):
    """The collection was built by another model or with another vector size."""

    reason = "model_mismatch"


class TokenizerMismatchError(ModelMismatchError):
    """The collection's sparse vectors were made by another tokenizer configuration (language, stop words,
    k1, b, avg_len): vectors of two tokenizers cannot be mixed, like vectors of two models."""

    reason = "tokenizer_mismatch"


class ModeUnsupportedError(VectorstreamError):
    """A search mode the store or the collection cannot serve (sparse or hybrid on a dense-only collection,
    or on pgvector): the caller gets an error reply, never a silent fallback to another mode."""

    reason = "mode_unsupported"


class BreakerOpenError(VectorstreamError):
    """Every recent record failed: more likely a bad deploy or a broken producer than bad data.

    Consumption stops (nothing more is dead-lettered or committed) until an operator fixes the cause
    and restarts the worker; lag grows and alerts fire meanwhile.
    """

    reason = "breaker_open"


class ShutdownRequested(VectorstreamError):
    """The process is stopping while a batch waits for a dependency: give the batch back uncommitted."""

    reason = "shutdown"


# --- transient: retry with backoff, pause consumption, never dead-letter -------------------------------


class TransientError(VectorstreamError):
    retriable = True
    reason = "transient"


class StoreUnavailableError(TransientError):
    """The vector store did not confirm a write or a read (down, timed out, refused)."""

    reason = "store_unavailable"


class BrokerUnavailableError(TransientError):
    """The broker did not confirm a produce (e.g. a dead letter)."""

    reason = "broker_unavailable"
