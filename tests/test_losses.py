"""InfoNCE (eq. 1), CoSENT (eq. 2) and Matryoshka losses against naive references written here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conan_hf.losses import (
    PAPER_MATRYOSHKA_DIMS,
    CoSENTLoss,
    InfoNCELoss,
    MatryoshkaLoss,
    default_matryoshka_dims,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir))
    model.eval()  # deterministic forwards, so two computations of the same loss can be compared
    return model


def naive_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def naive_info_nce(q, docs, tau, valid=None, in_batch=True, offset=0, removed=()):
    """Eq. 1 with explicit loops. ``docs`` = [positives, negatives_1, ...] (each (N, d)); ``q`` holds the queries of
    rows offset..offset+len(q); ``valid`` (N, k) marks filled negative slots; ``removed`` lists (query, column, row)
    logits left out of the denominator."""
    losses = []
    for i in range(q.shape[0]):
        me = offset + i
        terms, positive = [], None
        for c, column in enumerate(docs):
            for j in range(column.shape[0]):
                if not in_batch and j != me:
                    continue
                if c > 0 and valid is not None and not valid[j, c - 1]:
                    continue
                if (i, c, j) in removed:
                    continue
                logit = naive_cos(q[i], column[j]) / tau
                if c == 0 and j == me:
                    positive = logit
                terms.append(logit)
        denominator = sum(torch.exp(t) for t in terms)
        losses.append(-torch.log(torch.exp(positive) / denominator))
    return sum(losses) / len(losses)


def random_embeddings(batch, num_negatives, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(2 + num_negatives)]


def dhnm_labels(batch, num_negatives, missing=()):
    labels = torch.empty(batch, 1 + num_negatives, dtype=torch.long)
    labels[:, 0] = torch.arange(100, 100 + batch)
    labels[:, 1:] = torch.arange(num_negatives)
    for row, slot in missing:
        labels[row, 1 + slot] = -1
    return labels


@pytest.mark.parametrize("temperature", [0.05, 0.02])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("batch,num_negatives", [(1, 0), (3, 0), (4, 1), (5, 7), (2, 3)])
def test_info_nce_matches_naive_value_and_gradients(st_model, batch, num_negatives, temperature, in_batch):
    emb = random_embeddings(batch, num_negatives, seed=batch * 10 + num_negatives)
    mine = [e.clone().requires_grad_() for e in emb]
    ref = [e.clone().requires_grad_() for e in emb]
    loss_fn = InfoNCELoss(st_model, temperature=temperature, in_batch_negatives=in_batch)
    loss = loss_fn.compute_loss_from_embeddings(mine, None)
    expected = naive_info_nce(ref[0], ref[1:], temperature, in_batch=in_batch)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    loss.backward()
    expected.backward()
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("in_batch", [True, False])
def test_empty_negative_slots_are_masked_out(st_model, in_batch):
    # Row 0 has no negatives at all, row 2 only its first of three: they train on what they have.
    batch, k = 4, 3
    missing = [(0, 0), (0, 1), (0, 2), (2, 1), (2, 2)]
    emb = random_embeddings(batch, k, seed=7)
    mine = [e.clone().requires_grad_() for e in emb]
    ref = [e.clone().requires_grad_() for e in emb]
    labels = dhnm_labels(batch, k, missing)
    valid = labels[:, 1:] >= 0
    loss = InfoNCELoss(st_model, temperature=0.02, in_batch_negatives=in_batch).compute_loss_from_embeddings(
        mine, labels
    )
    expected = naive_info_nce(ref[0], ref[1:], 0.02, valid=valid, in_batch=in_batch)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    loss.backward()
    expected.backward()
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)
    # The placeholder embeddings of empty slots get no gradient at all.
    assert torch.all(mine[2].grad[0] == 0) and torch.all(mine[3].grad[2] == 0)


def test_records_query_negative_cosines_per_example_and_negative_id(st_model):
    batch, k = 3, 2
    emb = [e.requires_grad_() for e in random_embeddings(batch, k, seed=3)]
    labels = dhnm_labels(batch, k, missing=[(1, 1)])
    loss_fn = InfoNCELoss(st_model)
    loss_fn.compute_loss_from_embeddings(emb, labels)
    (record,) = loss_fn.pop_hard_negative_scores()
    assert loss_fn.pop_hard_negative_scores() == []  # popping clears
    expected = {}
    for i in range(batch):
        for j in range(k):
            if labels[i, 1 + j] >= 0:
                expected[(int(labels[i, 0]), int(labels[i, 1 + j]))] = naive_cos(emb[0][i], emb[2 + j][i]).item()
    got = record.to_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6)
    assert math.isnan(record.scores[1, 1].item())
    assert record.dim == 16

    # Evaluation (no grad) and label-less calls record nothing.
    with torch.no_grad():
        loss_fn.compute_loss_from_embeddings(emb, labels)
    loss_fn.compute_loss_from_embeddings(emb, None)
    assert loss_fn.pop_hard_negative_scores() == []


def test_labels_that_are_not_dhnm_ids_are_rejected(st_model):
    emb = random_embeddings(2, 1)
    loss_fn = InfoNCELoss(st_model)
    with pytest.raises(ValueError, match="InfoNCELoss takes no labels"):
        loss_fn.compute_loss_from_embeddings(emb, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        loss_fn.compute_loss_from_embeddings(emb, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="in_batch_negatives=True"):
        InfoNCELoss(st_model, in_batch_negatives=False, gather_across_devices=True)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(st_model, temperature=0.0)


def _features(model, columns):
    return [model.preprocess(texts) for texts in columns]


COLUMNS = [
    ["the cat sat on the mat", "how tall is the tower", "rain is expected tomorrow", "buy two apples"],
    ["a cat is sitting on a mat", "the tower is 300 m tall", "tomorrow it will rain", "purchase a pair of apples"],
    ["the dog sat on the mat", "how old is the tower", "rain fell yesterday", "sell two apples"],
    ["a bird on a wire", "the bridge is long", "sunny weather", "two pears"],
]


def test_real_model_forward_equals_sentence_transformers_mnrl_and_gradcache(st_model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    def loss_and_grads(loss_fn, labels=None):
        st_model.zero_grad()
        loss = loss_fn(_features(st_model, COLUMNS), labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in st_model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    plain, plain_grads = loss_and_grads(InfoNCELoss(st_model, temperature=0.05))
    # Without empty slots, eq. 1 is exactly sentence-transformers' MNRL at scale = 1 / temperature.
    mnrl, mnrl_grads = loss_and_grads(MultipleNegativesRankingLoss(st_model, scale=20.0))
    cached_fn = InfoNCELoss(st_model, temperature=0.05, mini_batch_size=3)
    cached, cached_grads = loss_and_grads(cached_fn, dhnm_labels(4, 2))
    torch.testing.assert_close(plain, mnrl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, cached, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == mnrl_grads.keys() == cached_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(plain_grads[name], mnrl_grads[name], rtol=1e-4, atol=1e-6)
        # float32 sums in another order (mini-batches are padded to their own widths): allow rounding noise.
        torch.testing.assert_close(plain_grads[name], cached_grads[name], rtol=1e-3, atol=2e-5)
    (record,) = cached_fn.pop_hard_negative_scores()  # GradCache mode records too, once per batch
    assert record.scores.shape == (4, 2)


def _column_embeddings(model, columns):
    with torch.no_grad():
        return [model(features)["sentence_embedding"].double() for features in _features(model, columns)]


@pytest.mark.parametrize("matryoshka", [False, True])
def test_in_batch_false_negative_is_masked(st_model, matryoshka):
    # Row 2's hard negative is row 0's positive (as DHNM's pool negatives can be: the batch sampler cannot see them).
    columns = [list(c) for c in COLUMNS]
    columns[2][2] = columns[1][0]
    emb = _column_embeddings(st_model, columns)
    tau = 0.05
    # Naive eq. 1 without that logit for query 0: document column 1 (negative_1), row 2. No other query is affected.
    expected = naive_info_nce(emb[0], emb[1:], tau, removed={(0, 1, 2)})
    unmasked = naive_info_nce(emb[0], emb[1:], tau)
    assert abs(float(expected - unmasked)) > 1e-3  # the masking is visible in the value

    def make(mask=True):
        loss_fn = InfoNCELoss(st_model, temperature=tau, mask_false_negatives=mask)
        return loss_fn, (MatryoshkaLoss(st_model, loss_fn, [128, 16], [1.0, 0.0]) if matryoshka else loss_fn)

    inner, loss_fn = make()
    loss = loss_fn(_features(st_model, columns), None)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert inner.pop_masked_false_negatives() == 1  # one (query, document) pair, counted once per batch
    assert inner.pop_masked_false_negatives() == 0
    _, plain = make(mask=False)
    torch.testing.assert_close(plain(_features(st_model, columns), None).double(), unmasked, rtol=1e-5, atol=1e-5)
    # Texts that are not identical are not masked: the original batch has no duplicates.
    loss_fn(_features(st_model, COLUMNS), None)
    assert inner.pop_masked_false_negatives() == 0


def test_false_negatives_masked_in_gradcache_and_own_candidates(st_model):
    columns = [list(c) for c in COLUMNS]
    columns[2][2] = columns[1][0]  # another row's positive (in-batch duplicate)
    columns[3][1] = columns[1][1]  # row 1's own second negative equals its own positive
    emb = _column_embeddings(st_model, columns)
    expected = naive_info_nce(emb[0], emb[1:], 0.05, removed={(0, 1, 2), (1, 2, 1)})
    cached = InfoNCELoss(st_model, temperature=0.05, mini_batch_size=3)
    torch.testing.assert_close(cached(_features(st_model, columns), None).double(), expected, rtol=1e-5, atol=1e-5)
    assert cached.pop_masked_false_negatives() == 2
    # Classification form (own candidates only): only row 1's own duplicate is a candidate of its query.
    own = InfoNCELoss(st_model, temperature=0.05, in_batch_negatives=False)
    expected_own = naive_info_nce(emb[0], emb[1:], 0.05, in_batch=False, removed={(1, 2, 1)})
    torch.testing.assert_close(own(_features(st_model, columns), None).double(), expected_own, rtol=1e-5, atol=1e-5)
    assert own.pop_masked_false_negatives() == 1
    # Evaluation batches (no grad) are not counted.
    with torch.no_grad():
        own(_features(st_model, columns), None)
    assert own.pop_masked_false_negatives() == 0


@pytest.mark.parametrize("in_batch", [True, False])
def test_false_negative_margin_masks_negatives_close_to_the_positive(st_model, in_batch):
    # Hand-made unit vectors: query e0; positives at cosine 0.8 with their query; row 0's first negative at 0.85
    # (above its positive), row 1's at 0.75 (within a 0.1 margin of 0.8), the rest far below.
    def unit(cos, axis):
        v = torch.zeros(4, dtype=torch.float64)
        v[0], v[axis] = cos, math.sqrt(1 - cos * cos)
        return v

    queries = torch.stack([unit(1.0, 1), unit(1.0, 1)])
    positives = torch.stack([unit(0.8, 1), unit(0.8, 2)])
    negatives = torch.stack([unit(0.85, 3), unit(0.75, 3)])
    emb = [queries, positives, negatives]
    margin_masked = {(0, 1, 0), (1, 1, 1)}  # (query, document column, row): the two close negatives of own rows
    if in_batch:  # in-batch, each query also sees the other row's positive (0.8) and negative (0.75 / 0.85)
        margin_masked |= {(0, 0, 1), (0, 1, 1), (1, 0, 0), (1, 1, 0)}
    expected = naive_info_nce(queries, [positives, negatives], 0.05, in_batch=in_batch, removed=margin_masked)
    loss_fn = InfoNCELoss(st_model, temperature=0.05, in_batch_negatives=in_batch, false_negative_margin=0.1)
    loss = loss_fn.compute_loss_from_embeddings([e.clone() for e in emb], None)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    # Margin 0 keeps negatives below the positive: only row 0's (0.85 > 0.8) and, in-batch, row 1's (0.85 > 0.8).
    strict = InfoNCELoss(st_model, temperature=0.05, in_batch_negatives=in_batch, false_negative_margin=0.0)
    removed = {(0, 1, 0)} | ({(1, 1, 0)} if in_batch else set())
    torch.testing.assert_close(strict.compute_loss_from_embeddings([e.clone() for e in emb], None),
                               naive_info_nce(queries, [positives, negatives], 0.05, in_batch=in_batch,
                                              removed=removed), rtol=1e-10, atol=1e-10)
    assert InfoNCELoss(st_model).get_config_dict()["false_negative_margin"] is None  # off by default


def test_document_groups_are_exact_and_ignore_padding():
    from conan_hf.losses import document_groups

    first = {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    second = {"input_ids": torch.tensor([[7], [5]]), "attention_mask": torch.tensor([[1], [1]])}
    left = {"input_ids": torch.tensor([[0, 5, 6], [6, 5, 0]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 0]])}
    groups = document_groups([first, second, left]).tolist()
    # [5, 6] appears as first[0] and (left-padded) left[0]; [7] as first[1] and second[0] (other widths); [5] and
    # [6, 5] (same tokens, other order) are documents of their own.
    assert groups[0][0] == groups[2][0] and groups[0][1] == groups[1][0]
    assert len({groups[0][0], groups[0][1], groups[1][1], groups[2][1]}) == 4
    assert document_groups([{"sentence_embedding": torch.zeros(2, 3)}]) is None


def test_cosent_is_equation_2_on_hand_made_scores(st_model):
    # Pairs of 2-D unit vectors at chosen angles, so cos(x_i, y_i) is exactly the hand-made score.
    cosines = [0.9, 0.2, 0.5, -0.3, 0.2]
    labels = torch.tensor([1.0, 0.0, 0.6, 0.0, 0.3])
    x = torch.tensor([[1.0, 0.0]] * len(cosines), dtype=torch.float64)
    y = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines], dtype=torch.float64)
    for tau in (0.05, 0.02):
        loss = CoSENTLoss(st_model, scale=1 / tau).compute_loss_from_embeddings([x, y], labels)
        # eq. 2: log(1 + sum over pairs with label(i,j) > label(k,l) of exp((cos(k,l) - cos(i,j)) / tau))
        total = 1.0
        for i in range(len(cosines)):
            for k in range(len(cosines)):
                if labels[i] > labels[k]:
                    total += math.exp((cosines[k] - cosines[i]) / tau)
        assert loss.item() == pytest.approx(math.log(total), rel=1e-9)
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss as STCoSENTLoss

    assert CoSENTLoss is STCoSENTLoss  # re-exported: sentence-transformers' class is eq. 2


def test_default_matryoshka_dims():
    assert default_matryoshka_dims(3584) == PAPER_MATRYOSHKA_DIMS == (256, 512, 1024, 1536, 2048, 3072, 3584)
    assert default_matryoshka_dims(4096) == (256, 512, 1024, 1536, 2048, 3072, 3584, 4096)
    assert default_matryoshka_dims(1024) == (16, 32, 64, 128, 256, 512, 1024)
    assert default_matryoshka_dims(384) == (24, 48, 96, 192, 384)
    assert default_matryoshka_dims(128) == (16, 32, 64, 128)
    assert default_matryoshka_dims(24) == (24,)
    with pytest.raises(ValueError):
        default_matryoshka_dims(0)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_matryoshka_sums_weighted_per_dim_losses(st_model, mini_batch_size):
    dims, weights = (128, 64, 32), (1.0, 0.5, 0.25)
    inner = InfoNCELoss(st_model, temperature=0.05, mini_batch_size=mini_batch_size)
    loss_fn = MatryoshkaLoss(st_model, inner, matryoshka_dims=dims, matryoshka_weights=weights)
    labels = dhnm_labels(4, 2)
    st_model.zero_grad()
    loss = loss_fn(_features(st_model, COLUMNS), labels)
    loss.backward()
    with torch.no_grad():
        full = [st_model(f)["sentence_embedding"].double() for f in _features(st_model, COLUMNS)]
    expected = sum(
        w * naive_info_nce(*(lambda e: (e[0], e[1:]))([F.normalize(x[:, :d], dim=-1) for x in full]), 0.05)
        for d, w in zip(dims, weights)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    records = inner.pop_hard_negative_scores()
    assert len(records) == 1 and records[0].dim == 128  # only the full-dimension scores are kept for DHNM
    expected_scores = torch.stack([F.cosine_similarity(full[0], full[2 + j]) for j in range(2)], dim=1)
    torch.testing.assert_close(records[0].scores.double(), expected_scores, rtol=1e-5, atol=1e-5)
    assert loss_fn.get_config_dict()["matryoshka_dims"] == dims

    default = MatryoshkaLoss(st_model, InfoNCELoss(st_model))
    assert default.matryoshka_dims == (128, 64, 32, 16)  # derived from the 128-dim tiny model, largest first


def test_get_config_dicts(st_model):
    config = InfoNCELoss(st_model, temperature=0.02, in_batch_negatives=False).get_config_dict()
    assert config["temperature"] == pytest.approx(0.02)
    assert config["in_batch_negatives"] is False and config["similarity_fct"] == "cos_sim"
    assert InfoNCELoss(st_model, mini_batch_size=8).get_config_dict()["mini_batch_size"] == 8
    assert CoSENTLoss(st_model).get_config_dict()["scale"] == 20.0


GATHER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer
    from conan_hf.losses import InfoNCELoss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = SentenceTransformer(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(4)]  # 2 ranks x 3 rows, k=2
    labels = torch.zeros(6, 3, dtype=torch.long)
    labels[:, 0] = torch.arange(6)
    labels[:, 1:] = torch.tensor([0, 1])
    labels[4, 2] = -1  # an empty slot on rank 1 must be masked for rank 0's queries too
    local = slice(3 * rank, 3 * rank + 3)
    emb = [x[local].clone().requires_grad_() for x in full]
    loss = InfoNCELoss(model, temperature=0.05, gather_across_devices=True).compute_loss_from_embeddings(
        emb, labels[local]
    )
    loss.backward()
    out = {"loss": loss.item(), "grads": [e.grad.tolist() for e in emb]}

    # False negatives across ranks: documents are token-id rows; row 4's first negative (on rank 1) has the token ids
    # of row 0's positive (on rank 0), padded differently. document_groups gathers them so both ranks agree.
    from conan_hf.losses import document_groups
    tokens = [[[10 + 6 * c + r, 1] for r in range(6)] for c in range(3)]  # (column, row) -> unique ids
    tokens[1][4] = [10 + 0, 1]  # negative_1 of row 4 == positive of row 0
    columns = [{"input_ids": torch.tensor([t + [0] for t in tokens[c][local]]),
                "attention_mask": torch.tensor([[1, 1, 0]] * 3)} for c in range(3)]
    columns[1]["input_ids"][:, 2] = 7 if rank == 1 else 0  # padding content must not matter
    groups = document_groups(columns, gather=True)
    masking = InfoNCELoss(model, temperature=0.05, gather_across_devices=True)
    masked = masking.compute_loss_from_embeddings([x[local].clone() for x in full], labels[local],
                                                  document_groups=groups)
    out.update(masked_loss=masked.item(), groups=groups.tolist())
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_cross_device_negatives_two_processes(tmp_path, tiny_model_dir):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tiny_model_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(6, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]
    valid = torch.ones(6, 2, dtype=torch.bool)
    valid[4, 1] = False
    per_rank = [naive_info_nce(full[0][3 * r : 3 * r + 3], full[1:], 0.05, valid=valid, offset=3 * r) for r in (0, 1)]
    # Each rank's loss scores its own queries against all 6 rows' documents; the all-gather sends every rank's
    # gradient back to the documents' owner, so the local gradients are those of the sum of both losses.
    sum(per_rank).backward()
    # Row 0's query (rank 0) loses the logit of row 4's first negative, a copy of its positive held by rank 1.
    masked = [naive_info_nce(full[0][3 * r: 3 * r + 3].detach(), [c.detach() for c in full[1:]], 0.05, valid=valid,
                             offset=3 * r, removed={(0, 1, 4)} if r == 0 else set()) for r in (0, 1)]
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["groups"][1][4] == got["groups"][0][0]  # identical across ranks, ignoring padding
        assert len({g for column in got["groups"] for g in column}) == 17  # 18 documents, one duplicate
        assert got["masked_loss"] == pytest.approx(masked[r].item(), rel=1e-9)
        assert got["loss"] == pytest.approx(per_rank[r].item(), rel=1e-9)
        for column, grad in zip(full, got["grads"]):
            torch.testing.assert_close(torch.tensor(grad, dtype=torch.float64), column.grad[3 * r : 3 * r + 3])
