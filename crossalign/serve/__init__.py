"""Serve: a FastAPI service and web page over the Searcher (`crossalign serve`)."""

from crossalign.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):  # FastAPI loads only when the app is asked for
    if name == "create_app":
        from crossalign.serve.app import create_app

        return create_app
    raise AttributeError(name)
