"""Hadamard matrices and fast orthogonal transforms (for QuaRot's rotations).

A Hadamard matrix ``H`` of order ``n`` has entries ``+-1`` and ``H H^T = n I``; ``H / sqrt(n)`` is
orthogonal and spreads every coordinate evenly over all outputs (``|entry| = 1/sqrt(n)``), which is
what flattens activation outliers. One exists only for ``n`` = 1, 2 or a multiple of 4. Built here:

* Sylvester: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]] = H_2 (x) H_n`` (any power of two).
  ``x @ H_p`` is computed by :func:`fwht` as a few small matrix products (``H_p = H_a (x) H_b``).
* Paley I: for a prime ``q = 3 (mod 4)``, order ``q + 1`` (12, 20, 24, 32, 44, 48, 60, 72, 84, ...).
  With the Jacobsthal matrix ``Q_ij = chi(j - i)`` (``chi`` the Legendre symbol mod q, antisymmetric
  here) and ``S = [[0, 1^T], [-1, Q]]``: ``H = I + S``.
* Paley II: for a prime ``q = 1 (mod 4)``, order ``2 (q + 1)`` (12, 28, 36, 60, 76, ...). ``Q`` is
  symmetric; ``C = [[0, 1^T], [1, Q]]``; every entry of ``C`` is replaced by a 2x2 block:
  ``0 -> [[1, -1], [-1, -1]]`` and ``+-1 -> +-[[1, 1], [1, -1]]``.
* Kronecker products of these: ``H_a (x) H_b`` has order ``a b``.

For a size ``n = m * p`` (``p`` a power of two) the transform ``x @ (K (x) H_p / sqrt(p))`` with a
small orthogonal ``m x m`` factor ``K`` is computed as ``K^T X H_p / sqrt(p)`` on ``x`` viewed as
``(..., m, p)``: the only dense matrix kept is ``K``. :func:`rotation_factor` picks the smallest ``m``
(the odd part of ``n`` times a power of two) with a Paley construction, e.g. 576 = 36 * 16 (Paley II,
q = 17) and 1536 = 12 * 128 (Paley I, q = 11). When no construction is known here (e.g. 172 = 4 * 43:
a Hadamard matrix of order 172 exists but needs a Williamson-type search; 43, 86 have none), ``K``
is a seeded random orthogonal matrix of the whole size ``n`` (QR of a Gaussian, signs fixed) and a
log line says so.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- constructions
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q_ij = chi(j - i)`` with the quadratic character ``chi`` of the prime field GF(q)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def sylvester(n: int) -> Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), float64 +-1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley1(q: int) -> Tensor:
    """Paley I Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 (mod 4), got {q}")
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + S


def paley2(q: int) -> Tensor:
    """Paley II Hadamard matrix of order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 (mod 4), got {q}")
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    zero_blk = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_blk = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, one_blk) + torch.kron((C == 0).double(), zero_blk)


def _paley(m: int) -> Tensor | None:
    """A Paley Hadamard matrix of order ``m`` if one of the two constructions reaches it."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    return None


def _split(n: int) -> tuple[int, int]:
    """``n = odd * 2^k`` -> ``(odd, 2^k)``."""
    p = n & -n
    return n // p, p


