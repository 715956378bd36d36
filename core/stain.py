"""Stain normalisation as fit/transform objects: Macenko (2009) and Vahadane (2016).

Both work in optical density (OD = -log(I / I0)): an image is ``OD ≈ C · W`` with W the two stain
vectors (rows, unit length) and C the per-pixel concentrations. ``fit(reference_rgb)`` estimates the
reference's W and its 99th-percentile concentrations; ``transform(rgb)`` estimates the image's own
W and C, rescales C to the reference's range and rebuilds the image with the reference's W.

- Macenko: W from the extreme angles of OD pixels projected on their two main eigenvectors.
- Vahadane: W by sparse non-negative matrix factorisation (dictionary learning with non-negative
  atoms and codes, L1 penalty λ), C by non-negative lasso (ISTA); structure-preserving.

The stain with the larger red-channel OD is put first (haematoxylin for H&E). For PAS the two
vectors are the magenta PAS reaction and the haematoxylin counterstain; the method is the same.
A fitted normaliser serialises to a small dict (``to_dict``/``create_stain_normalizer``), which
travels in checkpoint sidecars so inference needs no reference image.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["StainError", "StainNormalizer", "MacenkoNormalizer", "VahadaneNormalizer", "PerStainNormalizer",
           "create_stain_normalizer", "tissue_mask", "pick_reference", "STAIN_METHODS"]

I0 = 255.0


class StainError(GlomError, ValueError):
    """Stain separation failed (e.g. an image with too little tissue) or the normaliser is unfitted."""


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB → optical density, same shape, float32 (≥ 0)."""
    return -np.log(np.maximum(rgb.astype(np.float32), 1.0) / I0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Optical density → uint8 RGB."""
    return np.clip(I0 * np.exp(-od), 0, 255).round().astype(np.uint8)


def tissue_mask(rgb: np.ndarray, luminosity_threshold: float = 0.8) -> np.ndarray:
    """True where a pixel is tissue: CIELAB lightness below ``luminosity_threshold`` × 100."""
    from skimage.color import rgb2lab

    lightness = rgb2lab(rgb)[..., 0] / 100.0
    return lightness < luminosity_threshold


def _order_and_normalise(w: np.ndarray) -> np.ndarray:
    w = np.abs(w) if (w < 0).all() else np.clip(w, 0, None)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-8)
    return w if w[0, 0] >= w[1, 0] else w[[1, 0]]


def _macenko_matrix(od: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Stain vectors at the ``alpha``/``100-alpha`` percentile angles in the OD eigenplane."""
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, [2, 1]]
    plane = plane * np.where(plane[0] < 0, -1.0, 1.0)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    return _order_and_normalise(np.stack([v1, v2]))


def _sparse_nmf(od: np.ndarray, lam: float, iters: int = 30) -> np.ndarray:
    """Dictionary W (2×3, rows ≥ 0, unit norm) minimising ½‖OD − C·W‖² + λ‖C‖₁ with C ≥ 0.

    Alternates non-negative lasso codes (ISTA) and a non-negative least-squares dictionary
    step, started from the Macenko estimate (sparse NMF as in Vahadane et al., eq. 3).
    """
    w = _macenko_matrix(od)
    c = None
    for _ in range(iters):
        c = _nnls_lasso(od, w, lam, iters=20, start=c)
        gram = c.T @ c + 1e-6 * np.eye(2)
        w_new = np.clip(np.linalg.solve(gram, c.T @ od), 0, None)
        norms = np.linalg.norm(w_new, axis=1, keepdims=True)
        if (norms < 1e-8).any():
            raise StainError("sparse NMF found fewer than two stains in this image")
        # Codes absorb the scale, so the dictionary rows stay unit vectors.
        c = c * norms.T
        w_new = w_new / norms
        converged = np.abs(w_new - w).max() < 1e-4
        w = w_new
        if converged:
            break
    return _order_and_normalise(w)


