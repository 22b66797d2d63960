"""Search: text -> image and image -> text over the LanceDB tables."""

from crossalign.search.search import QueryError, Searcher, SearchHit, search_text

__all__ = ["QueryError", "SearchHit", "Searcher", "search_text"]
