"""Persistence of a :class:`~conan_hf.dhnm.pool.NegativePool`'s DHNM state: its fingerprint (a saved state only
loads into the same pools) and ``state_dict`` / ``load_state_dict``. :class:`~conan_hf.dhnm.callback.DHNMCallback`
writes the state into every Trainer checkpoint as :data:`DHNM_STATE_NAME`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["DHNM_STATE_NAME", "FALSE_NEGATIVES_STATE_NAME", "LEGACY_DHNM_STATE_NAME", "NegativePoolStateMixin"]

#: File written into each Trainer checkpoint folder (``checkpoint-<step>/``) with the pool state: an uncompressed
#: numpy ``.npz`` (the state arrays in their compact dtypes plus a ``meta`` JSON string), written atomically.
DHNM_STATE_NAME = "dhnm_state.npz"
#: The JSON state file of earlier versions (state versions 1 and 2); still read when resuming from such a checkpoint.
LEGACY_DHNM_STATE_NAME = "dhnm_state.json"
#: File written into each Trainer checkpoint folder with the running count of masked in-batch false negatives.
FALSE_NEGATIVES_STATE_NAME = "false_negatives_state.json"
_STATE_VERSION = 3  # 3: numpy arrays (.npz); 1 and 2: JSON lists (dhnm_state.json), still loaded
_STATE_ARRAYS = ("active", "s0", "cursor", "fresh_bits")
#: Arrays a version-3 state may lack (saved by earlier releases): ``easy_keys`` (which fresh replacements the
#: "became easy" clause made; missing: none, all pending replacements count as made by the S0 clause).
_OPTIONAL_STATE_ARRAYS = ("easy_keys",)
#: Prefix of the fingerprint of pools held as row ids (earlier states carry a bare sha256 hex of the texts).
_FINGERPRINT_PREFIX = "ids-v1:"


class NegativePoolStateMixin:
    """Fingerprint and state (de)serialisation of :class:`~conan_hf.dhnm.pool.NegativePool` (which it is mixed
    into: it reads the pool's ``k``, ``ids``, ``candidate_ids``, text table and state arrays)."""

    def fingerprint(self) -> str:
        """Hash of the ids, candidate ids, text table and ``k``: a saved state only loads into the same pools.

        ``sha256`` over ``k``, the number of examples, the ids (their ``repr``; nothing for row-index ids), the
        candidate ids (as little-endian ``int64``) and the text table's content (every text's length and bytes,
        independent of how the table is chunked). Computed once (the pools never change): at 10M examples
        ``benchmarks/scale.py`` reports the time.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{_FINGERPRINT_PREFIX}k={self.k};n={len(self)};".encode())
            if self.ids is None:
                digest.update(b"ids=row index;")
            else:
                for start in range(0, len(self), 65536):
                    digest.update("\x00".join(map(repr, self.ids[start:start + 65536])).encode() + b"\x00")
            digest.update(f"candidates={self.candidate_ids.shape[1]};".encode())
            for start in range(0, len(self), 1 << 18):
                digest.update(np.ascontiguousarray(self.candidate_ids[start:start + (1 << 18)], dtype="<i8").data)
            digest.update(self._texts.content_digest())
            self._fingerprint = f"{_FINGERPRINT_PREFIX}{digest.hexdigest()}"
        return self._fingerprint

    def legacy_fingerprint(self) -> str:
        """The fingerprint of earlier versions (the ids' ``repr`` and every candidate's text, example by example),
        which states saved before candidates were row ids carry; row-index ids count as the ints ``0 .. n-1``.
        O(examples x candidates) in Python: computed only to check such a state."""
        digest = hashlib.sha256()
        digest.update(str(self.k).encode())
        ids = self.ids if self.ids is not None else range(len(self))
        for example_id, pool in zip(ids, self.candidates):
            digest.update(repr(example_id).encode())
            digest.update(b"\x00")
            digest.update("\x1f".join(pool).encode())
            digest.update(b"\x1e")
        return digest.hexdigest()

    def _matches_fingerprint(self, saved: str) -> bool:
        if saved == self.fingerprint():
            return True
        return not str(saved).startswith(_FINGERPRINT_PREFIX) and saved == self.legacy_fingerprint()

    def state_dict(self) -> dict[str, Any]:
        """The state: metadata plus the live state arrays (not copies; ``DHNMCallback.save`` writes them as is).

        Version 3. ``fresh_bits`` is the bit-packed ``fresh`` flag array (little bit order, slot ``j`` of an example
        is bit ``j % 8`` of byte ``j // 8``); ``easy_keys`` the sorted ``row * k + slot`` of the fresh slots whose
        replacement the "became easy" clause of eq. 6 made.
        """
        return {
            "version": _STATE_VERSION,
            "num_examples": len(self),
            "k": self.k,
            "fingerprint": self.fingerprint(),
            "active": self.active,
            "s0": self.s0,
            "cursor": self.cursor,
            "fresh_bits": self.fresh_bits,
            "easy_keys": self.easy_keys,
        }

    def load_state_dict(self, state: dict[str, Any], copy: bool = True) -> None:
        """Restore :meth:`state_dict` output (version 3, arrays) or a version 1/2 JSON state (lists, from
        ``dhnm_state.json`` of earlier releases); raises ``ValueError`` if it was saved for different pools.

        Args:
            state: the state.
            copy: copy version-3 arrays (``False`` adopts them when their dtype and shape already match, e.g. arrays
                just read from a file, to avoid a second copy of the state at 10M examples).
        """
        version = state.get("version")
        if version not in (1, 2, _STATE_VERSION):
            raise ValueError(f"unsupported DHNM state version {version!r} (expected 1, 2 or {_STATE_VERSION})")
        if state["num_examples"] != len(self) or state["k"] != self.k or not self._matches_fingerprint(
                state["fingerprint"]):
            raise ValueError(
                f"the saved DHNM state belongs to other pools ({state['num_examples']} examples, k={state['k']}) than "
                f"this NegativePool ({len(self)} examples, k={self.k}) or their ids/candidates differ; build the pool "
                "from the same data and k as the interrupted run"
            )
        shape, rank_dtype = (len(self), self.k), self.active.dtype
        if version == _STATE_VERSION:
            arrays = {
                "active": (state["active"], rank_dtype, shape),
                "s0": (state["s0"], np.float64, shape),
                "cursor": (state["cursor"], rank_dtype, (len(self),)),
                "fresh_bits": (state["fresh_bits"], np.uint8, self.fresh_bits.shape),
            }
            loaded = {}
            for name, (value, dtype, expected) in arrays.items():
                value = np.asarray(value)
                if value.shape != expected:
                    raise ValueError(f"DHNM state array {name!r} has shape {value.shape}, expected {expected}")
                if value.dtype.kind != np.dtype(dtype).kind:
                    raise ValueError(f"DHNM state array {name!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
                loaded[name] = np.array(value, dtype=dtype, copy=True if copy else None)
            self.active, self.s0, self.cursor = loaded["active"], loaded["s0"], loaded["cursor"]
            self.fresh_bits = loaded["fresh_bits"]
            easy = np.array(state.get("easy_keys", ()), dtype=np.int64).reshape(-1)
            if easy.size and (easy.min() < 0 or easy.max() >= len(self) * self.k or np.any(np.diff(easy) <= 0)):
                raise ValueError("DHNM state array 'easy_keys' must hold sorted, distinct row * k + slot keys")
            self.easy_keys = easy
            return
        # Versions 1 and 2: JSON lists, S0 NaN as null, `fresh` as flat indices into (num_examples, k).
        self.active = np.asarray(state["active"], dtype=np.int64).reshape(shape).astype(rank_dtype)
        self.s0 = np.asarray(
            [[np.nan if v is None else v for v in row] for row in state["s0"]], dtype=np.float64
        ).reshape(shape)
        self.cursor = np.asarray(state["cursor"], dtype=np.int64).astype(rank_dtype)
        # Version 1 states predate the used counter: their pending replacements are not known, none is counted.
        fresh = np.zeros(shape, dtype=bool)
        fresh.reshape(-1)[np.asarray(state.get("fresh", []), dtype=np.int64)] = True
        self.fresh_bits = np.packbits(fresh, axis=1, bitorder="little")
        self.easy_keys = np.zeros(0, dtype=np.int64)
