"""Prefect flows: thin orderings of crossalign library calls (the only Prefect code in the project)."""

import logging
import os

# Offline-friendly defaults; a user's own settings win. Set before Prefect is imported: it reads them then.
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # The library's log records (what was encoded, skipped, rejected) go to the run logs in the UI ...
    "PREFECT_LOGGING_EXTRA_LOGGERS": "crossalign",
    # ... and library calls outside any run (the CLI's search) stay quiet instead of warning each time.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ.setdefault(_key, _value)

from prefect.logging.configuration import ensure_logging_setup  # noqa: E402 - after the settings above

ensure_logging_setup()  # once per process, from the settings above

_library_logger, _extra_logger = logging.getLogger("crossalign"), logging.getLogger("prefect.extra")
if "crossalign" in os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(","):
    # Prefect gives extra loggers its API handler but not its level (PREFECT_LOGGING_LEVEL, INFO by default):
    # without it the library's INFO records (what was encoded, skipped, written) would never reach a run's logs.
    if _library_logger.level == logging.NOTSET:
        _library_logger.setLevel(_extra_logger.level)
    for _handler in _extra_logger.handlers:  # Prefect was imported before this package set the variable
        if _handler not in _library_logger.handlers:
            _library_logger.addHandler(_handler)
