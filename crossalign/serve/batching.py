"""Query encoding for concurrent requests: one encoder call at a time, each call taking every text then waiting.

A query encoder's cost on a CPU is mostly reading its weights, once per call whatever the batch: on 2 cores
MiniLM encodes one caption in 13 ms and eight in 33 ms (4.2 ms each), mpnet-base one in 57 ms and eight in
186 ms (fp32). So requests that arrive while an encoding runs are not encoded one after the other: the
next request to take the encoder (`lock`) encodes every text then waiting, up to `max_batch`, in one call,
and hands each request its vector (group commit, as databases batch the commits of concurrent
transactions). Nothing waits for a batch to fill: a lone request is encoded at once, alone, and gets the
vector a `Searcher` gives for its text; in a batch, padding to the longest text changes a vector only by
float rounding.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from crossalign.search import QueryError, Searcher

MAX_BATCH = 32


@dataclass
class _Job:
    searcher: Searcher
    text: str
    done: Future = field(default_factory=Future)


class QueryEncoder:
    """Encodes text queries of concurrent requests in shared batches (see the module); `lock` is the encoders'
    lock, which other encodings (an uploaded image, a hybrid search) hold too."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.lock = threading.Lock()  # one encoding at a time: concurrent ones would only split the cores
        self._queue_lock = threading.Lock()
        self._waiting: list[_Job] = []
        self.batches = 0  # encoder calls made, and texts they encoded (read by tests and /health)
        self.texts = 0

    def embed_text(self, searcher: Searcher, text: str) -> np.ndarray:
        """The joint vector of `text` under `searcher`, as `searcher.embed_text` gives it.

        Raises:
            QueryError: an empty query.
        """
        if not text.strip():
            raise QueryError("the text query is empty")
        job = _Job(searcher, text)
        with self._queue_lock:
            self._waiting.append(job)
        while not job.done.done():
            with self.lock:
                if not job.done.done():  # else a batch that another request ran while this one waited took it
                    self._run_batch()
        return job.done.result()

    def _run_batch(self) -> None:
        """Encode the waiting texts (the first `max_batch`), one encoder call per searcher among them."""
        with self._queue_lock:
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        groups: dict[int, list[_Job]] = {}
        for job in batch:  # a snapshot swap can leave texts of two searchers waiting together
            groups.setdefault(id(job.searcher), []).append(job)
        for jobs in groups.values():
            try:
                vectors = jobs[0].searcher.embed_texts([job.text for job in jobs])
            except BaseException as err:  # the batch's requests each get the error; this thread goes on
                for job in jobs:
                    job.done.set_exception(err)
                if not isinstance(err, Exception):
                    raise
                continue
            self.batches, self.texts = self.batches + 1, self.texts + len(jobs)
            for job, vector in zip(jobs, vectors):
                job.done.set_result(vector)


# Encoders are loaded once per process (`load_encoder`'s cache) and shared by every snapshot's Searcher, so one
# process-wide batcher encodes for all of them: whatever encodes a query in the service goes through it or holds
# its lock (a fast tokenizer, for one, refuses to be used from two threads at once).
QUERY_ENCODER = QueryEncoder()
