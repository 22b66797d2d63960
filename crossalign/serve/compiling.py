"""The service's text query encoders, compiled in a background thread while the service already answers.

On a CPU a query's encoder call is small matrix products plus Python and framework overhead around them:
`torch.compile` removes part of that overhead (one Flickr8k caption through MiniLM + mpnet-base: 41.0 ms against
50.6 ms eager, side by side on 2 cores; `HFTextEncoder.compile_queries`, benchmarks/query_compile.py).
Compiling takes a minute or two, so the service does not wait for it: requests run on the eager encoders until
the compiled ones are swapped in. Encoders are shared by every snapshot's Searcher (loaded once per process), so
a table reload compiles nothing new; a mapper with other encoders gets its own compile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from crossalign.encoders.base import can_compile_on_cpu, resolve_runtime
from crossalign.search import Searcher
from crossalign.serve.config import ServeConfig

logger = logging.getLogger(__name__)


def should_compile_queries(config: ServeConfig) -> bool:
    """Whether the service compiles its text query encoders: "on", never for "off"; "auto" on the CPU where
    Inductor can build kernels (a C++ compiler and Python's headers)."""
    if config.compile != "auto":
        return config.compile == "on"
    return resolve_runtime(config.device).device.type == "cpu" and can_compile_on_cpu()


class QueryCompiler:
    """Compiles the text query encoder of each Searcher `submit`ted, one at a time, in a daemon thread.

    `status()` is what /health shows: the setting, the state ("off", "waiting", "compiling", "compiled",
    "eager": nothing to compile, "failed"), the seconds the last compile took and its error. A failure is
    logged, and the encoders stay eager until a restart (no new attempt on each table reload).
    """

    def __init__(self, config: ServeConfig) -> None:
        self.enabled, self.autotune, self.mode = should_compile_queries(config), config.autotune, config.compile
        self._queue: queue.Queue[Searcher | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.state = "waiting" if self.enabled else "off"
        self.seconds: float | None = None
        self.error: str | None = None

    def submit(self, searcher: Searcher) -> None:
        if self.enabled:
            self._queue.put(searcher)

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="crossalign-serve-compile", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Let the thread end after the compile under way (the process may exit before: it is a daemon)."""
        self._queue.put(None)

    def status(self) -> dict[str, Any]:
        return {"setting": self.mode, "state": self.state, "seconds": self.seconds, "error": self.error}

    def _run(self) -> None:
        while (searcher := self._queue.get()) is not None:
            if self.state == "failed":  # not again for each reload: the eager encoders serve until a restart
                continue
            if searcher.queries_compiled:  # a reload's Searcher: the encoders are shared, and compiled already
                self.state = "compiled"
                continue
            self.state, started = "compiling", time.perf_counter()
            logger.info("compiling the text query encoder in the background (requests run eagerly until then; "
                        "a minute or two the first time, less from Inductor's disk cache)")
            try:
                compiled = searcher.compile_queries(self.autotune)
            except Exception as err:  # noqa: BLE001 - any compiler failure: the eager encoders keep serving
                first_line = str(err).splitlines()[0] if str(err) else ""
                self.state, self.error = "failed", f"{type(err).__name__}: {first_line}"
                logger.warning("compiling the text query encoder failed; queries stay eager (%s)", self.error)
                continue
            finally:
                self.seconds = round(time.perf_counter() - started, 1)
            self.state = "compiled" if compiled else "eager"
            logger.info("text query encoder %s in %.0f s", "compiled" if compiled else "left eager (nothing to "
                        "compile)", self.seconds)
