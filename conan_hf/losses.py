"""Training losses of Conan-Embedding-v2 (arXiv 2509.12892, §3.4 and App. A), on sentence-transformers.

- :class:`InfoNCELoss` — eq. 1, contrastive loss with in-batch negatives plus the example's hard negatives. It
  records the query–hard-negative cosine scores it has already computed, keyed by (example id, negative id), so
  that Dynamic Hard Negative Mining (:mod:`conan_hf.dhnm`) can read them without another forward pass; what it
  reads and writes is the contract of :mod:`conan_hf.dhnm.contract` (it is a ``HardNegativeScoreSource``).
- :class:`CoSENTLoss` — eq. 2, the ranking loss for score-labelled pairs. sentence-transformers' class computes
  exactly the paper's formula (``scale = 1 / τ``), so it is re-exported unchanged (``tests/test_losses.py`` proves it).
- :class:`MatryoshkaLoss` — sentence-transformers' Matryoshka wrapper with the paper's default dimensions
  (App. A), derived automatically for smaller models by :func:`default_matryoshka_dims`.

All three are ordinary sentence-transformers losses: pass them to ``SentenceTransformerTrainer(loss=...)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import (
    CachedLossMixin,
    _validate_mini_batch_num_tokens,
    has_static_embedding_input,
)
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as _STMatryoshkaLoss
from sentence_transformers.util import (
    all_gather,
    all_gather_with_grad,
    cos_sim,
    dot_score,
    get_rank,
    pairwise_cos_sim,
    pairwise_dot_score,
    similarity_fct_name,
)
from torch import Tensor, nn

from conan_hf.dhnm.contract import HardNegativeScores, split_dhnm_labels

__all__ = [
    "CoSENTLoss",
    "HardNegativeScores",
    "InfoNCELoss",
    "MatryoshkaLoss",
    "PAPER_MATRYOSHKA_DIMS",
    "default_matryoshka_dims",
    "document_groups",
]

CONAN_CITATION = """
@misc{li2025conanembeddingv2,
    title={Conan-Embedding-v2: Training an LLM from Scratch for Text Embeddings},
    author={Shiyu Li and Yang Tang and Ruijie Liu and Shi-Zhe Chen and Xi Chen},
    year={2025},
    eprint={2509.12892},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""

# Pairwise counterparts of the matrix similarity functions, for the "no in-batch negatives" variant which only
# compares each query with its own candidates.
_PAIRWISE = {cos_sim: pairwise_cos_sim, dot_score: pairwise_dot_score}


class InfoNCELoss(CachedLossMixin, MultipleNegativesRankingLoss):
    def __init__(
        self,
        model: nn.Module,
        temperature: float = 0.05,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        in_batch_negatives: bool = True,
        gather_across_devices: bool = False,
        mini_batch_size: int | None = None,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        record_scores: bool = True,
        max_buffered_scores: int = 4096,
        mask_false_negatives: bool = True,
        false_negative_margin: float | None = None,
    ) -> None:
        r"""InfoNCE loss of Conan-Embedding-v2, eq. 1:

        .. math::

            \mathcal{L} = -\frac{1}{B}\sum_i \log \frac{\exp(s(q_i, d_i^+)/\tau)}
                {\exp(s(q_i, d_i^+)/\tau) + \sum_{n \in \mathcal{N}_i} \exp(s(q_i, n)/\tau)}

        with :math:`s` the cosine similarity and :math:`\mathcal{N}_i` the hard negatives of query :math:`i` (the
        paper uses 7) plus, with ``in_batch_negatives=True``, every other document of the batch (the other
        positives and their hard negatives; across all devices with ``gather_across_devices=True``).

        With ``in_batch_negatives=False`` each query is scored only against its own candidates: this is the
        paper's classification form, where a row is (text, positive label text, negative label text(s)) and
        other rows' labels must not act as negatives (they are often the same label).

        The logits are those of sentence-transformers' :class:`MultipleNegativesRankingLoss` (``scale = 1 / τ``,
        joint ``query_to_doc`` softmax); this class adds the score record for DHNM, masking of empty negative
        slots, the classification variant and a GradCache mode (``mini_batch_size``), which reuses
        sentence-transformers' :class:`CachedLossMixin` (as :class:`CachedMultipleNegativesRankingLoss` does).

        **Score record for DHNM.** When the labels carry ids — an integer tensor ``(batch, 1 + num_negatives)`` with
        the example id in column 0 and the id of the negative in each negative column (``-1`` = empty slot), as
        produced by :class:`conan_hf.dhnm.DHNMDataCollator` — every training-time call appends a
        :class:`HardNegativeScores` to a buffer read with :meth:`pop_hard_negative_scores`. The scores are the
        cosine similarities of each query with its own hard negatives, computed from the embeddings the loss
        already has (no extra forward pass). Empty slots are masked out of the softmax (their logit is
        :math:`-\infty`), so an example with fewer negatives than columns is trained on the ones it has.

        **In-batch false negatives.** A document of the batch whose model input is identical to query :math:`i`'s
        positive — the same token ids, e.g. another row's hard negative that is this row's positive text — is a
        copy of the positive, not a negative: with ``mask_false_negatives=True`` (default) it is removed from query
        :math:`i`'s denominator (logit :math:`-\infty`), so :math:`\mathcal{N}_i` holds only documents that differ from
        :math:`d_i^+`. Nothing else changes: without such duplicates the loss is exactly eq. 1. Identity is exact:
        the unpadded ``input_ids`` of every document are compared (across devices with ``gather_across_devices``).
        The number of masked (query, document) pairs of each training batch is counted; read it with
        :meth:`pop_masked_false_negatives` (``conan_hf.dhnm.FalseNegativeCountCallback`` logs it). The
        sentence-transformers batch samplers cannot prevent these duplicates when hard negatives are added at
        collate time (DHNM's pools), which is why the loss handles them.

        **Optional score margin** (``false_negative_margin``, off by default): additionally mask every negative whose
        similarity to the query exceeds the positive's minus the margin, :math:`s(q_i, n) > s(q_i, d_i^+) - m`
        (GISTEmbed's absolute-margin rule, with the model being trained as its own guide, scored on the detached
        similarities). It catches near-duplicate positives that identity cannot, at the price of also dropping the
        hardest true negatives; mining-time margins are the other place for it (``NegativePool.from_mining``'s
        ``relative_margin``, NV-Retriever's TopK-PercPos). Masked pairs are counted with the identical ones.

        Args:
            model: the SentenceTransformer being trained.
            temperature: :math:`\tau` in eq. 1; ``scale = 1 / temperature``.
            similarity_fct: similarity used in the logits; ``cos_sim`` (the paper) or ``dot_score``. The recorded
                DHNM scores are always cosine similarities, whatever this is.
            in_batch_negatives: include the other documents of the batch as negatives (retrieval); ``False`` for
                classification-style data.
            gather_across_devices: all-gather the documents of every rank (with gradients) so each query also sees
                the other devices' documents as negatives. Requires ``in_batch_negatives``.
            mini_batch_size: if set, use GradCache: embed in mini-batches of this size without keeping activations,
                compute the loss, then re-embed each mini-batch with gradients. Memory is bounded by the
                mini-batch, not the batch. ``None`` (default) embeds the whole batch at once.
            mini_batch_num_tokens: with GradCache, pack mini-batches by token count instead (see
                sentence-transformers' :class:`CachedMultipleNegativesRankingLoss`).
            show_progress_bar: progress bars over GradCache mini-batches.
            record_scores: keep the DHNM score record (only used when labels carry ids).
            max_buffered_scores: the record buffer keeps at most this many micro-batches (oldest dropped), so a
                run that records but never reads cannot grow without bound.
            mask_false_negatives: remove documents identical to a query's positive from its negatives (see above).
            false_negative_margin: ``None`` (default) or :math:`m`: also remove negatives with similarity above the
                positive's minus :math:`m` (in similarity units, e.g. cosine; ``0`` removes those above the positive).

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from conan_hf.losses import InfoNCELoss

                model = SentenceTransformer("path/to/model")
                train_dataset = Dataset.from_dict({
                    "anchor": ["what is a cat?", "capital of France"],
                    "positive": ["A cat is a small feline.", "Paris is the capital of France."],
                    "negative": ["A dog is a canine.", "Lyon is a city in France."],
                })
                loss = InfoNCELoss(model, temperature=0.05)
                SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss).train()
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(
            model, scale=1.0 / temperature, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices
        )
        if gather_across_devices and not in_batch_negatives:
            raise ValueError(
                "gather_across_devices=True only adds other devices' documents as in-batch negatives, "
                "so it needs in_batch_negatives=True."
            )
        if not in_batch_negatives and similarity_fct not in _PAIRWISE:
            raise ValueError(
                "in_batch_negatives=False needs a similarity with a pairwise form: util.cos_sim or util.dot_score, "
                f"got {similarity_fct_name(similarity_fct)}."
            )
        self.in_batch_negatives = in_batch_negatives
        if mini_batch_size is not None:
            if mini_batch_size <= 0:
                raise ValueError(f"mini_batch_size must be a positive integer or None, got {mini_batch_size}")
            if has_static_embedding_input(model):
                raise ValueError("GradCache (mini_batch_size) cannot split StaticEmbedding inputs into mini-batches.")
        _validate_mini_batch_num_tokens(mini_batch_num_tokens)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        # MatryoshkaLoss reads this to decide whether to wrap `calculate_loss` (GradCache) or the model's forward.
        self.uses_gradient_cache = mini_batch_size is not None or mini_batch_num_tokens is not None
        if self.uses_gradient_cache and mini_batch_size is None:
            self.mini_batch_size = 32
        self.record_scores = record_scores
        self._score_buffer: deque[HardNegativeScores] = deque(maxlen=max_buffered_scores)
        self.mask_false_negatives = mask_false_negatives
        self.false_negative_margin = None if false_negative_margin is None else float(false_negative_margin)
        # Document identity of the batch being computed (see `forward`); MatryoshkaLoss calls `forward` once per
        # dimension with the same features, so the last features object and its groups are kept to count once.
        self._document_groups: Tensor | None = None
        self._count_masked = False
        self._last_features: Any = None
        self._last_groups: Tensor | None = None
        self._masked_false_negatives = 0

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    # ---- forward paths -------------------------------------------------------------------------------------------
    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features_object = sentence_features
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"InfoNCELoss needs at least (anchor, positive) columns, got {len(sentence_features)}")
        # The same features object again is the same batch at the next MatryoshkaLoss dimension: its groups are
        # reused and its masked pairs were counted already.
        new_batch = features_object is not self._last_features
        if new_batch:
            groups = None
            if self.mask_false_negatives:
                groups = document_groups(sentence_features[1:], gather=self.gather_across_devices)
            self._last_features, self._last_groups = features_object, groups
        self._count_masked = new_batch and torch.is_grad_enabled()  # count each training batch once
        self._document_groups = self._last_groups
        try:
            if self.uses_gradient_cache:
                return self.forward_cached(sentence_features, labels)
            embeddings = embed_columns(self.model, sentence_features)
            return self.compute_loss_from_embeddings(embeddings, labels)
        finally:
            self._document_groups = None
            self._count_masked = False

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None = None, document_groups: Tensor | None = None
    ) -> Tensor:
        """Eq. 1 from already computed column embeddings ``[anchor, positive, negative_1, ...]``.

        ``document_groups``: ``(num_documents_columns, batch)`` integer ids, equal iff two documents are identical
        (as :func:`document_groups` computes them); ``None`` inside :meth:`forward` uses the batch's own.
        """
        valid = self._parse_labels(labels, embeddings)
        self._record(embeddings, labels)
        groups = self._document_groups if document_groups is None else document_groups
        return self._info_nce(embeddings, valid, chunk_size=None, with_backward=False, groups=groups)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """GradCache step (2): the loss from per-mini-batch embeddings, chunked over ``mini_batch_size`` query rows."""
        embeddings = [torch.cat(column) for column in reps]
        valid = self._parse_labels(labels, embeddings)
        self._record(embeddings, labels)
        return self._info_nce(embeddings, valid, chunk_size=self.mini_batch_size, with_backward=with_backward,
                              groups=self._document_groups)

    # ---- eq. 1 ---------------------------------------------------------------------------------------------------
    def _parse_labels(self, labels: Tensor | None, embeddings: list[Tensor]) -> Tensor | None:
        """Validate DHNM id labels; return the ``(batch, num_negatives)`` filled-slot mask, or None (all filled)."""
        if labels is None:
            return None
        batch_size, num_negatives = embeddings[0].size(0), len(embeddings) - 2
        if (
            not isinstance(labels, Tensor)
            or labels.ndim != 2
            or labels.is_floating_point()
            or tuple(labels.shape) != (batch_size, 1 + num_negatives)
        ):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                "InfoNCELoss takes no labels, or DHNM ids: an integer tensor of shape (batch, 1 + num_negatives) = "
                f"{(batch_size, 1 + num_negatives)} with the example id and the negative ids (-1 = empty slot); "
                f"got {shape}. Remove the label/score column from the dataset, or batch it with DHNMDataCollator."
            )
        valid = split_dhnm_labels(labels)[1] >= 0
        return None if bool(valid.all()) else valid.to(embeddings[0].device)

    def _info_nce(
        self,
        embeddings: list[Tensor],
        valid: Tensor | None,
        chunk_size: int | None,
        with_backward: bool,
        groups: Tensor | None = None,
    ) -> Tensor:
        queries, docs = embeddings[0], embeddings[1:]
        if groups is not None:
            groups = groups.to(queries.device)
            if groups.shape[0] != len(docs):
                raise ValueError(f"document_groups has {groups.shape[0]} columns for {len(docs)} document columns")
        batch_size = queries.size(0)
        num_negatives = len(docs) - 1
        chunk_size = chunk_size or batch_size

        if self.in_batch_negatives:
            offset = 0
            if self.gather_across_devices:
                # Only this device's queries are scored, against every device's documents; the gradient flows back
                # to the documents' own devices through the all-gather.
                docs = [all_gather_with_grad(doc) for doc in docs]
                if valid is not None or num_negatives:
                    local_valid = (
                        valid if valid is not None else queries.new_ones(batch_size, num_negatives, dtype=torch.bool)
                    )
                    valid = all_gather(local_valid.contiguous())
                offset = get_rank() * batch_size
            world_batch_size = docs[0].size(0)
            docs_all = torch.cat(docs, dim=0)  # [positives, negatives_1, ..., negatives_k], each (world_batch, dim)
            column_valid = None
            if valid is not None and not bool(valid.all()):
                column_valid = torch.cat(
                    [valid.new_ones(world_batch_size), valid.T.reshape(-1)]
                )  # same column order as docs_all
            if groups is not None:
                if groups.shape[1] != world_batch_size:
                    raise ValueError(f"document_groups covers {groups.shape[1]} rows, the batch has {world_batch_size}")
                groups_all = groups.reshape(-1)  # same column order as docs_all
        else:
            candidates = torch.stack(docs, dim=1)  # (batch, 1 + k, dim): own positive, then own negatives
            pairwise = _PAIRWISE[self.similarity_fct]

        total = queries.new_zeros(())
        masked = queries.new_zeros((), dtype=torch.long)
        for begin in range(0, batch_size, chunk_size):
            end = min(begin + chunk_size, batch_size)
            rows = torch.arange(end - begin, device=queries.device)
            if self.in_batch_negatives:
                logits = self.similarity_fct(queries[begin:end], docs_all) * self.scale
                if column_valid is not None:
                    logits = logits.masked_fill(~column_valid, float("-inf"))
                if groups is not None:
                    own = offset + begin + rows  # column of each query's positive in docs_all
                    duplicate = groups_all[None, :] == groups_all[own][:, None]
                    duplicate[rows, own] = False  # the positive itself stays
                    if column_valid is not None:
                        duplicate &= column_valid  # empty slots are masked already: not counted twice
                    logits = logits.masked_fill(duplicate, float("-inf"))
                    masked = masked + duplicate.sum()
                if self.false_negative_margin is not None:
                    near = self._near_positive(logits, rows, offset + begin + rows)
                    logits = logits.masked_fill(near, float("-inf"))
                    masked = masked + near.sum()
                positive = logits[rows, offset + begin + rows]
            else:
                chunk = candidates[begin:end]
                query = queries[begin:end, None, :].expand_as(chunk)
                logits = pairwise(query.reshape(-1, query.size(-1)), chunk.reshape(-1, chunk.size(-1)))
                logits = logits.view(end - begin, 1 + num_negatives) * self.scale
                if valid is not None:
                    slot_valid = torch.cat([valid.new_ones(end - begin, 1), valid[begin:end]], dim=1)
                    logits = logits.masked_fill(~slot_valid, float("-inf"))
                if groups is not None and num_negatives:
                    own_groups = groups[:, begin:end].T  # (chunk, 1 + k): own positive, then own negatives
                    duplicate = own_groups[:, 1:] == own_groups[:, :1]
                    if valid is not None:
                        duplicate &= valid[begin:end]
                    duplicate = torch.cat([duplicate.new_zeros(end - begin, 1), duplicate], dim=1)
                    logits = logits.masked_fill(duplicate, float("-inf"))
                    masked = masked + duplicate.sum()
                if self.false_negative_margin is not None:
                    near = self._near_positive(logits, rows, torch.zeros_like(rows))
                    logits = logits.masked_fill(near, float("-inf"))
                    masked = masked + near.sum()
                positive = logits[:, 0]
            chunk_loss = (torch.logsumexp(logits, dim=1) - positive).sum() / batch_size
            if with_backward:
                chunk_loss.backward()
                chunk_loss = chunk_loss.detach()
            total = total + chunk_loss
        if self._count_masked:
            # Once per batch: MatryoshkaLoss (GradCache mode) calls this again per dimension on the same batch.
            self._masked_false_negatives += int(masked)
            self._count_masked = False
        return total

    def _near_positive(self, logits: Tensor, rows: Tensor, positive_columns: Tensor) -> Tensor:
        """Negatives scoring above the positive's similarity minus ``false_negative_margin`` (still unmasked ones)."""
        with torch.no_grad():
            similarity = logits.detach() / self.scale
            threshold = similarity[rows, positive_columns] - self.false_negative_margin
            near = (similarity > threshold[:, None]) & torch.isfinite(similarity)
            near[rows, positive_columns] = False
        return near

    def pop_masked_false_negatives(self) -> int:
        """Number of (query, document) pairs masked as in-batch false negatives since the last call, over this
        process's training batches (each batch counted once, also under MatryoshkaLoss)."""
        count, self._masked_false_negatives = self._masked_false_negatives, 0
        return count

    # ---- DHNM score record ---------------------------------------------------------------------------------------
    def _record(self, embeddings: list[Tensor], labels: Tensor | None) -> None:
        if not self.record_scores or labels is None or len(embeddings) < 3 or not torch.is_grad_enabled():
            # No ids to key the scores by, no hard negatives, or not a training step (evaluation runs without grad).
            return
        with torch.no_grad():
            queries = F.normalize(embeddings[0].detach().float(), dim=-1)
            negatives = F.normalize(torch.stack([neg.detach() for neg in embeddings[2:]], dim=1).float(), dim=-1)
            scores = (negatives @ queries.unsqueeze(-1)).squeeze(-1)  # (batch, k) cosine of each own negative
            example_ids, negative_ids = split_dhnm_labels(labels)
            negative_ids = negative_ids.to(scores.device)
            scores = scores.masked_fill(negative_ids < 0, float("nan"))
        record = HardNegativeScores(example_ids.detach(), negative_ids.detach(), scores, embeddings[0].size(-1))
        if self._score_buffer:
            last = self._score_buffer[-1]
            # MatryoshkaLoss runs the loss once per dimension on the same batch, largest first: keep only the
            # full-dimension scores, which are what the model is judged by.
            if (
                last.dim != record.dim
                and last.example_ids.shape == record.example_ids.shape
                and torch.equal(last.example_ids, record.example_ids)
                and torch.equal(last.negative_ids, record.negative_ids)
            ):
                if record.dim > last.dim:
                    self._score_buffer[-1] = record
                return
        self._score_buffer.append(record)

    def peek_hard_negative_scores(self) -> list[HardNegativeScores]:
        """The buffered score records, oldest first, without clearing them."""
        return list(self._score_buffer)

    def pop_hard_negative_scores(self) -> list[HardNegativeScores]:
        """Return and clear the score records of the loss computations since the last call, oldest first."""
        records = list(self._score_buffer)
        self._score_buffer.clear()
        return records

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "in_batch_negatives": self.in_batch_negatives,
            "gather_across_devices": self.gather_across_devices,
            "mini_batch_size": self.mini_batch_size if self.uses_gradient_cache else None,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "record_scores": self.record_scores,
            "mask_false_negatives": self.mask_false_negatives,
            "false_negative_margin": self.false_negative_margin,
        }

    @property
    def citation(self) -> str:
        return CONAN_CITATION