def hadamard_matrix(n: int) -> Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries +-1): Sylvester, or Paley (x) Sylvester.

    Raises ValueError when no construction here reaches ``n``.
    """
    odd, p = _split(n)
    if odd == 1:
        return sylvester(n)
    m = odd
    while m <= n:
        K = _paley(m)
        if K is not None:
            return torch.kron(K, sylvester(n // m))
        m *= 2
    raise ValueError(f"no Hadamard construction of order {n} here (Sylvester, Paley I/II with a prime q, "
                     "and their Kronecker products)")


def has_hadamard(n: int) -> bool:
    try:
        hadamard_matrix(n)
        return True
    except ValueError:
        return False


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A seeded random orthogonal matrix (float64): QR of a Gaussian with the signs of R's diagonal fixed,
    which makes it Haar-distributed."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    d = torch.diagonal(R).sign()
    d[d == 0] = 1
    return Q * d[None, :]


def rotation_factor(n: int, seed: int = 0) -> tuple[Tensor, bool]:
    """The small dense factor ``K`` (m x m, orthogonal, float64) of the size-``n`` rotation
    ``K (x) H_p / sqrt(p)`` with ``p = n / m`` a power of two; and whether it is a Hadamard rotation.

    ``K`` is ``[[1]]`` for powers of two, a normalized Paley matrix when one reaches ``odd * 2^j``,
    else a seeded random orthogonal matrix of the whole size ``n`` (logged).
    """
    odd, _ = _split(n)
    if odd == 1:
        return torch.ones(1, 1, dtype=torch.float64), True
    m = odd
    while m <= n:
        K = _paley(m)
        if K is not None:
            return K / math.sqrt(m), True
        m *= 2
    log.info("no Hadamard construction of order %d here: using a seeded random orthogonal matrix (seed %d)",
             n, seed)
    return random_orthogonal(n, seed), False


# ---------------------------------------------------------------------------------- transforms
_FACTOR = 64  # Sylvester factors up to this order are applied as dense matrix products


@functools.lru_cache(maxsize=64)
def _sylvester_on(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return sylvester(n).to(device=device, dtype=dtype)


def fwht(x: Tensor, normalize: bool = True) -> Tensor:
    """Fast Walsh-Hadamard transform of the last dimension: ``x @ H_p`` (``/ sqrt(p)`` if ``normalize``),
    ``H_p`` Sylvester's matrix, ``p`` a power of two.

    Sylvester's matrices are Kronecker powers of ``H_2``, so ``H_p = H_a (x) H_f (x) H_c`` for any split
    ``p = a f c``; with ``x`` viewed as ``(a, f, c)`` each factor acts on its own axis. Factors of order up
    to 64 are applied as matrix products (``O(p (f_1 + f_2 + ...))`` flops, all in BLAS, which beats
    ``log2 p`` butterfly passes in PyTorch).
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"the fast Walsh-Hadamard transform needs a power-of-two size, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    c = 1  # size of the axes already transformed (the innermost ones)
    while c < p:
        f = min(_FACTOR, p // c)
        H = _sylvester_on(f, y.dtype, y.device)
        if c == 1:
            y = (y.reshape(-1, f) @ H).reshape(-1, p)
        else:  # the middle axis of (rows * a, f, c): H^T Y (H is symmetric)
            y = torch.matmul(H, y.reshape(-1, f, c)).reshape(-1, p)
        c *= f
    y = y.reshape(*lead, p)
    return y / math.sqrt(p) if normalize and p > 1 else y


def kron_transform(x: Tensor, K: Tensor, inner: str = "hadamard") -> Tensor:
    """``x @ (K (x) M)`` on the last dimension, ``K`` (m x m) dense, ``M`` = ``H_p / sqrt(p)`` (``inner``
    "hadamard") or ``I_p`` ("identity"), ``p = n / m``.

    With ``x`` viewed as ``X`` (..., m, p): ``x (K (x) M) = K^T X M``. ``K`` is cast to ``x``'s dtype.
    """
    n = x.shape[-1]
    m = K.shape[0]
    if n % m:
        raise ValueError(f"a rotation with a {m}x{m} factor does not fit a dimension of {n}")
    p = n // m
    X = x.reshape(*x.shape[:-1], m, p)
    if inner == "hadamard":
        X = fwht(X)
    elif inner != "identity":
        raise ValueError(f"unknown inner transform {inner!r}; use hadamard or identity")
    if m > 1:
        X = torch.matmul(K.to(device=x.device, dtype=x.dtype).T, X)
    return X.reshape(x.shape)


def hadamard_transform(x: Tensor, dim: int = -1, seed: int = 0) -> Tensor:
    """The orthogonal rotation of :func:`rotation_factor` applied along ``dim``: ``x @ H_n / sqrt(n)``
    when a Hadamard construction reaches ``n = x.shape[dim]`` (the fast transform for the power-of-two
    part), else ``x @ R`` with the seeded random orthogonal fallback."""
    x = x.movedim(dim, -1)
    K, _ = rotation_factor(x.shape[-1], seed)
    return kron_transform(x, K).movedim(-1, dim)


def rotation_matrix(n: int, seed: int = 0) -> Tensor:
    """The dense ``n x n`` matrix of :func:`hadamard_transform` (float64)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64), seed=seed)


def random_signs(n: int, seed: int = 0) -> Tensor:
    """``n`` seeded random signs (float64 +-1), the ``s`` of :func:`random_hadamard`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> Tensor:
    """A random Hadamard rotation ``Q = diag(s) H_n / sqrt(n)`` (random signs ``s``, float64, orthogonal):
    rows of the normalized Hadamard matrix flipped at random. Falls back to the random orthogonal matrix
    when no Hadamard construction reaches ``n``. ``x @ Q`` is ``hadamard_transform(x * s)`` without the
    dense matrix."""
    return random_signs(n, seed)[:, None] * rotation_matrix(n, seed)


__all__ = ["sylvester", "paley1", "paley2", "hadamard_matrix", "has_hadamard", "random_orthogonal",
           "rotation_factor", "fwht", "kron_transform", "hadamard_transform", "rotation_matrix",
           "random_signs", "random_hadamard"]
