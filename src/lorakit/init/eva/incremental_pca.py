"""Incremental PCA: the mean-centred principal components of data that arrives in batches.

The update of Ross et al. 2008 ("Incremental Learning for Robust Visual Tracking", IJCV), as in
scikit-learn's ``IncrementalPCA`` and PEFT's ``peft.utils.incremental_pca`` (which EVA uses). After
``N`` rows with mean ``mu``, principal directions ``V`` (k x d) and singular values ``S``, a batch
``X_b`` (n x d, mean ``mu_b``) is folded in by one SVD of the stacked matrix

    M = [ diag(S) V                           ]   (k x d)  what the earlier rows left
        [ X_b - mu_b                          ]   (n x d)  the batch, centred on its own mean
        [ sqrt(N n / (N + n)) (mu - mu_b)     ]   (1 x d)  the shift between the two means

``M^T M`` is the scatter matrix of all ``N + n`` rows about their common mean when the earlier steps
kept every component, and its best rank-k approximation otherwise. With ``M = U S' V'`` the top ``k``
rows of ``V'`` are the new components and ``S'^2 / (total scatter)`` their explained-variance ratios.
The SVD is randomised (``torch.svd_lowrank``, Halko et al. 2011) with ``q = 2k`` and a fixed seed, and
each component's sign is fixed so that its largest-magnitude entry is positive.
"""

from __future__ import annotations

import math

import torch

from lorakit.errors import ConfigError, DataError


class IncrementalPCA:
    """The top ``n_components`` principal components of every row passed to :meth:`partial_fit` so far.

    Attributes after the first fit: ``components`` (k, d), ``singular_values`` (k,),
    ``explained_variance_ratio`` (k,) (in the dtype of the data), ``mean`` (d,) (float64),
    ``n_seen`` (rows so far).
    """

    def __init__(self, n_components: int, *, niter: int = 4, seed: int = 42) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ConfigError(f"n_components={n_components!r} is invalid: a positive integer is required")
        self.n_components = n_components
        self.niter = niter
        self.seed = seed
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.n_seen = 0
        self._scatter: torch.Tensor | None = None  # sum over rows and features of (x - mean)^2, float64

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor) -> IncrementalPCA:
        """Fold the rows of ``X`` (n x d, n >= n_components) into the components; returns ``self``."""
        n, d = X.shape
        k = self.n_components
        if k > d:
            raise ConfigError(f"n_components={k} is invalid for data with {d} features: at most {d}")
        if n < k:
            raise DataError(f"a batch of {n} rows cannot update {k} principal components: at least {k} rows")
        if self.components is not None:
            if d != self.components.shape[1]:
                raise DataError(f"a batch has {d} features, but the earlier batches had {self.components.shape[1]}")
            X = X.to(self.components.dtype)
        batch_mean = X.mean(dim=0, dtype=torch.float64)  # (d,)
        centred = X - batch_mean.to(X.dtype)  # (n, d)
        batch_scatter = centred.square().sum(dtype=torch.float64)
        if self.components is None:
            stacked, mean, scatter = centred, batch_mean, batch_scatter
        else:
            seen, total = self.n_seen, self.n_seen + n
            shift = self.mean - batch_mean  # (d,)
            correction = (math.sqrt(seen * n / total) * shift).to(X.dtype)
            stacked = torch.cat([self.singular_values[:, None] * self.components, centred, correction[None]])
            mean = self.mean - shift * (n / total)
            scatter = self._scatter + batch_scatter + (seen * n / total) * shift.square().sum()
        S, Vt = self._svd(stacked)
        self.components, self.singular_values = Vt[:k], S[:k]
        ratio = S[:k].double().square() / scatter if scatter > 0 else torch.zeros_like(S[:k], dtype=torch.float64)
        self.explained_variance_ratio = ratio.to(S.dtype)
        self.mean, self._scatter, self.n_seen = mean, scatter, self.n_seen + n
        return self

    def _svd(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values and sign-fixed right singular vectors (as rows) of ``M``, randomised with
        ``q = 2k`` and the fixed seed (the caller's random state is left untouched)."""
        q = min(2 * self.n_components, *M.shape)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(M, q=q, niter=self.niter)
        Vt = V.mT  # (q, d)
        return S, Vt * sign_of_largest(Vt)[:, None]


def sign_of_largest(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the sign (+1 or -1) of its largest-magnitude entry: multiplying by it fixes the sign of
    a singular vector, which the SVD leaves arbitrary."""
    largest = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(largest < 0, -1.0, 1.0).to(rows.dtype)
