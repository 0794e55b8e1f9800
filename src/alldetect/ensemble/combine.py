"""How member probabilities become one decision: every step is fitted on out-of-fold (OOF) predictions and applied
unchanged to others (with `ensemble --oof`, each fold gets what the other folds fitted).

The steps, in order (a `Method` names one choice of each):
  correct=knn    each member's probability of an image is mixed with the mean probability of its k nearest
                 neighbours (that member's pre-logit features) among the images predicted with it, as Pan et al.'s
                 C-NMC winner corrected cells by their neighbours; k and the mixing weight are fitted per member
  average=rank   each member's probabilities become their quantiles among its own OOF probabilities, and the
                 averaged quantile is mapped back onto the plain average's probability scale
  weights=       equal | oof (log-loss-optimal weights) | greedy (Caruana et al. 2004: forward selection with
                 replacement) | stack (logistic regression on the members' log-odds)
  calibrate=     none | temperature | platt | isotonic, of the combined probability
  prior=         none | em | bbse | a known share of `all`: label shift (alldetect.ensemble.prior). The combined
                 probability is re-weighted by Bayes' rule from the OOF labels' class mix to the mix of the images
                 being combined, estimated from their own probabilities (em, bbse: it uses the images jointly)
  threshold=     a number, or oof (maximum weighted F1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from alldetect.ensemble.prior import Estimate, adjust, bbse_prior, em_prior, joint_confusion
from alldetect.errors import UserError
from alldetect.metrics import best_threshold, score
from alldetect.options import CALIBRATIONS, WEIGHTS

KNN_K = (5, 10, 20, 50, 100, 200)  # neighbours tried by correct=knn
KNN_MIX = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)  # weights of the neighbours' mean tried (0: no correction)
EPS = 1e-6


@dataclass(frozen=True)
class Method:
    weights: str = "equal"
    average: str = "prob"
    calibrate: str = "none"
    correct: str = "none"
    threshold: float | str = 0.5
    prior: str | float = "none"

    @property
    def fitted(self) -> bool:
        """Whether anything is fitted on OOF predictions (so --oof must cross-fit); a prior needs the OOF labels'
        class mix even when it is known."""
        return (self.weights != "equal" or self.average != "prob" or self.calibrate != "none"
                or self.correct != "none" or self.threshold == "oof" or self.prior != "none")

    @property
    def label(self) -> str:
        parts = [f"weights={self.weights}"]
        parts += [f"{k}={v}" for k, v, off in (("average", self.average, "prob"), ("calibrate", self.calibrate, "none"),
                                                ("correct", self.correct, "none"), ("prior", self.prior, "none"))
                  if v != off]
        return " ".join(parts)


@dataclass
class Inputs:
    """Images x members: each member's probability of `all`, and for correct=knn the mean probability of each
    image's k nearest neighbours ({k: images x members})."""

    probs: np.ndarray
    neighbours: dict[int, np.ndarray] | None = None

    def rows(self, mask: np.ndarray) -> Inputs:
        return Inputs(self.probs[mask], None if self.neighbours is None
                      else {k: v[mask] for k, v in self.neighbours.items()})


@dataclass
class Combiner:
    """A fitted Method: member probabilities -> one probability -> a decision at `threshold`."""

    method: Method
    weights: np.ndarray
    threshold: float = 0.5
    note: str = ""
    corrections: list[tuple[int, float]] = field(default_factory=list)  # per member: (k, mix)
    ranks: list[np.ndarray] = field(default_factory=list)  # per member: its sorted OOF probabilities
    scale: np.ndarray | None = None  # sorted OOF plain averages: quantiles back to probabilities
    stacker: LogisticRegression | None = None
    calibrator: Callable[[np.ndarray], np.ndarray] | None = None  # probability -> probability
    train_prior: float | None = None  # prior=: the OOF labels' share of `all`
    confusion: np.ndarray | None = None  # prior=bbse: joint confusion of the OOF decisions at 0.5
    estimate: Estimate | None = None  # prior=: the share of `all` of the images it last combined

    @classmethod
    def equal(cls, method: Method, members: int) -> Combiner:
        """Equal weights at the method's own threshold: a method with nothing to fit (not method.fitted)."""
        assert not method.fitted, method
        return cls(method, np.full(members, 1.0 / members), float(method.threshold))

    def members(self, inputs: Inputs) -> np.ndarray:
        """The members' probabilities after correction and the rank transform."""
        p = inputs.probs
        if self.corrections:
            assert inputs.neighbours is not None, "a correction needs the neighbours' means"
            p = np.column_stack([(1 - mix) * p[:, i] + mix * inputs.neighbours[k][:, i] if mix else p[:, i]
                                 for i, (k, mix) in enumerate(self.corrections)])
        if self.ranks:
            p = np.column_stack([np.searchsorted(r, p[:, i], side="right") / len(r) for i, r in enumerate(self.ranks)])
        return p

    def uncalibrated(self, inputs: Inputs) -> np.ndarray:
        p = self.members(inputs)
        if self.stacker is not None:
            return self.stacker.predict_proba(_log_odds(p))[:, 1]
        combined = p @ self.weights
        return np.quantile(self.scale, np.clip(combined, 0, 1)) if self.scale is not None else combined

    def probs(self, inputs: Inputs | np.ndarray) -> np.ndarray:
        """The combined probability of `all` of each image; with prior=, for the class mix of these images taken
        together (recorded in `estimate`)."""
        inputs = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
        p = self.uncalibrated(inputs)
        p = self.calibrator(p) if self.calibrator is not None else p
        p, estimate = self.shifted(p)
        if estimate is not None:
            self.estimate = estimate
        return p

    def shifted(self, p: np.ndarray) -> tuple[np.ndarray, Estimate | None]:
        """(calibrated) probabilities re-weighted to the class mix of these images (prior=): (probabilities, the
        mix). Unchanged, with None, for prior=none."""
        prior = self.method.prior
        if prior == "none":
            return p, None
        assert self.train_prior is not None, "a prior step is fitted before it is applied"
        if prior == "em":
            estimate = em_prior(p, self.train_prior)
        elif prior == "bbse":
            assert self.confusion is not None, "bbse's confusion matrix is fitted with the prior step"
            estimate = bbse_prior(p, self.confusion)
        else:
            estimate = Estimate(float(prior), "known")
        return adjust(p, self.train_prior, estimate.prior), estimate


