"""Query encoding for concurrent requests: one encoder call at a time, each call taking every text then waiting.

A query encoder's cost on a CPU is mostly reading its weights, once per call whatever the batch: on 2 cores
MiniLM encodes one caption in 13 ms and eight in 33 ms (4.2 ms each), mpnet-base one in 57 ms and eight in
186 ms (fp32). So requests that arrive while an encoding runs are not encoded one after the other: the
next request to take the encoder (`lock`) encodes every text then waiting, up to `max_batch`, in one call,
and hands each request its vector (group commit, as databases batch the commits of concurrent
transactions). Nothing waits for a batch to fill: a lone request is encoded at once, alone, and gets the
vector a `Searcher` gives for its text; in a batch, padding to the longest text changes a vector only by
float rounding.

The last `cache_size` vectors are kept per (Searcher, text): the page's "more results", a label filter and a
repeated query do not encode their text again. A Searcher's mapper and encoders never change, so an entry
never goes stale; a new snapshot's Searcher starts with keys of its own, and the old ones age out.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from crossalign.search import QueryError, Searcher

MAX_BATCH = 32
CACHE_SIZE = 4096  # vectors of 512-2048 floats: 8-32 MB at most


@dataclass
class _Job:
    searcher: Searcher
    text: str
    key: tuple[int, str]  # the cache's: the searcher's number in this QueryEncoder, and the text
    done: Future = field(default_factory=Future)


class QueryEncoder:
    """Encodes text queries of concurrent requests in shared batches (see the module); `lock` is the encoders'
    lock, which other encodings (an uploaded image, a hybrid search) hold too."""

    def __init__(self, max_batch: int = MAX_BATCH, cache_size: int = CACHE_SIZE) -> None:
        if max_batch < 1 or cache_size < 0:
            raise ValueError("max_batch must be at least 1 and cache_size at least 0")
        self.max_batch, self.cache_size = max_batch, cache_size
        self.lock = threading.Lock()  # one encoding at a time: concurrent ones would only split the cores
        self._queue_lock = threading.Lock()  # guards the waiting list and the cache
        self._waiting: list[_Job] = []
        self._cache: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._searchers: weakref.WeakKeyDictionary[Searcher, int] = weakref.WeakKeyDictionary()  # a number each
        self._numbers = itertools.count()
        self.batches = 0  # encoder calls made, texts they encoded, and texts answered from the cache (/health)
        self.texts = 0
        self.cached = 0

    def embed_text(self, searcher: Searcher, text: str) -> np.ndarray:
        """The joint vector of `text` under `searcher`, as `searcher.embed_text` gives it.

        Raises:
            QueryError: an empty query.
        """
        if not text.strip():
            raise QueryError("the text query is empty")
        with self._queue_lock:
            if searcher not in self._searchers:
                self._searchers[searcher] = next(self._numbers)
            key = self._searchers[searcher], text
            vector = self._cache.get(key)
            if vector is not None:
                self._cache.move_to_end(key)
                self.cached += 1
                return vector
            job = _Job(searcher, text, key)
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
                vectors = list(jobs[0].searcher.embed_texts([job.text for job in jobs]))  # one row object each
            except BaseException as err:  # the batch's requests each get the error; this thread goes on
                for job in jobs:
                    job.done.set_exception(err)
                if not isinstance(err, Exception):
                    raise
                continue
            with self._queue_lock:
                self.batches, self.texts = self.batches + 1, self.texts + len(jobs)
                for job, vector in zip(jobs, vectors):
                    vector.setflags(write=False)  # shared by every request of this text
                    self._cache[job.key] = vector
                    self._cache.move_to_end(job.key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            for job, vector in zip(jobs, vectors):
                job.done.set_result(vector)


# Encoders are loaded once per process (`load_encoder`'s cache) and shared by every snapshot's Searcher, so one
# process-wide batcher encodes for all of them: whatever encodes a query in the service goes through it or holds
# its lock (a fast tokenizer, for one, refuses to be used from two threads at once).
QUERY_ENCODER = QueryEncoder()
