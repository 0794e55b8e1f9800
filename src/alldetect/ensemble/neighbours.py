"""Each image's nearest neighbours among the images predicted with it, by a network's pre-logit features: what
`ensemble ... correct=knn` mixes into each probability (Pan et al.'s neighbourhood correction for C-NMC)."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from alldetect.ensemble.combine import KNN_K


def neighbour_means(features: np.ndarray, probs: np.ndarray, ks: tuple[int, ...] = KNN_K) -> dict[int, np.ndarray]:
    """{k: for each image, the mean of `probs` over its k nearest *other* images} (cosine distance of
    `features`; k is capped at the number of other images). One image alone is its own neighbourhood."""
    n = len(probs)
    if n < 2:
        return {k: np.asarray(probs, dtype=float).copy() for k in ks}
    unit = features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)
    most = min(max(ks), n - 1)
    idx = NearestNeighbors(n_neighbors=most + 1).fit(unit).kneighbors(unit, return_distance=False)
    # drop each image itself (not always first: identical images tie), keeping the nearest `most` others
    is_self = idx == np.arange(n)[:, None]
    others = np.take_along_axis(idx, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, :most]
    p = np.asarray(probs, dtype=float)
    return {k: p[others[:, :min(k, most)]].mean(1) for k in ks}
