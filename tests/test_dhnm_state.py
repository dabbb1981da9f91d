"""DHNM state: NegativePool.state_dict round trips, the callback's binary state file, legacy JSON states,
compactness and the content fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import dhnm_helpers
import numpy as np
import pytest

from conan_hf.dhnm import (
    DHNM_STATE_NAME,
    DHNMCallback,
    NegativePool,
)

st_model = dhnm_helpers.st_model  # the module-scoped SentenceTransformer fixture


def _played_pool():
    """A pool after one step: "a" had slot 0 replaced (not carried yet); "b" has one candidate only."""
    pool = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    pool.apply_scores([0, 1], [[0, 1], [0, -1]], [[0.2, 0.9], [0.5, np.nan]])
    return pool


# The state of _played_pool() as the earlier in-memory arrays (int64 ranks, float64 S0, one bool per slot) held it,
# worked out by hand from eq. 6: a/slot 0 (S0 0.2 < 0.4) -> candidate 2, S0 reset; a/slot 1 keeps S0 0.9;
# b/slot 0 keeps S0 0.5 (0.5 >= 0.4, no drop).
PLAYED_ACTIVE = [[2, 1], [0, -1]]
PLAYED_S0 = [[np.nan, 0.9], [0.5, np.nan]]
PLAYED_CURSOR = [3, 1]
PLAYED_FRESH = [[True, False], [False, False]]


def assert_played_state(pool):
    np.testing.assert_array_equal(pool.active.astype(np.int64), np.array(PLAYED_ACTIVE, dtype=np.int64))
    np.testing.assert_array_equal(pool.s0, np.array(PLAYED_S0, dtype=np.float64))
    np.testing.assert_array_equal(pool.cursor.astype(np.int64), np.array(PLAYED_CURSOR, dtype=np.int64))
    assert pool.fresh.tolist() == PLAYED_FRESH


def test_pool_state_roundtrip_and_mismatch():
    pool = _played_pool()
    assert_played_state(pool)
    state = pool.state_dict()
    other = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    other.load_state_dict(state)
    assert_played_state(other)
    # load_state_dict copies by default: the two pools do not share state.
    pool.apply_scores([1], [[0, -1]], [[0.1, np.nan]])
    assert pool.active.tolist() == [[2, 1], [0, -1]] and pool.cursor.tolist() == [3, 1]  # "b" exhausted: stays
    assert np.isnan(other.s0[1, 1]) and other.s0[1, 0] == 0.5
    pool.apply_scores([0], [[2, 1]], [[0.95, 0.9]])
    assert pool.fresh.tolist() == [[False, False], [False, False]] and other.fresh.tolist() == PLAYED_FRESH
    with pytest.raises(ValueError, match="belongs to other pools"):
        NegativePool(["a", "b"], [["n0", "n1", "CHANGED"], ["m0"]], k=2).load_state_dict(state)
    with pytest.raises(ValueError, match="belongs to other pools"):
        NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=3).load_state_dict(state)


def _legacy_state(version, fingerprint):
    """A version-1/2 pool state exactly as earlier releases wrote it into dhnm_state.json (JSON lists)."""
    state = {"version": version, "num_examples": 2, "k": 2, "fingerprint": fingerprint,
             "active": PLAYED_ACTIVE, "s0": [[None, 0.9], [0.5, None]], "cursor": PLAYED_CURSOR}
    if version == 2:
        state["fresh"] = [0]  # flat index of a/slot 0
    return state


def test_callback_saves_binary_state_atomically_and_loads_it(st_model, tmp_path):
    from conan_hf.losses import InfoNCELoss

    pool = _played_pool()
    callback = DHNMCallback(pool, InfoNCELoss(st_model))
    callback.totals["replaced"] = 1
    path = callback.save(tmp_path, global_step=7)
    assert Path(path).name == DHNM_STATE_NAME == "dhnm_state.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dhnm_state.npz"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as saved:  # plain arrays in compact dtypes, no pickled objects
        assert saved["active"].dtype == np.int16 and saved["cursor"].dtype == np.int16
        assert saved["s0"].dtype == np.float64 and saved["fresh_bits"].dtype == np.uint8
        assert saved["fresh_bits"].tolist() == [[1], [0]]  # bit 0 = slot 0 of "a"
        meta = json.loads(str(saved["meta"]))
    assert meta["global_step"] == 7 and meta["totals"]["replaced"] == 1 and meta["pool"]["version"] == 3

    resumed = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    resumed_cb = DHNMCallback(resumed, InfoNCELoss(st_model))
    resumed_cb.load(tmp_path, expected_step=7)
    assert_played_state(resumed)
    assert resumed_cb.totals["replaced"] == 1
    with pytest.raises(ValueError, match="step 7, but training resumes at step 8"):
        resumed_cb.load(tmp_path, expected_step=8)


@pytest.mark.parametrize("version", [1, 2])
def test_callback_loads_legacy_json_state(st_model, tmp_path, version):
    from conan_hf.losses import InfoNCELoss

    pool = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    legacy = {"global_step": 4, "thresholds": {"s0_min": 0.4, "drop_ratio": 1.2, "s_max": 0.7},
              "totals": {"checked": 3, "replaced": 1}, "pool": _legacy_state(version, pool.fingerprint())}
    (tmp_path / "dhnm_state.json").write_text(json.dumps(legacy))
    callback = DHNMCallback(pool, InfoNCELoss(st_model))
    callback.load(tmp_path, expected_step=4)
    np.testing.assert_array_equal(pool.active, PLAYED_ACTIVE)
    np.testing.assert_array_equal(pool.s0, np.array(PLAYED_S0))
    np.testing.assert_array_equal(pool.cursor, PLAYED_CURSOR)
    # Version 1 predates the "fresh" flags: no replacement is known to be pending.
    assert pool.fresh.tolist() == (PLAYED_FRESH if version == 2 else [[False, False], [False, False]])
    assert callback.totals["checked"] == 3 and callback.totals["replaced"] == 1 and callback.totals["used"] == 0
    assert pool.active.dtype == np.int16  # converted to the compact dtypes
    # It then trains on exactly like a pool that made those decisions itself.
    reference = _played_pool()
    if version == 1:
        reference.fresh_bits[:] = 0
    for p in (pool, reference):
        p.apply_scores([0, 1], [[2, 1], [0, -1]], [[0.3, 0.6], [0.45, np.nan]])
    for name in ("active", "s0", "cursor", "fresh_bits"):
        np.testing.assert_array_equal(getattr(pool, name), getattr(reference, name))


def test_pool_state_is_compact():
    n, k = 1000, 7
    pool = NegativePool(list(range(n)), [["t"] * 9] * n, k=k)
    # int16 ranks (active, cursor, pool_sizes), float64 S0, one bit per "fresh" flag: 14 + 56 + 2 + 2 + 1 bytes.
    assert pool.state_nbytes() == n * (2 * k + 8 * k + 2 + 2 + 1) == 75 * n
    assert pool.active.dtype == pool.cursor.dtype == pool.pool_sizes.dtype == np.int16
    assert pool.fresh_bits.shape == (n, 1)
    big = NegativePool(["x", "y"], [["t"] * 40_000, ["u"]], k=9)  # ranks past int16: int32, 2 flag bytes
    assert big.active.dtype == np.int32 and big.fresh_bits.shape == (2, 2)
    assert big.state_nbytes() == 2 * (4 * 9 + 8 * 9 + 4 + 4 + 2)
    big.apply_scores([0], [[0, 1, 2, 3, 4, 5, 6, 7, 8]], [[0.1] * 9])  # all nine slots: flags across two bytes
    assert big.fresh.tolist() == [[True] * 9, [False] * 9] and big.cursor.tolist() == [18, 1]
    assert big.active[0].tolist() == list(range(9, 18))


def test_fingerprint_follows_content_not_chunking_and_old_states_still_load(st_model, tmp_path):
    import hashlib

    import pyarrow as pa

    from conan_hf.losses import InfoNCELoss

    ids = np.array([[2, 0], [1, -1]])
    one = NegativePool.from_ids(None, ids, pa.array(["t0", "t1", "t2"]), k=2)
    chunked = NegativePool.from_ids(None, ids, pa.chunked_array([["t0"], ["t1", "t2"]]), k=2)
    assert one.fingerprint() == chunked.fingerprint()
    assert NegativePool.from_ids(None, ids, pa.array(["t0", "t1", "tX"]), k=2).fingerprint() != one.fingerprint()
    assert NegativePool.from_ids(None, ids[::-1].copy(), pa.array(["t0", "t1", "t2"]), k=2).fingerprint() != \
        one.fingerprint()
    # A dhnm_state.npz of the previous release: its fingerprint is sha256 over k, then per example repr(id), NUL,
    # the candidate texts joined by \x1f, \x1e (recomputed here by hand for _played_pool's data).
    old = hashlib.sha256(b"2")
    for example_id, texts in (("a", ["n0", "n1", "n2"]), ("b", ["m0"])):
        old.update(repr(example_id).encode() + b"\x00" + "\x1f".join(texts).encode() + b"\x1e")
    played = _played_pool()
    callback = DHNMCallback(played, InfoNCELoss(st_model))
    callback.save(tmp_path, global_step=2)
    with np.load(tmp_path / DHNM_STATE_NAME) as saved:
        arrays = {name: saved[name] for name in saved.files}
    meta = json.loads(str(arrays.pop("meta")))
    assert meta["pool"]["fingerprint"].startswith("ids-v1:")
    meta["pool"]["fingerprint"] = old.hexdigest()
    with open(tmp_path / DHNM_STATE_NAME, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    resumed = NegativePool(["a", "b"], [["n0", "n1", "n2"], ["m0"]], k=2)
    DHNMCallback(resumed, InfoNCELoss(st_model)).load(tmp_path, expected_step=2)
    assert_played_state(resumed)
    with pytest.raises(ValueError, match="belongs to other pools"):
        DHNMCallback(NegativePool(["a", "b"], [["n0", "n1", "nX"], ["m0"]], k=2), InfoNCELoss(st_model)).load(
            tmp_path)