def document_groups(columns: Sequence[dict[str, Tensor]], gather: bool = False) -> Tensor | None:
    """Exact identity of the documents of a batch: ``(len(columns), batch)`` int64 ids, equal iff the two documents
    have the same unpadded ``input_ids`` (the same model input, so the same embedding).

    ``columns`` are the tokenised document columns ``[positive, negative_1, ...]``. Padding is left out through
    ``attention_mask`` (columns are padded to different widths). With ``gather=True`` in a distributed run, the
    token sequences of every rank are all-gathered so that ids agree across ranks; the result then covers the world
    batch in rank order (the layout of ``all_gather_with_grad``). Returns ``None`` when a column has no
    ``input_ids`` (nothing to compare exactly).
    """
    packed = []
    for column in columns:
        ids = column.get("input_ids")
        if not isinstance(ids, Tensor) or ids.ndim != 2:
            return None
        mask = column.get("attention_mask")
        if not (isinstance(mask, Tensor) and mask.shape == ids.shape):
            mask = torch.ones_like(ids)
        mask = mask.bool()
        # Move each row's real tokens to the front (stable, so their order is kept) and fill the rest with -1: the
        # same text then has the same row whatever the padding side and width of its column.
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        packed.append(torch.gather(ids.long(), 1, order).masked_fill(~torch.gather(mask, 1, order), -1))
    width = max(p.shape[1] for p in packed)
    rows = torch.stack([F.pad(p, (0, width - p.shape[1]), value=-1) for p in packed])  # (columns, batch, width)
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rows.cpu())
        width = max(g.shape[2] for g in gathered)
        rows = torch.cat([F.pad(g, (0, width - g.shape[2]), value=-1) for g in gathered], dim=1).to(rows.device)
    # torch.unique compares whole rows: equal ids <=> identical token sequences (exact, no hashing).
    _, inverse = torch.unique(rows.reshape(-1, rows.shape[2]), dim=0, return_inverse=True)
    return inverse.reshape(rows.shape[0], rows.shape[1])


