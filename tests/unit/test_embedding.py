"""Token-budget batching and the embedder's output: unit vectors, in input order, equal to a plain encode."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.embedding import token_budget_batches


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=256), max_size=300),
    budget=st.integers(min_value=256, max_value=20000),
)
def test_batches_cover_every_index_once_within_budget(lengths, budget):
    batches = token_budget_batches(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= budget


def test_batches_group_similar_lengths():
    lengths = [5, 200, 6, 190, 7, 180]
    batches = token_budget_batches(lengths, 400)
    assert batches[0] == [1, 3]  # the long ones together, not padded next to short ones


def test_encode_matches_plain_sentence_transformers_in_input_order(embedder):
    texts = ["a short one", "how do I reset my password " * 20, "kafka offsets", "x"]
    ours = embedder.encode_sync(texts)
    plain = embedder.model.encode(texts, normalize_embeddings=True)
    assert ours.shape == (4, embedder.dim)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    # in input order: each row is the backend's own vector of that text, encoded alone ...
    alone = np.concatenate([embedder.backend.encode_batch([t]) for t in texts])
    assert np.allclose(ours, alone, atol=2e-3)
    # ... and close to PyTorch fp32 (identical for fp32 backends, within int8 error for the int8 default)
    cosine = (ours * plain).sum(axis=1)
    # the configured name may be "auto": what it resolved to on this CPU is in the backend's label
    assert cosine.min() > (0.9999 if "int8" not in embedder.backend_label else 0.97)


async def test_encode_runs_off_the_event_loop(embedder):
    import asyncio

    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await embedder.encode(["some text to embed " * 40] * 64)
    task.cancel()
    assert ticks > 5, "the loop kept running while the model encoded"


async def test_a_query_does_not_wait_behind_an_ingest_batch(embedder):
    """Queries embed on a lane of their own: one arriving mid-batch is answered before the batch is done."""
    import asyncio

    embedder.warm_query_lane()  # the worker does this at start-up
    question = "how do I reset my password"
    ingest = asyncio.create_task(embedder.encode(["some long text to embed in an ingest batch " * 30] * 64))
    await asyncio.sleep(0.05)  # the batch is under way
    (vector,) = await embedder.encode_query([question])
    assert not ingest.done(), "the query was answered while the ingest batch was still being embedded"
    await ingest
    same = embedder.encode_sync([question])[0]
    assert float(vector @ same) > 0.9999  # the same model and backend on both lanes


class _Recording:
    """A backend of ``streams`` parallel lanes that records the batches it is given."""

    def __init__(self, streams: int, dim: int) -> None:
        self.streams, self.dim, self.calls = streams, dim, []

    def encode_batches(self, batches):
        self.calls.append([len(b) for b in batches])
        return [np.ones((len(b), self.dim), dtype=np.float32) for b in batches]


def test_a_small_input_is_spread_over_every_stream(embedder):
    # 10 chunks fit one token-budget batch; on a backend with one stream per core that batch would run on
    # one core while the other idles
    texts = [f"chunk number {i} of a lightly edited document" for i in range(10)]
    two = _Recording(2, embedder.dim)
    out = embedder._encode_with(two, texts, [40] * 10)
    assert out.shape == (10, embedder.dim)
    assert two.calls == [[5, 5]]
    one = _Recording(1, embedder.dim)
    embedder._encode_with(one, texts, [40] * 10)
    assert one.calls == [[10]]
    # a large input keeps the token budget: no batch grows past it, none is cut smaller than needed
    many = [f"text {i}" for i in range(2000)]
    two.calls.clear()
    embedder._encode_with(two, many, [200] * 2000)
    per_batch = embedder.batch_token_budget // (200 + embedder._special)
    assert max(two.calls[0]) == per_batch and len(two.calls[0]) == -(-2000 // per_batch)


def test_chunking_while_both_lanes_embed_gives_the_same_vectors(embedder):
    """With two ingest batches in flight the chunker tokenizes on the event loop while a lane embeds on its
    thread (and the query lane on another). A fast tokenizer shared between them resets its padding and
    truncation settings on every call, so their outputs get corrupted (ragged arrays, then an OpenVINO queue left
    busy): each user must tokenize with its own copy, and every vector must equal the one computed alone."""
    import threading

    texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 7) for i in range(48)]
    questions = [f"what does fox number {i} jump over?" for i in range(16)]
    alone = embedder.encode_sync(texts)
    alone_q = embedder.encode_query_sync(questions)
    chunker = embedder.chunker()
    failures: list[BaseException] = []
    stop = threading.Event()

    def chunk_forever() -> None:
        try:
            while not stop.is_set():
                for t in texts:
                    chunker.split(chunker.document_text("title", t * 20))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def query_forever(out: list) -> None:
        try:
            for _ in range(5):
                out.append(embedder.encode_query_sync(questions))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    chunking = threading.Thread(target=chunk_forever)
    queried: list = []
    querying = threading.Thread(target=query_forever, args=(queried,))
    chunking.start()
    querying.start()
    try:
        together = [embedder.encode_sync(texts) for _ in range(5)]
    finally:
        querying.join()
        stop.set()
        chunking.join()
    assert not failures, failures
    for vectors in together:
        assert np.allclose(vectors, alone, atol=1e-5)
    assert queried and all(np.allclose(q, alone_q, atol=1e-5) for q in queried)


# --- the query lane's shapes (pipeline.backends.shaped_batches, bucket_length) ---------------------------------


@given(lengths=st.lists(st.integers(min_value=1, max_value=256), max_size=100), streams=st.integers(1, 4))
def test_shaped_batches_cover_every_index_once_in_power_of_two_groups(lengths, streams):
    from pipeline.backends import shaped_batches

    groups = shaped_batches(lengths, streams)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) & (len(g) - 1) == 0 for g in groups)  # 1, 2, 4, 8, ...
    # a share per stream, each split into at most log2(n)+1 groups: the shapes stay few
    per_share = -(-len(lengths) // streams) if lengths else 0
    assert len(groups) <= streams * max(1, per_share.bit_length())


def test_shaped_batches_put_the_longest_texts_together_and_spread_them_over_the_streams():
    from pipeline.backends import shaped_batches

    lengths = [5, 60, 6, 50, 7, 40, 8, 30, 9, 20, 10, 15, 11]
    one = shaped_batches(lengths)
    assert [len(g) for g in one] == [8, 4, 1]
    assert set(one[0]) == {1, 3, 5, 7, 9, 11, 12, 10}  # the 8 longest, so the 5-token ones do not pad to 60
    two = shaped_batches(lengths, 2)
    # two shares of 7 and 6 texts (4+2+1 and 4+2), interleaved: each stream takes a group of about equal work
    assert [len(g) for g in two] == [4, 4, 2, 2, 1]
    assert 1 in two[0] and 3 in two[1]  # the two longest lead different streams


@given(n=st.integers(min_value=1, max_value=512))
def test_bucket_length_pads_up_to_few_lengths_within_the_model_limit(n):
    from pipeline.backends import bucket_length

    padded = bucket_length(n, 256)
    assert padded >= min(n, 256) and padded <= 256
    assert padded - n < (8 if n <= 64 else 16 if n <= 128 else 32) or padded == 256
    assert len({bucket_length(k, 256) for k in range(1, 65)}) == 8  # questions: 8 lengths cover up to 64 tokens


def test_query_lane_batches_of_every_size_give_the_vectors_of_each_text_alone(embedder):
    """Shaped (padded to a bucket, split into power-of-two groups over the streams), a batch of questions of
    mixed lengths gives each question the vector it gets alone and on the ingest lane: the padding is masked."""
    questions = [("what is " + "very " * (i % 23) + f"question {i}?") for i in range(29)]
    alone = np.concatenate([embedder.encode_query_sync([q]) for q in questions])
    ingest = embedder.encode_sync(questions)
    assert float((alone * ingest).sum(axis=1).min()) > 0.9999
    for size in (2, 3, 13, 29):
        batch = embedder.encode_query_sync(questions[:size])
        assert batch.shape == (size, embedder.dim)
        assert float((batch * alone[:size]).sum(axis=1).min()) > 0.9999


def test_warming_the_query_lane_compiles_its_shapes(embedder):
    from pipeline.backends import OpenVinoBackend

    embedder.warm_query_lane()
    backend = embedder._query_backend
    if not isinstance(backend, OpenVinoBackend):
        import pytest

        pytest.skip(f"the query lane runs on {embedder.backend_label}: only OpenVINO compiles per shape")
    # every batch size up to query.max_batch (powers of two) at each of the 8 lengths up to 64 tokens
    sizes = len([s for s in (1, 2, 4, 8, 16, 32, 64) if s <= embedder.settings.query.max_batch])
    assert backend.warm(embedder.settings.query.max_batch) == sizes * 8
