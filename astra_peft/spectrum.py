"""The spectrum of a layer's statistic: which r eigenvectors Astra takes, and how it finds only those.

All indices are into the eigenvalues sorted ascending, λ[0] ≤ … ≤ λ[d-1].
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .config import AstraConfig


@dataclass
class Selection:
    """What was selected in one layer, for the initialisation report."""

    indices: list[int]  # ascending indices into the full spectrum
    eigenvalues: list[float]
    n_degenerate: int  # eigenvalues at or below the threshold, in the whole spectrum
    n_selected_degenerate: int
    threshold: float
    effective_rank: float


def effective_rank(eigenvalues: torch.Tensor | np.ndarray) -> float:
    """Roy & Vetterli's effective rank, paper Eq. 9: exp of the entropy of the normalised spectrum.

    Args:
        eigenvalues: The spectrum (any order); negative values (rounding) count as zero.

    Returns:
        exp(−Σ pᵢ log pᵢ) with pᵢ = λᵢ / Σλ, between 1 and the number of non-zero eigenvalues; 0.0 for an
        all-zero spectrum.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """All eigenvalues, ascending. Cheaper than a full decomposition: no eigenvectors are formed."""
    if matrix.is_cuda:
        return torch.linalg.eigvalsh(matrix)
    import scipy.linalg  # CPU paths only: a GPU machine need not have SciPy

    values = scipy.linalg.eigh(matrix.numpy(), eigvals_only=True, check_finite=False)
    return torch.from_numpy(values)


class _Tridiagonal:
    """One Householder reduction A = Q·T·Qᵀ (LAPACK dsytrd) serving both what Astra needs of a dense CPU matrix:
    every eigenvalue (from T, O(d²)) and the eigenvectors of one index range (MRRR on T, then Q applied to them).
    Asking LAPACK for the two separately reduces A twice, and the reduction is most of the cost."""

    def __init__(self, matrix: torch.Tensor):
        import scipy.linalg

        lapack = scipy.linalg.lapack
        a = np.asarray(matrix.numpy(), dtype=np.float64)
        n = a.shape[0]
        lwork, info = lapack.dsytrd_lwork(n, lower=1)  # the wrapper's default workspace is unblocked: 2x slower
        self.c, self.diag, self.off, self.tau, info = lapack.dsytrd(a, lower=1, lwork=max(int(lwork), 1))
        if info != 0:
            raise np.linalg.LinAlgError(f"dsytrd failed (info={info})")
        self.values = torch.from_numpy(
            scipy.linalg.eigvalsh_tridiagonal(self.diag, self.off, lapack_driver="sterf", check_finite=False)
        )

    def vectors(self, lo: int, hi: int) -> torch.Tensor:
        """Eigenvectors for ascending indices lo..hi inclusive, as columns."""
        import scipy.linalg

        lapack = scipy.linalg.lapack
        _, z = scipy.linalg.eigh_tridiagonal(self.diag, self.off, select="i", select_range=(lo, hi),
                                             lapack_driver="stemr", check_finite=False)
        n = z.shape[0]
        if n < 2:
            return torch.from_numpy(np.array(z))
        # dsytrd's Q (lower) is I ⊕ the Householder product stored below the subdiagonal: LAPACK's dormtr calls
        # dormqr on exactly these blocks, and scipy exposes dormqr.
        z = np.asfortranarray(z)
        tail, _, info = lapack.dormqr("L", "N", self.c[1:, : n - 1], self.tau, z[1:], lwork=max(64 * z.shape[1], 1))
        if info != 0:
            raise np.linalg.LinAlgError(f"dormqr failed (info={info})")
        z[1:] = tail
        return torch.from_numpy(np.ascontiguousarray(z))