def _log_odds(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(p, EPS, 1 - EPS))


def _loss(labels: np.ndarray, p: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))


# ---------------------------------------------------------------- weights

def fit_weights(probs: np.ndarray, labels: np.ndarray, threshold: float | str = 0.5) -> tuple[np.ndarray, str]:
    """Non-negative weights summing to 1 that minimise the OOF log-loss (smooth, so they do not chase a few
    images across a threshold). They are kept only when they score at least as well as equal weights on
    weighted F1 (at `threshold`, or each at its own best threshold for "oof") and on log-loss, so by
    construction fitted weights never score worse on these predictions than equal weights."""
    m = probs.shape[1]
    equal = np.full(m, 1.0 / m)
    if m == 1:
        return equal, ""
    result = minimize(lambda w: _loss(labels, probs @ w), equal, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
    fitted = np.clip(result.x, 0.0, None)
    fitted = fitted / fitted.sum() if fitted.sum() > 0 else equal

    def f1(w):
        p = probs @ w
        t = best_threshold(labels, p) if threshold == "oof" else threshold
        return score(labels, p, t)["f1"]

    if f1(fitted) < f1(equal) or _loss(labels, probs @ fitted) > _loss(labels, probs @ equal):
        return equal, "weights fitted on the out-of-fold predictions scored worse there than equal weights: kept equal"
    return fitted, ""


def greedy_weights(probs: np.ndarray, labels: np.ndarray, rounds: int | None = None) -> np.ndarray:
    """Caruana et al. (2004), ensemble selection with replacement: start empty, add the member whose addition
    gives the lowest log-loss of the average, `rounds` times (10 per member), and keep the best of those
    ensembles; a member's weight is the share of the picks that were it."""
    n, m = probs.shape
    rounds = rounds or 10 * m
    total, counts = np.zeros(n), np.zeros(m)
    best, best_counts = np.inf, counts.copy()
    for r in range(1, rounds + 1):
        losses = [_loss(labels, (total + probs[:, j]) / r) for j in range(m)]
        j = int(np.argmin(losses))
        total += probs[:, j]
        counts[j] += 1
        if losses[j] < best - 1e-12:
            best, best_counts = losses[j], counts.copy()
    return best_counts / best_counts.sum()


# ---------------------------------------------------------------- correction and calibration

def fit_correction(p: np.ndarray, neighbours: dict[int, np.ndarray], labels: np.ndarray) -> tuple[int, float]:
    """(k, mix) of one member's neighbourhood correction with the lowest log-loss; mix 0 is no correction."""
    best = (np.inf, KNN_K[0], 0.0)
    for k, near in neighbours.items():
        for mix in KNN_MIX:
            loss = _loss(labels, (1 - mix) * p + mix * near)
            if loss < best[0] - 1e-12:
                best = (loss, k, mix)
    return best[1], best[2]


def fit_calibration(kind: str, p: np.ndarray, labels: np.ndarray):
    """A function probability -> calibrated probability, fitted on (p, labels); None for kind none."""
    if kind == "none":
        return None
    z = _log_odds(p)
    if kind == "temperature":  # one number: the log-odds divided by T (the decision at 0.5 does not move)
        res = minimize_scalar(lambda log_t: _loss(labels, expit(z / np.exp(log_t))), bounds=(-4, 4), method="bounded")
        t = float(np.exp(res.x))
        return _Temperature(t)
    if kind == "platt":
        model = LogisticRegression(C=1e4).fit(z[:, None], labels)
        return lambda q: model.predict_proba(_log_odds(q)[:, None])[:, 1]
    if kind == "isotonic":
        model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, labels)
        return lambda q: np.asarray(model.predict(q), dtype=float)
    raise UserError(f"calibrate={kind}: choose one of {', '.join(CALIBRATIONS)}")


