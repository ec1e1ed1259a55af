"""Unsupervised clusters of spectral profiles, and novelty against the reference set.

Profiles are standardised; the leading ``cluster_features`` columns (the spectral
component of a profile; default all) are reduced by PCA to the components that hold
``variance_kept`` of the variance, and modelled by a full-covariance Gaussian
mixture whose number of components is chosen by BIC (the lowest BIC among the
candidates whose smallest cluster keeps ``min_cluster_size`` images). Novelty is
the Mahalanobis distance to the whole reference (Ledoit–Wolf covariance) in the
standardised space of *every* feature, so that a shift outside the PCA subspace, or
in a feature the clusters do not use, still counts.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.covariance import LedoitWolf
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from .errors import InvalidInputError, NotFittedError

__all__ = ["SpectralClusterer", "check_profiles"]


def check_profiles(X: Any, n_features: int | None = None) -> np.ndarray:
    """Validate a profile matrix: 2-D, finite, float64, the expected width."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[0] == 0:
        raise InvalidInputError(f"profiles must be a non-empty 2-D array, got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise InvalidInputError(f"profiles have {X.shape[1]} features, the model expects {n_features}")
    if not np.all(np.isfinite(X)):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise InvalidInputError(f"profiles contain a non-finite value at row {bad[0]}, feature {bad[1]}")
    return X


class SpectralClusterer(BaseEstimator):
    """Gaussian-mixture clusters of spectral profiles with BIC model selection.

    Parameters
    ----------
    n_clusters : "auto" or int, default="auto"
        Fixed number of clusters, or choose among ``k_range`` by BIC.
    k_range : tuple of int, default=(2, 10)
        Inclusive range of candidate cluster counts for ``"auto"``.
    min_cluster_size : float or int, default=0.03
        Smallest cluster allowed, as a fraction of the fit set (float < 1) or a count.
    variance_kept : float, default=0.95
        PCA keeps the fewest components holding this share of the variance.
    novelty_quantile : float, default=0.99
        Reference quantile of the Mahalanobis distance above which an image is novel.
    cluster_features : int, optional
        Cluster on the first ``cluster_features`` columns only (the spectral component);
        standardisation, novelty and per-feature drift still use every column.
    n_init : int, default=3
    random_state : int, default=0

    Attributes
    ----------
    n_clusters_ : int
    bic_ : dict of int to float
        BIC of each candidate k (``inf`` where a cluster fell below the minimum size).
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation.
    components_ : ndarray of shape (n_components, n_cluster_features)
    weights_ : ndarray of shape (n_clusters,)
    means_ : ndarray of shape (n_clusters, n_components)
    covariances_ : ndarray of shape (n_clusters, n_components, n_components)
    novelty_precision_ : ndarray of shape (n_features, n_features)
        Inverse Ledoit–Wolf covariance of the standardised reference.
    reference_distances_ : ndarray of shape (n_samples,)
        Sorted held-out (5-fold) Mahalanobis distances of the fit set: the novelty scale.
    novelty_threshold_ : float
    labels_ : ndarray of shape (n_samples,)
    """

    def __init__(
        self,
        n_clusters: str | int = "auto",
        k_range: tuple[int, int] = (2, 10),
        min_cluster_size: float | int = 0.03,
        variance_kept: float = 0.95,
        novelty_quantile: float = 0.99,
        n_init: int = 3,
        random_state: int = 0,
        cluster_features: int | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.min_cluster_size = min_cluster_size
        self.variance_kept = variance_kept
        self.novelty_quantile = novelty_quantile
        self.n_init = n_init
        self.random_state = random_state
        self.cluster_features = cluster_features

    def _clustered(self, Z: np.ndarray) -> np.ndarray:
        """The columns the clusters are fitted on."""
        return Z if self.cluster_features is None else Z[:, : self.cluster_features]

    def _candidates(self, n: int) -> list[int]:
        if self.n_clusters == "auto":
            lo, hi = self.k_range
            if not 1 <= lo <= hi:
                raise InvalidInputError(f"k_range must be (lo, hi) with 1 <= lo <= hi, got {self.k_range}")
            return list(range(lo, hi + 1))
        if isinstance(self.n_clusters, (int, np.integer)) and self.n_clusters >= 1:
            return [int(self.n_clusters)]
        raise InvalidInputError(f"n_clusters must be 'auto' or a positive int, got {self.n_clusters!r}")

    def fit(self, X: Any, y: Any = None) -> SpectralClusterer:
        """Learn standardisation, PCA, the mixture and the novelty scale from profiles X."""
        X = check_profiles(X)
        n = X.shape[0]
        candidates = self._candidates(n)
        min_size = (
            int(np.ceil(self.min_cluster_size * n))
            if self.min_cluster_size < 1
            else int(self.min_cluster_size)
        )
        if n < max(10, 2 * min(candidates)):
            raise InvalidInputError(f"need at least {max(10, 2 * min(candidates))} profiles to fit, got {n}")
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        Z = (X - self.mean_) / self.scale_
        if self.cluster_features is not None and not 1 <= self.cluster_features <= X.shape[1]:
            raise InvalidInputError(
                f"cluster_features must be in [1, {X.shape[1]}], got {self.cluster_features}"
            )
        _, s, vt = np.linalg.svd(self._clustered(Z), full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        n_comp = int(np.searchsorted(share, self.variance_kept) + 1)
        # SVD signs are arbitrary; fix them so refits and platforms agree.
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
        self.components_ = (vt * signs[:, None])[:n_comp]
        Y = self._clustered(Z) @ self.components_.T

        self.bic_ = {}
        best: GaussianMixture | None = None
        best_bic = np.inf
        # The matrices here are tiny (tens of columns): BLAS threads only add synchronisation,
        # which under CPU contention made the fit ~20x slower.
        with threadpool_limits(limits=1):
            best, best_bic = self._select(Y, candidates, min_size)
        if best is None:
            raise InvalidInputError(
                f"no candidate k in {candidates} gives clusters of at least {min_size} images; "
                "lower min_cluster_size or the number of clusters"
            )
        # Order clusters by size (largest first) so cluster ids are stable and readable.
        order = np.argsort(-np.bincount(best.predict(Y), minlength=best.n_components), kind="stable")
        self.n_clusters_ = int(best.n_components)
        self.weights_ = best.weights_[order]
        self.means_ = best.means_[order]
        self.covariances_ = best.covariances_[order]
        self._build_mixture()

        self.novelty_precision_ = LedoitWolf().fit(Z).precision_
        self.reference_distances_ = np.sort(self._held_out_distances(Z))
        self.novelty_threshold_ = float(np.quantile(self.reference_distances_, self.novelty_quantile))
        self.labels_ = self.predict(X)
        return self

    def _mixture(self, Y: np.ndarray, k: int, n_init: int) -> GaussianMixture:
        gmm = GaussianMixture(
            n_components=k,
            covariance_type="full",
            n_init=n_init,
            reg_covar=1e-4,
            random_state=self.random_state,
        )
        with warnings.catch_warnings():
            # Convergence warnings on candidate k are expected; the BIC judges them.
            warnings.simplefilter("ignore")
            return gmm.fit(Y)

    def _select(
        self, Y: np.ndarray, candidates: list[int], min_size: int
    ) -> tuple[GaussianMixture | None, float]:
        """Fit a mixture per candidate k; keep the lowest BIC whose clusters are all >= min_size.

        Every candidate gets ``n_init`` starts: with one start the BIC of k=3 on the NIH
        profiles came out 650 higher and the search picked another k.
        """
        best, best_bic = None, np.inf
        for k in candidates:
            gmm = self._mixture(Y, k, n_init=self.n_init)
            sizes = np.bincount(gmm.predict(Y), minlength=k)
            bic = float(gmm.bic(Y)) if sizes.min() >= min_size else float("inf")
            self.bic_[k] = bic
            if bic < best_bic:
                best, best_bic = gmm, bic
        return best, best_bic

    def _held_out_distances(self, Z: np.ndarray, n_folds: int = 5) -> np.ndarray:
        """Mahalanobis distance of each reference image from a covariance fitted without it.

        In-sample distances are biased low (the covariance has seen the point), so a
        novelty threshold taken from them flags too many new in-distribution images.
        """
        rng = np.random.default_rng(self.random_state)
        folds = rng.permutation(Z.shape[0]) % n_folds
        out = np.empty(Z.shape[0])
        for f in range(n_folds):
            held = folds == f
            train = Z[~held]
            precision = LedoitWolf().fit(train).precision_
            centred = Z[held] - train.mean(axis=0)
            out[held] = np.sqrt(np.einsum("ij,jk,ik->i", centred, precision, centred))
        return out

    def _build_mixture(self) -> None:
        """Rebuild the scikit-learn mixture from the fitted arrays (also after loading)."""
        gmm = GaussianMixture(n_components=self.n_clusters_, covariance_type="full")
        gmm.weights_ = self.weights_
        gmm.means_ = self.means_
        gmm.covariances_ = self.covariances_
        chol = np.linalg.cholesky(self.covariances_)
        eye = np.eye(self.means_.shape[1])
        gmm.precisions_cholesky_ = np.stack([np.linalg.solve(c, eye).T for c in chol])
        gmm.precisions_ = np.einsum("kij,klj->kil", gmm.precisions_cholesky_, gmm.precisions_cholesky_)
        gmm.converged_ = True
        gmm.n_iter_ = 0
        gmm.lower_bound_ = np.nan
        self._gmm = gmm

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError("this SpectralClusterer is not fitted yet: call fit(X) first")

    def _standardise(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = check_profiles(X, self.mean_.shape[0])
        return (X - self.mean_) / self.scale_

    def _distance(self, Z: np.ndarray) -> np.ndarray:
        return np.sqrt(np.einsum("ij,jk,ik->i", Z, self.novelty_precision_, Z))

    def standardise(self, X: Any) -> np.ndarray:
        """Profiles in units of the reference standard deviation, shape (n_samples, n_features)."""
        return self._standardise(X)

    def transform(self, X: Any) -> np.ndarray:
        """PCA coordinates, shape (n_samples, n_components)."""
        return self._clustered(self._standardise(X)) @ self.components_.T

    def predict_proba(self, X: Any) -> np.ndarray:
        """Soft memberships, shape (n_samples, n_clusters), rows sum to 1."""
        Y = self.transform(X)  # checks fitted before the mixture is looked up
        return self._gmm.predict_proba(Y)

    def predict(self, X: Any) -> np.ndarray:
        """Most likely cluster of each profile, shape (n_samples,)."""
        return self.predict_proba(X).argmax(axis=1)

    def score_samples(self, X: Any) -> np.ndarray:
        """Mixture log-likelihood of each profile in PCA space, shape (n_samples,)."""
        Y = self.transform(X)
        return self._gmm.score_samples(Y)

    def novelty(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Novelty of each profile.

        Returns
        -------
        novelty : ndarray of shape (n_samples,)
            Share of the reference images closer to the reference centre (0 = typical,
            1 = farther than every reference image).
        distance : ndarray of shape (n_samples,)
            Mahalanobis distance to the reference.
        """
        d = self._distance(self._standardise(X))
        return self._novelty_share(d), d

    def _novelty_share(self, distance: np.ndarray) -> np.ndarray:
        ref = self.reference_distances_
        return np.searchsorted(ref, distance, side="right") / ref.size

    def assess(self, X: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Everything scoring needs from one standardisation of X.

        Returns
        -------
        Z, memberships, log_likelihood, novelty, distance
            As :meth:`standardise`, :meth:`predict_proba`, :meth:`score_samples` and
            :meth:`novelty` would return them (memberships and log-likelihood to ~1e-14: the
            same formula, evaluated without scikit-learn's per-call validation).
        """
        Z = self._standardise(X)
        Y = self._clustered(Z) @ self.components_.T
        d = self._distance(Z)
        memberships, log_likelihood = self._memberships_and_log_likelihood(Y)
        return Z, memberships, log_likelihood, self._novelty_share(d), d

    def _memberships_and_log_likelihood(self, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # GaussianMixture.predict_proba and .score_samples, in one pass over the components and
        # without their input validation: on one image that validation was most of the 2 ms the
        # two calls took, on the serving path. Same formula as scikit-learn's (full covariances).
        g = self._gmm
        n_features = Y.shape[1]
        chol = g.precisions_cholesky_
        log_det = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
        log_prob = np.empty((Y.shape[0], chol.shape[0]))
        for k in range(chol.shape[0]):
            y = Y @ chol[k] - g.means_[k] @ chol[k]
            log_prob[:, k] = np.sum(np.square(y), axis=1)
        weighted = -0.5 * (n_features * np.log(2 * np.pi) + log_prob) + log_det + np.log(g.weights_)
        top = weighted.max(axis=1, keepdims=True)
        log_norm = np.log(np.sum(np.exp(weighted - top), axis=1)) + top[:, 0]
        with np.errstate(under="ignore"):
            memberships = np.exp(weighted - log_norm[:, None])
        return memberships, log_norm

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays (for the artifact; no pickle)."""
        self._check_fitted()
        return {
            "mean": self.mean_,
            "scale": self.scale_,
            "components": self.components_,
            "weights": self.weights_,
            "means": self.means_,
            "covariances": self.covariances_,
            "novelty_precision": self.novelty_precision_,
            "reference_distances": self.reference_distances_,
        }

    def to_json(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "params": self.get_params(),
            "n_clusters": self.n_clusters_,
            "n_components": int(self.components_.shape[0]),
            "bic": {str(k): (v if np.isfinite(v) else None) for k, v in self.bic_.items()},
            "novelty_threshold": self.novelty_threshold_,
        }

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> SpectralClusterer:
        """Inverse of :meth:`to_json` + :meth:`to_arrays`."""
        params = dict(meta["params"])
        params["k_range"] = tuple(params["k_range"])
        est = cls(**params)
        est.mean_ = arrays["mean"]
        est.scale_ = arrays["scale"]
        est.components_ = arrays["components"]
        est.weights_ = arrays["weights"]
        est.means_ = arrays["means"]
        est.covariances_ = arrays["covariances"]
        est.novelty_precision_ = arrays["novelty_precision"]
        est.reference_distances_ = arrays["reference_distances"]
        est.n_clusters_ = int(meta["n_clusters"])
        est.bic_ = {int(k): (v if v is not None else float("inf")) for k, v in meta["bic"].items()}
        est.novelty_threshold_ = float(meta["novelty_threshold"])
        est._build_mixture()
        return est
