"""Fig. 3 of the paper: do embeddings of different languages share one space?

`plot_language_distribution` embeds texts of several languages with the model, projects them to 2-D (t-SNE, or PCA),
and draws one colour per language. Parallel texts (e.g. the aligned STS-B translations) are the telling input: a
language-agnostic model mixes the colours, a model whose languages live apart shows separate islands.

Example::

    >>> from conan_hf.eval.plot import plot_language_distribution
    >>> texts = {"en": english_sentences, "zh": chinese_sentences, "de": german_sentences}
    >>> plot_language_distribution(model, texts, "language_distribution.png", method="tsne")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def project_2d(embeddings: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates of ``embeddings`` with scikit-learn's t-SNE (cosine metric, PCA init) or PCA."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(embeddings) < 3:
        raise ValueError(f"Need at least 3 embeddings to project, got {len(embeddings)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    if method == "tsne":
        from sklearn.manifold import TSNE

        # t-SNE needs perplexity < number of samples; 30 is the usual value for a few hundred points.
        perplexity = float(min(30.0, max(2.0, (len(embeddings) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed
                    ).fit_transform(embeddings)
    raise ValueError(f"Unknown projection method {method!r}; expected 'tsne' or 'pca'")


def plot_language_distribution(
    model: Any,
    texts_by_language: Mapping[str, Sequence[str]],
    path: str | Path,
    *,
    method: str = "tsne",
    dim: int | None = None,
    batch_size: int = 32,
    title: str | None = None,
    seed: int = 0,
    encode_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Embed ``texts_by_language`` with ``model`` and save a scatter plot coloured by language (PNG).

    Args:
        model: A SentenceTransformer (anything with ``encode(list[str]) -> array``).
        texts_by_language: ``{language: texts}``; parallel texts across languages make the plot most telling.
        path: Output image file (``.png``; other matplotlib formats work too).
        method: ``"tsne"`` or ``"pca"``.
        dim: Optional Matryoshka dimension: keep the first ``dim`` embedding values.
        batch_size: Encoding batch size.
        title: Figure title (default names the method).
        seed: Random seed of the projection.
        encode_kwargs: Extra arguments for ``model.encode`` (e.g. ``prompt_name``).

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    if not texts_by_language or any(len(texts) == 0 for texts in texts_by_language.values()):
        raise ValueError("texts_by_language needs at least one non-empty list of texts per language")
    languages = list(texts_by_language)
    all_texts = [text for language in languages for text in texts_by_language[language]]
    labels = np.array([language for language in languages for _ in texts_by_language[language]])
    embeddings = np.asarray(model.encode(all_texts, batch_size=batch_size, convert_to_numpy=True,
                                         **dict(encode_kwargs or {})), dtype=np.float32)
    if dim is not None:
        embeddings = embeddings[:, :dim]
    coords = project_2d(embeddings, method=method, seed=seed)

    figure, axes = plt.subplots(figsize=(7, 6), dpi=120)
    colours = plt.get_cmap("tab10" if len(languages) <= 10 else "tab20")
    for i, language in enumerate(languages):
        mask = labels == language
        axes.scatter(coords[mask, 0], coords[mask, 1], s=9, alpha=0.7, color=colours(i % colours.N), label=language)
    axes.set_title(title or f"Embedding distribution by language ({method.upper()})")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(markerscale=2, frameon=False, loc="best")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


__all__ = ["plot_language_distribution", "project_2d"]