@dataclass
class _Temperature:
    t: float

    def __call__(self, q: np.ndarray) -> np.ndarray:
        return expit(_log_odds(q) / self.t)


# ---------------------------------------------------------------- fitting a method

def fit(method: Method, inputs: Inputs, labels: np.ndarray) -> Combiner:
    """Fit every step of `method` on these (OOF) predictions."""
    m = inputs.probs.shape[1]
    c = Combiner(method, np.full(m, 1.0 / m))
    if method.correct == "knn":
        if inputs.neighbours is None:
            raise UserError("correct=knn needs the members' features: run `alldetect predict RUN... --oof "
                            "features=true` (and `--name NAME features=true` for held-out images) first")
        c.corrections = [fit_correction(inputs.probs[:, i], {k: v[:, i] for k, v in inputs.neighbours.items()},
                                        labels) for i in range(m)]
    plain = c.members(inputs)  # corrected, before the rank transform
    if method.average == "rank":
        c.ranks = [np.sort(plain[:, i]) for i in range(m)]
    p = c.members(inputs)
    if method.weights == "oof":
        c.weights, c.note = fit_weights(p, labels, method.threshold)
    elif method.weights == "greedy":
        c.weights = greedy_weights(p, labels)
    elif method.weights == "stack":
        c.stacker = LogisticRegression(C=1.0).fit(_log_odds(p), labels)
        c.weights = np.full(m, np.nan)
    if method.average == "rank" and c.stacker is None:
        c.scale = np.sort(plain @ c.weights)
    combined = c.uncalibrated(inputs)
    c.calibrator = fit_calibration(method.calibrate, combined, labels)
    final = c.calibrator(combined) if c.calibrator is not None else combined
    if method.prior != "none":
        c.train_prior = float(np.mean(labels))
        if not 0 < c.train_prior < 1:
            raise UserError(f"prior={method.prior} needs out-of-fold predictions of both classes (the training mix "
                            "is their share of `all`), and these are all of one class: train on images of both")
        c.confusion = joint_confusion(labels, final)
        final, _ = c.shifted(final)  # the OOF images' own mix (about the training one): what the threshold sees
    c.threshold = best_threshold(labels, final) if method.threshold == "oof" else float(method.threshold)
    return c


def cross_fitted(inputs: Inputs, labels: np.ndarray, folds: np.ndarray,
                 method: Method) -> tuple[np.ndarray, np.ndarray, dict[int, Combiner]]:
    """OOF probabilities and per-image thresholds where whatever is fitted for the images of fold f was fitted on
    the other folds only. Returns (probs, thresholds, {fold: Combiner}); {} when nothing is fitted."""
    if not method.fitted:
        c = fit(method, inputs, labels)
        return c.probs(inputs), np.full(len(labels), c.threshold), {}
    unique = np.unique(folds)
    if len(unique) < 2:
        raise UserError(f"{method.label} threshold={method.threshold} with --oof needs out-of-fold predictions of "
                        "two or more folds (each fold is scored with what the others fitted)")
    out_p, out_t, per_fold = np.zeros(len(labels)), np.zeros(len(labels)), {}
    for fold in unique:
        held = folds == fold
        c = fit(method, inputs.rows(~held), labels[~held])
        out_p[held], out_t[held], per_fold[int(fold)] = c.probs(inputs.rows(held)), c.threshold, c
    return out_p, out_t, per_fold


def alternatives(method: Method, members: int, have_features: bool) -> list[Method]:
    """What `ensemble --oof` compares the chosen method with: equal averaging, each way of weighting, rank
    averaging, calibration, label-shift correction (prior=em, bbse) and (with features) neighbourhood correction,
    at the chosen threshold."""
    base = Method(threshold=method.threshold)
    out = [base]
    if members > 1:
        out += [replace(base, weights=w) for w in WEIGHTS[1:]] + [replace(base, average="rank")]
    out += [replace(base, calibrate="temperature"), replace(base, calibrate="isotonic")]
    out += [replace(base, prior="em"), replace(base, prior="bbse")]
    if have_features:
        out.append(replace(base, correct="knn"))
    return [m for m in dict.fromkeys(out) if m != method]