def eigenvectors(matrix: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Eigenvectors for ascending indices lo..hi inclusive, as columns.

    On CPU, LAPACK's MRRR solver (syevr) computes only the requested ones; on GPU, where a full
    `eigh` is fast, the full decomposition is sliced and freed.
    """
    if matrix.is_cuda:
        return torch.linalg.eigh(matrix)[1][:, lo : hi + 1].clone()
    import scipy.linalg

    _, vectors = scipy.linalg.eigh(
        matrix.numpy(), subset_by_index=[lo, hi], driver="evr", check_finite=False
    )
    return torch.from_numpy(vectors)


def full_eigenvectors(matrix: torch.Tensor) -> torch.Tensor:
    """All eigenvectors, ascending: divide-and-conquer LAPACK (syevd) on CPU, torch on GPU."""
    if matrix.is_cuda:
        return torch.linalg.eigh(matrix)[1]
    import scipy.linalg

    _, vectors = scipy.linalg.eigh(matrix.numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(vectors)


def selection_indices(n: int, r: int, how: str, seed: int = 0, name: str = "") -> np.ndarray:
    """r ascending indices into a spectrum of n eigenvalues (see `AstraConfig.eigen_selection`)."""
    if how == "smallest":
        start = 0
    elif how == "largest":
        start = n - r
    elif how == "middle":
        start = (n - r) // 2
    elif how == "lower_quartile":
        start = n // 4 - r // 2
    elif how == "upper_quartile":
        start = (3 * n) // 4 - r // 2
    elif how == "random":
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        return np.sort(rng.choice(n, size=r, replace=False))
    else:
        raise ValueError(f"Unknown eigen_selection {how!r}.")
    start = min(max(start, 0), n - r)
    return np.arange(start, start + r)


def degenerate_threshold(values: torch.Tensor, config: AstraConfig) -> float:
    rtol = config.null_space_rtol
    if rtol is None:  # numpy.linalg.matrix_rank's tolerance, for the float64 decomposition
        rtol = values.shape[0] * torch.finfo(torch.float64).eps
    return rtol * max(float(values[-1]), 0.0)


class _Dense:
    """The spectrum of an explicit d × d matrix."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix.to(device=matrix.device if matrix.is_cuda else "cpu", dtype=torch.float64)
        self._tri = None if self.matrix.is_cuda else _Tridiagonal(self.matrix)
        self.values = eigenvalues(self.matrix) if self._tri is None else self._tri.values
        self._full: torch.Tensor | None = None
        self._span: tuple[int, torch.Tensor] | None = None  # (first index, eigenvectors from there on) held

    def vectors(self, idx: np.ndarray) -> torch.Tensor:
        if self._full is not None:
            return self._full[:, torch.from_numpy(idx)]
        if self._span is not None and idx[0] >= self._span[0]:  # the complement of a cluster, already computed
            return self._span[1][:, torch.from_numpy(idx - self._span[0])]
        # One solver call for the contiguous span; a random pick spans (almost) everything anyway.
        lo, hi = int(idx[0]), int(idx[-1])
        span = eigenvectors(self.matrix, lo, hi) if self._tri is None else self._tri.vectors(lo, hi)
        return span[:, torch.from_numpy(idx - idx[0])]

    def cluster(self, k: int) -> tuple[torch.Tensor, bool]:
        """An orthonormal basis of the k smallest eigenvalues' eigenspace (False), or of its complement (True),
        whichever has fewer vectors."""
        d = self.values.shape[0]
        if k >= d:  # the whole space: its complement is empty
            return self.matrix.new_zeros(d, 0), True
        if self._tri is None:  # GPU: a full eigh is fast there
            self._full = full_eigenvectors(self.matrix)
            return (self._full[:, :k], False) if k <= d - k else (self._full[:, k:], True)
        # On CPU the reduction dsytrd already made serves these min(k, d − k) vectors too (MRRR on T, then Q):
        # a divide-and-conquer decomposition would reduce the matrix a second time, most of its cost.
        if k <= d - k:
            return self._tri.vectors(0, k - 1), False
        rest = self._tri.vectors(k, d - 1)
        self._span = (k, rest)  # the regular directions a selection takes are among these
        return rest, True

    def projector(self, k: int):
        """(columns, None): `columns(cols)` gives P[:, cols], P the projector onto the k-dimensional cluster."""
        basis, complement = self.cluster(k)
        if complement:
            return _complement_projector(basis), None
        return (lambda cols: basis @ basis[cols].T), None


class _Factored:
    """The spectrum of F·G·Fᵀ (d × p factor F, p < d) without forming it: with the thin QR F = QR, its
    non-zero eigenpairs are those of the p × p matrix R·G·Rᵀ mapped by Q, and the other d − p
    eigenvalues are exactly zero (W's left null space, e.g. 960 of gate_proj's 1536 in SmolLM2)."""

    def __init__(self, f: torch.Tensor, g: torch.Tensor):
        device = f.device if f.is_cuda else "cpu"
        f, g = (t.to(device=device, dtype=torch.float64) for t in (f, g))
        # Q stays implicit (Householder reflectors, applied by ormqr): forming it would double the QR's cost,
        # and only a few of its products are ever needed.
        self.reflectors, self.tau = torch.geqrf(f)
        p = f.shape[1]
        r = self.reflectors[:p].triu()
        self.small = _Dense(_symmetrised(r @ g @ r.T))
        self.structural = f.shape[0] - p
        lam = self.small.values
        values = torch.cat([torch.zeros(self.structural, dtype=lam.dtype, device=lam.device), lam])
        self.values, order = torch.sort(values, stable=True)
        self.source = (order - self.structural).cpu().numpy()  # index into the small spectrum, < 0: structural

    def _q(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Q·x for p-row x (the thin Q), or Qᵀ·x with the d − p rows of the full Q's complement kept."""
        if not transpose:
            x = torch.cat([x, x.new_zeros(self.structural, x.shape[1])])
        return torch.ormqr(self.reflectors, self.tau, x, left=True, transpose=transpose)

    def vectors(self, idx: np.ndarray) -> torch.Tensor:
        cols = self.source[idx]  # ascending, as idx is: the sort above keeps the small spectrum's order
        if (cols < 0).any():
            raise AssertionError("structural zeros are degenerate and never selected as regular directions")
        return self._q(self.small.vectors(cols))

    def projector(self, k: int):
        # The k degenerate directions are the structural zeros plus the small spectrum's first m eigenvalues; the
        # rest span range(F) = range(Q) when m = 0, which needs no eigenvector at all (the usual case: gate/up).
        # In the coordinates of the full reflector product H (z = Hᵀe) the projector is diag(P_m, I), with P_m the
        # small matrix's projector onto its m smallest eigenvalues' eigenspace (0 in the usual case m = 0, where only
        # the structural zeros are degenerate): only min(m, p − m) small eigenvectors are computed, Q never formed.
        m = k - self.structural
        p = self.reflectors.shape[1]
        basis, complement = self.small.cluster(m) if m > 0 else (None, False)

        def columns(cols):  # Hᵀ·P·E = diag(P_m, I)·Hᵀ·E: P's columns in H's coordinates, which keep inner products
            e = self.reflectors.new_zeros(self.reflectors.shape[0], len(cols))
            e[torch.as_tensor(cols, device=e.device), torch.arange(len(cols), device=e.device)] = 1
            z = self._q(e, transpose=True)
            if basis is None:
                z[:p] = 0
            elif complement:
                z[:p] -= basis @ (basis.T @ z[:p])
            else:
                z[:p] = basis @ (basis.T @ z[:p])
            return z

        # Gram–Schmidt runs on those coordinates, and only the m vectors it keeps are mapped back by H (one ormqr
        # of m columns instead of one per examined column).
        return columns, lambda z: torch.ormqr(self.reflectors, self.tau, z, left=True, transpose=False)


def _symmetrised(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2  # m is freed on return: one d × d matrix is held through the decomposition, not two


def _complement_projector(u: torch.Tensor):
    """Columns of P = I − U Uᵀ, the projector onto the complement of U's orthonormal columns, built column by
    column: never a d × d identity (d = d_out can be 28672)."""

    def columns(cols):
        out = -(u @ u[cols].T)
        out[torch.as_tensor(cols, device=u.device), torch.arange(len(cols), device=u.device)] += 1
        return out

    return columns


def select_eigenvectors(
    matrix: torch.Tensor | tuple[torch.Tensor, torch.Tensor], r: int, config: AstraConfig, name: str
) -> tuple[torch.Tensor, Selection]:
    """The (d, r) orthonormal basis Q Astra puts in B, chosen by `config`, and what was chosen.

    `matrix` is the d × d statistic, or factors (F, G) of it, F·G·Fᵀ, which is cheaper when F has fewer
    columns than rows; both give the same selection.
    """
    if isinstance(matrix, tuple):
        f, g = matrix
        if f.shape[1] < f.shape[0]:
            spectrum = _Factored(f, g)
        else:
            spectrum = _Dense(_symmetrised(f @ g @ f.T))
    else:
        spectrum = _Dense(matrix)
    values = spectrum.values
    d = values.shape[0]
    threshold = degenerate_threshold(values, config)
    k = int((values <= threshold).sum())
    base = k if config.null_space == "exclude" else 0
    if d - base < r:
        raise ValueError(
            f"Layer '{name}': only {d - base} of its {d} output directions have non-degenerate eigenvalues "
            f"(> {threshold:.3g}), fewer than the rank r={r}; lower r or use null_space='keep'."
        )
    idx = base + selection_indices(d - base, r, config.eigen_selection, config.seed, name)
    degenerate = idx[idx < k]
    if len(degenerate) and config.null_space == "raise":
        raise ValueError(
            f"Layer '{name}': {len(degenerate)} of the {r} selected eigenvectors have degenerate eigenvalues "
            f"(≤ {threshold:.3g}; {k} of {d} are), so their A = QᵀW would be ~0. Use null_space='exclude' to "
            "select among the directions the activations occupy, or 'keep' for the paper's literal recipe."
        )
    regular = idx[idx >= k]
    parts = []
    if len(degenerate):
        columns, lift = spectrum.projector(k)
        basis = _null_space_basis(columns, d, k, len(degenerate))
        parts.append(basis if lift is None else lift(basis))
    if len(regular):
        parts.append(spectrum.vectors(regular))
    q = _canonical_signs(torch.cat(parts, dim=1))
    info = Selection(
        indices=idx.tolist(),
        eigenvalues=values[torch.from_numpy(idx)].tolist(),
        n_degenerate=k,
        n_selected_degenerate=len(degenerate),
        threshold=threshold,
        effective_rank=effective_rank(values),
    )
    return q, info


def _null_space_basis(project, d: int, k: int, m: int) -> torch.Tensor:
    """m orthonormal vectors of a k-dimensional degenerate eigenspace, chosen deterministically.

    A solver's basis of a degenerate eigenspace is arbitrary and differs across LAPACK builds; the
    projector P onto the space is not. Gram–Schmidt on P's columns e_0, e_1, … in order (`project(cols)`
    gives P[:, cols]), skipping columns that add little, gives a basis that depends only on P. `project` may
    give them in other orthonormal coordinates (Hᵀ·P[:, cols], see `_Factored.projector`): inner products and
    norms are the same there, so the same columns are kept, and the caller maps the m vectors back.
    """
    basis = None  # d × n, the directions chosen so far
    start = 0
    while (0 if basis is None else basis.shape[1]) < m and start < d:
        # Columns are examined in order and the first m that add enough are kept, so how many are projected at
        # a time changes only the cost: about (m − found)·d/k are needed (P e_j has squared norm k/d on
        # average), so ask for a quarter more than that, at least 8, and not the 8·m a fixed block would.
        missing = m - (0 if basis is None else basis.shape[1])
        cols = list(range(start, min(d, start + max(8, -(-5 * missing * d // (4 * k))))))
        block = project(cols)
        for j in range(block.shape[1]):
            v = block[:, j]
            if basis is not None:
                for _ in range(2):  # classical Gram–Schmidt twice is enough (Kahan–Parlett)
                    v = v - basis @ (basis.T @ v)
            norm = v.norm()
            if norm > 0.5 * (k / d) ** 0.5:  # P e_j has squared norm k/d on average
                v = (v / norm)[:, None]
                basis = v if basis is None else torch.cat([basis, v], dim=1)
                if basis.shape[1] == m:
                    break
        start += len(cols)
    if basis is None or basis.shape[1] < m:
        raise RuntimeError(f"Could not build {m} null-space directions from a {k}-dimensional eigenspace.")
    return basis


def _canonical_signs(q: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive: same subspace, reproducible B."""
    pivot = q.abs().argmax(dim=0)
    signs = torch.sign(q[pivot, torch.arange(q.shape[1])])
    signs[signs == 0] = 1
    return q * signs
