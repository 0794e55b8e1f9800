"""Label shift: the class mix of an unlabelled test set, estimated from a classifier's probabilities, and the
probabilities adjusted to it (the `prior=` step of `alldetect.ensemble.combine`).

A model trained (and calibrated) where a share `pi` of the images are `all` outputs p(all | x) for that mix. Under
label shift (p(x | class) unchanged, the class mix now `q`), Bayes' rule gives the probability for the new mix:

    p'(all | x) = (q / pi) p / ((q / pi) p + ((1 - q) / (1 - pi)) (1 - p))              (`adjust`)

`q` is known (prior=VALUE) or estimated from the test set's own probabilities:

  em    Saerens, Latinne and Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori
        probabilities: a simple procedure", Neural Computation 14(1): re-weight the posteriors by q / pi, take their
        mean as the new q, repeat to convergence (maximum likelihood of q; needs calibrated probabilities).
  bbse  Lipton, Wang and Smola (2018), "Detecting and correcting for label shift with black box predictors", ICML:
        with C[i, j] = P(predicted i, true j) on held-out labelled data (here: out-of-fold predictions) and mu the
        test set's share of each predicted class, solve C w = mu for w = q / pi (non-negative least squares, so w
        is a valid weight) and q = w pi, normalised. Needs only the hard decisions to be informative, not
        calibration.

Every function is pure (numpy in, numbers out); class 1 is `all`, priors are the share of `all`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

LOWEST = 1e-3  # an estimated prior is kept within [LOWEST, 1 - LOWEST]: a valid, invertible prior


def adjust(p: np.ndarray, train_prior: float, new_prior: float) -> np.ndarray:
    """Probabilities of `all` for a class mix `new_prior` from those of a model of mix `train_prior` (Bayes'
    rule, Saerens et al. 2002, eq. 2.4). The ranking of the images does not change."""
    p = np.asarray(p, dtype=float)
    up, down = new_prior / train_prior, (1 - new_prior) / (1 - train_prior)
    return up * p / (up * p + down * (1 - p))


@dataclass(frozen=True)
class Estimate:
    """A test set's share of `all`, how it was found, and (em) whether and when the iteration converged."""

    prior: float
    method: str
    iterations: int = 0
    converged: bool = True


def em_prior(p: np.ndarray, train_prior: float, tol: float = 1e-6, max_iter: int = 1000,
             weights: np.ndarray | None = None) -> Estimate:
    """Saerens, Latinne and Decaestecker (2002): the maximum-likelihood share of `all` of the images whose
    probabilities (from a model of mix `train_prior`) are `p`, by expectation-maximisation from the training mix.
    `weights` count each image as that many (a set re-weighted to another mix)."""
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    q = float(train_prior)
    for i in range(1, max_iter + 1):
        new = float(np.clip(np.average(adjust(p, train_prior, q), weights=weights), LOWEST, 1 - LOWEST))
        if abs(new - q) < tol:
            return Estimate(new, "em", i)
        q = new
    return Estimate(q, "em", max_iter, converged=False)


def joint_confusion(labels: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """C[i, j] = share of the images predicted i (at `threshold`) whose true class is j (Lipton et al. 2018's
    confusion matrix of the black-box predictor, on held-out labelled data)."""
    labels = np.asarray(labels, dtype=int)
    pred = (np.asarray(p, dtype=float) >= threshold).astype(int)
    c = np.zeros((2, 2))
    np.add.at(c, (pred, labels), 1.0)
    return c / max(len(labels), 1)


def bbse_prior(p: np.ndarray, confusion: np.ndarray, threshold: float = 0.5,
               weights: np.ndarray | None = None) -> Estimate:
    """Lipton, Wang and Smola (2018), black-box shift estimation: the test images' share of `all` from their hard
    decisions (`p >= threshold`) and the joint `confusion` of the same decisions on labelled held-out data.
    `weights` count each image as that many."""
    pred = (np.asarray(p, dtype=float) >= threshold).astype(int)
    counts = np.bincount(pred, weights=weights, minlength=2)
    mu = counts / max(counts.sum(), 1e-12)
    w, _ = nnls(confusion, mu)  # w_j = q_j / pi_j >= 0
    q = w * confusion.sum(axis=0)  # pi_j: the held-out data's true class mix
    if q.sum() <= 0:  # the decisions say nothing (one class predicted throughout): keep the training mix
        return Estimate(float(confusion.sum(axis=0)[1]), "bbse", converged=False)
    return Estimate(float(np.clip(q[1] / q.sum(), LOWEST, 1 - LOWEST)), "bbse")