# ---- Matryoshka -----------------------------------------------------------------------------------------------------
PAPER_MATRYOSHKA_DIMS: tuple[int, ...] = (256, 512, 1024, 1536, 2048, 3072, 3584)
"""Matryoshka dimensions of the released model (paper App. A), for its 3584-dimensional embeddings."""


def default_matryoshka_dims(embedding_dim: int, min_dim: int = 16) -> tuple[int, ...]:
    """Matryoshka dimensions for a model with ``embedding_dim``-dimensional embeddings, ascending.

    - ``embedding_dim >= 3584`` (the paper's size or larger): the paper's dims (App. A) plus ``embedding_dim``
      itself, so 3584 gives exactly ``(256, 512, 1024, 1536, 2048, 3072, 3584)``.
    - smaller models: halve down from ``embedding_dim`` while the result is a whole number ``>= min_dim``, keeping at
      most as many dims as the paper (7). E.g. 1024 → ``(16, 32, 64, 128, 256, 512, 1024)``, 384 →
      ``(24, 48, 96, 192, 384)``, 64 → ``(16, 32, 64)``.

    The full dimension is always included, so the untruncated embedding is trained too.

    Example:
        >>> default_matryoshka_dims(3584)
        (256, 512, 1024, 1536, 2048, 3072, 3584)
        >>> default_matryoshka_dims(256)
        (16, 32, 64, 128, 256)
    """
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if embedding_dim >= PAPER_MATRYOSHKA_DIMS[-1]:
        return tuple(sorted({*PAPER_MATRYOSHKA_DIMS, embedding_dim}))
    dims = [embedding_dim]
    while len(dims) < len(PAPER_MATRYOSHKA_DIMS) and dims[-1] % 2 == 0 and dims[-1] // 2 >= min_dim:
        dims.append(dims[-1] // 2)
    return tuple(sorted(dims))


class MatryoshkaLoss(_STMatryoshkaLoss):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        r"""Matryoshka representation learning (paper App. A): the wrapped loss summed over truncated embeddings,

        .. math:: \mathcal{L}_{MRL} = \sum_m w_m \, \mathcal{L}(\mathrm{normalize}(e_{1:m}))

        This is sentence-transformers' :class:`~sentence_transformers.sentence_transformer.losses.MatryoshkaLoss`;
        only the default dimensions are added: ``matryoshka_dims=None`` takes
        :func:`default_matryoshka_dims` of the model's embedding dimension (the paper's
        (256, 512, 1024, 1536, 2048, 3072, 3584) for a 3584-dim model, halving for smaller ones). Weights default to
        1 for every dimension. Wraps :class:`InfoNCELoss` (also in GradCache mode) or :class:`CoSENTLoss`; with
        InfoNCE, the DHNM score record keeps the full-dimension scores only.

        Args:
            model: the SentenceTransformer being trained.
            loss: the loss to apply at every dimension.
            matryoshka_dims: dimensions to train; ``None`` for the default.
            matryoshka_weights: one weight per dimension (same order as ``matryoshka_dims``); ``None`` for all 1.
            n_dims_per_step: sample this many dimensions per step (``-1``: all).

        Example:
            ::

                from conan_hf.losses import InfoNCELoss, MatryoshkaLoss

                loss = MatryoshkaLoss(model, InfoNCELoss(model))  # dims derived from the model
        """
        if matryoshka_dims is None:
            embedding_dim = model.get_embedding_dimension()
            if embedding_dim is None:
                raise ValueError(
                    "The model does not report its embedding dimension; pass matryoshka_dims explicitly."
                )
            matryoshka_dims = default_matryoshka_dims(embedding_dim)
            if matryoshka_weights is not None and len(matryoshka_weights) != len(matryoshka_dims):
                raise ValueError(
                    f"matryoshka_weights has {len(matryoshka_weights)} entries but the default dims for this "
                    f"{embedding_dim}-dim model are {matryoshka_dims}; pass matryoshka_dims too."
                )
        super().__init__(model, loss, list(matryoshka_dims), matryoshka_weights, n_dims_per_step)