def _nnls_lasso(od: np.ndarray, w: np.ndarray, lam: float, iters: int = 60,
                start: np.ndarray | None = None) -> np.ndarray:
    """argmin_C≥0 ½‖OD − C·W‖² + λ‖C‖₁ for every pixel at once (ISTA; W is 2×3)."""
    gram = w @ w.T
    step = 1.0 / max(np.linalg.eigvalsh(gram).max(), 1e-8)
    c = start if start is not None else np.clip(np.linalg.lstsq(w.T, od.T, rcond=None)[0].T, 0, None)
    odw = od @ w.T
    for _ in range(iters):
        c = np.clip(c - step * (c @ gram - odw + lam), 0, None)
    return c


class StainNormalizer:
    """Base class: subclasses estimate a stain matrix; concentrations, fit and transform live here."""

    method = ""

    def __init__(self, luminosity_threshold: float = 0.8, percentile: float = 99.0) -> None:
        self.luminosity_threshold = luminosity_threshold
        self.percentile = percentile
        self.stain_matrix: np.ndarray | None = None
        self.max_concentrations: np.ndarray | None = None

    # Subclasses implement these two.
    def stain_matrix_of(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def concentrations(self, od: np.ndarray, w: np.ndarray) -> np.ndarray:
        c = np.linalg.lstsq(w.T, od.T, rcond=None)[0].T
        return np.clip(c, 0, None)

    def _tissue_od(self, rgb: np.ndarray, min_pixels: int = 100) -> np.ndarray:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise StainError(f"expected an HWC uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        od = rgb_to_od(rgb).reshape(-1, 3)
        mask = tissue_mask(rgb, self.luminosity_threshold).reshape(-1)
        od = od[mask & (od.sum(1) > 0.15)]
        if len(od) < min_pixels:
            raise StainError(f"only {len(od)} tissue pixels: is this image mostly background?")
        return od

    def fit(self, reference_rgb: np.ndarray) -> StainNormalizer:
        """Learn the reference stain vectors and concentration range from one HWC uint8 image."""
        w = self.stain_matrix_of(reference_rgb)
        c = self.concentrations(rgb_to_od(reference_rgb).reshape(-1, 3), w)
        self.stain_matrix = w
        self.max_concentrations = np.percentile(c, self.percentile, axis=0)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Re-colour ``rgb`` (HWC uint8) with the reference's stains; same shape and dtype.

        An image whose stains cannot be separated (almost no tissue) is returned unchanged.
        """
        if self.stain_matrix is None or self.max_concentrations is None:
            raise StainError("the stain normaliser is not fitted: call fit(reference_rgb) first")
        try:
            w = self.stain_matrix_of(rgb)
        except StainError as e:
            log.debug("stain normalisation skipped: %s", e)
            return rgb
        od = rgb_to_od(rgb).reshape(-1, 3)
        c = self.concentrations(od, w)
        max_c = np.maximum(np.percentile(c, self.percentile, axis=0), 1e-6)
        c = c * (self.max_concentrations / max_c)
        return od_to_rgb(c @ self.stain_matrix).reshape(rgb.shape)

    __call__ = transform

    def to_dict(self) -> dict[str, Any]:
        """Fitted state as plain JSON-able data."""
        if self.stain_matrix is None or self.max_concentrations is None:
            raise StainError("the stain normaliser is not fitted")
        return {"method": self.method, "stain_matrix": self.stain_matrix.tolist(),
                "max_concentrations": self.max_concentrations.tolist(),
                "luminosity_threshold": self.luminosity_threshold, "percentile": self.percentile,
                **self._params()}

    def _params(self) -> dict[str, Any]:
        return {}


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. 2009: stain vectors from the angular extremes in the OD eigenplane."""

    method = "macenko"

    def __init__(self, alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha

    def stain_matrix_of(self, rgb: np.ndarray) -> np.ndarray:
        return _macenko_matrix(self._tissue_od(rgb), self.alpha)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


class VahadaneNormalizer(StainNormalizer):
    """Vahadane et al. 2016: sparse NMF stain matrix, non-negative lasso concentrations."""

    method = "vahadane"

    def __init__(self, lambda_dict: float = 0.1, lambda_conc: float = 0.01, max_pixels: int = 20000,
                 seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lambda_dict = lambda_dict
        self.lambda_conc = lambda_conc
        self.max_pixels = max_pixels
        self.seed = seed

    def stain_matrix_of(self, rgb: np.ndarray) -> np.ndarray:
        od = self._tissue_od(rgb)
        if len(od) > self.max_pixels:
            idx = np.random.default_rng(self.seed).choice(len(od), self.max_pixels, replace=False)
            od = od[idx]
        w = _sparse_nmf(od, self.lambda_dict)
        if not np.isfinite(w).all():
            raise StainError("sparse NMF did not converge on this image")
        return w

    def concentrations(self, od: np.ndarray, w: np.ndarray) -> np.ndarray:
        return _nnls_lasso(od, w, self.lambda_conc)

    def _params(self) -> dict[str, Any]:
        return {"lambda_dict": self.lambda_dict, "lambda_conc": self.lambda_conc,
                "max_pixels": self.max_pixels, "seed": self.seed}


class PerStainNormalizer:
    """One fitted normaliser per stain (seed paper 003: one reference image each for HE and PAS).

    ``normalizer(rgb, stain)`` uses that stain's normaliser; an unknown or missing stain uses
    ``default`` (a key of ``normalizers``), or leaves the image unchanged when there is none.
    """

    method = "per_stain"

    def __init__(self, normalizers: dict[str, StainNormalizer], default: str | None = None) -> None:
        if not normalizers:
            raise StainError("per-stain normalisation needs at least one fitted normaliser")
        if default is not None and default not in normalizers:
            raise StainError(f"default stain {default!r} has no normaliser ({sorted(normalizers)})")
        self.normalizers = normalizers
        self.default = default

    def transform(self, rgb: np.ndarray, stain: str | None = None) -> np.ndarray:
        """Normalise with the normaliser of ``stain`` (or the default)."""
        norm = self.normalizers.get(stain) if stain is not None else None
        if norm is None and self.default is not None:
            norm = self.normalizers[self.default]
        return rgb if norm is None else norm.transform(rgb)

    __call__ = transform

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "default": self.default,
                "stains": {k: n.to_dict() for k, n in self.normalizers.items()}}


def pick_reference(images: list[np.ndarray], luminosity_threshold: float = 0.8) -> int:
    """Index of the most typical image: tissue mean CIELAB colour closest to the median of all.

    A dark or pale outlier as reference shifts every crop towards it; the median one does not.
    """
    from skimage.color import rgb2lab

    means = []
    for rgb in images:
        lab = rgb2lab(rgb)
        mask = lab[..., 0] / 100.0 < luminosity_threshold
        means.append(lab[mask].mean(0) if mask.sum() > 100 else np.full(3, np.inf))
    m = np.asarray(means)
    finite = np.isfinite(m).all(1)
    if not finite.any():
        raise StainError("no image has enough tissue to serve as stain reference")
    med = np.median(m[finite], axis=0)
    d = np.where(finite, np.linalg.norm(np.where(finite[:, None], m, 0) - med, axis=1), np.inf)
    return int(np.argmin(d))


STAIN_METHODS: dict[str, type[StainNormalizer]] = {
    "macenko": MacenkoNormalizer,
    "vahadane": VahadaneNormalizer,
}


def create_stain_normalizer(name: str | dict[str, Any], **kwargs: Any) -> StainNormalizer | PerStainNormalizer:
    """A normaliser by name (``macenko``, ``vahadane``), or rebuilt fitted from ``to_dict()`` output."""
    state: dict[str, Any] | None = None
    if isinstance(name, dict) and name.get("method") == PerStainNormalizer.method:
        return PerStainNormalizer({k: create_stain_normalizer(v) for k, v in name["stains"].items()},
                                  name.get("default"))
    if isinstance(name, dict):
        state = {k: v for k, v in name.items() if k != "reference"}
        name = state.pop("method")
        w, mc = state.pop("stain_matrix"), state.pop("max_concentrations")
        kwargs = {**state, **kwargs}
    if name not in STAIN_METHODS:
        raise StainError(f"unknown stain normalisation {name!r}: use one of {sorted(STAIN_METHODS)}")
    norm = STAIN_METHODS[name](**kwargs)
    if state is not None:
        norm.stain_matrix = np.asarray(w, dtype=np.float64)
        norm.max_concentrations = np.asarray(mc, dtype=np.float64)
    return norm
