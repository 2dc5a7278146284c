"""Drift: has the distribution of a score or feature moved since the model was fitted?

The population stability index (PSI) compares a recent sample with a reference one (e.g. the
validation period's scores) over bins cut at the reference's quantiles:

    PSI = sum over bins i of (r_i - e_i) * ln(r_i / e_i)

with e_i the share of the reference and r_i the share of the recent sample in bin i. It is
the symmetrised Kullback-Leibler divergence of the two binned distributions, KL(r||e) +
KL(e||r), so it is >= 0, and 0 only when every bin holds the same share.

The usual reading (Siddiqi 2006, "Credit Risk Scorecards", Wiley, ch. 8; its statistical
properties in Yurdakul 2018, "Statistical properties of population stability index", PhD
dissertation, Western Michigan University):

    PSI < 0.1          stable, no action
    0.1 <= PSI < 0.25  moderate shift, investigate
    PSI >= 0.25        major shift, the model likely needs retraining

Yurdakul shows that PSI grows with the number of bins and shrinks with sample size, so these
cut-offs suit the customary 10 bins and samples of a few thousand or more.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["PSI_MAJOR", "PSI_MODERATE", "population_stability_index", "quantile_edges"]

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25


def population_stability_index(
    reference: npt.ArrayLike, recent: npt.ArrayLike, bins: int = 10, eps: float = 1e-4
) -> float:
    """PSI of ``recent`` against ``reference`` over ``bins`` quantile bins of the reference.

    Bins are right-closed, (edge_{i-1}, edge_i], with open ends, so values beyond the
    reference's range land in the first or last bin. Ties in the reference give repeated
    quantiles; repeated edges are merged, so a point mass gets one bin instead of empty ones,
    and fewer than ``bins`` bins may remain. A share of 0 (a bin one sample never reaches)
    would make the logarithm infinite: shares are floored at ``eps``, as is customary.
    """
    ref, new = _sample(reference, "reference"), _sample(recent, "recent")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, however: eps={eps}")
    edges = quantile_edges(ref, bins)
    e = np.maximum(_shares(ref, edges), eps)
    r = np.maximum(_shares(new, edges), eps)
    return float(np.sum((r - e) * np.log(r / e)))


def quantile_edges(reference: npt.ArrayLike, bins: int = 10) -> np.ndarray:
    """The distinct inner edges (at most bins - 1): the reference's k/bins quantiles."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, however: bins={bins}")
    ref = _sample(reference, "reference")
    return np.unique(np.quantile(ref, np.arange(1, bins) / bins))


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # side="left" puts a value equal to an edge in the bin that edge closes: (lo, edge].
    index = np.searchsorted(edges, values, side="left")
    return np.bincount(index, minlength=edges.size + 1) / values.size


def _sample(values: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"the {name} sample must not be empty")
    if np.isnan(arr).any():
        raise ValueError(f"the {name} sample must hold no NaN, however {np.isnan(arr).sum()} do")
    return arr
