"""What a terminal shows of a failed run: the error once, from whoever called the flow, not Prefect's records of it.

A failure inside a run is logged with its traceback by the task, again by each flow around it, and once
more as each run's final state. The run's logs (the Prefect UI, `prefect flow-run logs`) keep all of that;
`quiet_run_failures` keeps it off the console, where the caller reports the error itself (the CLI: one line
for an error the user can fix, Python's traceback for a bug).
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class RunFailureFilter(logging.Filter):
    """Drops a run's records of its failure (errors, tracebacks, the final Failed state) while `quiet` is set."""

    quiet = True

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.quiet or not record.name.startswith(RUN_LOGGERS):
            return True
        failed = record.levelno >= logging.ERROR or record.getMessage().startswith("Finished in state Failed")
        return not failed and record.exc_info is None


def quiet_run_failures(quiet: bool = True) -> None:
    """Keep runs' failure records off Prefect's console handlers (`quiet`), or show them again.

    Call it after Prefect configured its logging (importing `flows` does); the run logs are untouched.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            found = [f for f in handler.filters if isinstance(f, RunFailureFilter)]
            run_filter = found[0] if found else RunFailureFilter()
            if not found:
                handler.addFilter(run_filter)
            run_filter.quiet = quiet
