"""The embedding cache of an evaluation run: mteb's ``NumpyCache`` (texts already embedded for a task are not encoded
again, e.g. the one corpus of every language subset of the cross-lingual task, :mod:`conan_hf.eval.xling`) without
its warnings about expected situations:

- a text that occurs twice among the texts of one ``encode`` call (the same question asked twice) is stored once; the
  stock cache stores it twice, warning "Hash collision or duplicate item" for each repeat;
- a cache folder that is still empty is a fresh cache; the stock cache warns "Dimension file not found" and "No
  existing files found" when it opens one.

Example::

    >>> from mteb.models.cache_wrappers import CachedEmbeddingWrapper
    >>> encoder = CachedEmbeddingWrapper(model, "cache/", cache_backend=EmbeddingCache)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from mteb._content_hashes import hash_item
from mteb.models.cache_wrappers.cache_backends.numpy_cache import NumpyCache

__all__ = ["EmbeddingCache"]


class EmbeddingCache(NumpyCache):
    """mteb's ``NumpyCache`` that stores each distinct item once and opens an empty folder as a fresh cache."""

    def add(self, items: list[dict[str, Any]], vectors: Any) -> None:
        """Store the vectors of the items not stored yet (the first of repeated items)."""
        seen = set(self.hash_to_index)
        keep = []
        for index, item in enumerate(items):
            item_hash = hash_item(item)
            if item_hash not in seen:
                seen.add(item_hash)
                keep.append(index)
        if keep:
            super().add([items[i] for i in keep], vectors[keep])

    def load(self) -> None:
        """Read the stored cache; nothing to read in a fresh (empty) folder."""
        if self.dimension_file.exists() or self.index_file.exists() or self.vectors_file.exists():
            super().load()
