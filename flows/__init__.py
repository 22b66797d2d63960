"""Prefect flows: thin orderings of crossalign library calls (the only Prefect code in the project)."""

import os

# Offline-friendly defaults; a user's own settings win.
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "crossalign",
}.items():
    os.environ.setdefault(_key, _value)
