"""Linear measurement operators y = A x + σ_y n for restoration (Zhu's slides, "sampling from the posterior").

Every operator acts on batched tensors ``x`` of shape (B, *x_shape) (images (B, 3, H, W) in
[-1, 1]; dense problems (B, n)), in any float dtype, with pure torch ops (differentiable, so DPS
can backpropagate through them). Each has

* ``A(x)``, its adjoint ``A_T(y)`` (⟨A x, y⟩ = ⟨x, Aᵀ y⟩) and the Moore–Penrose pseudo-inverse
  ``A_pinv(y)`` (DDNM's A†; Wang et al. 2023, eq 3);
* the singular value decomposition in DDRM's convention (Kawar et al. 2022, §3.2 and their
  code's ``H_functions``): flattened per sample, A = U diag(s) Vᵀ with U (m×m) and V (n×n)
  orthogonal and ``singulars`` s of length r ≤ min(m, n) belonging to the first r columns of U
  and V. ``V_T(x)`` → (B, n), ``V(z)`` → x, ``U_T(y)`` → (B, m), ``U(z)`` → y.

Two liberties with the usual SVD, both noted where they occur: singular values are **not
sorted** (a mask keeps its pixel order: U = V = I and s = the mask), and an operator with one
mask per sample (an inpainting mask of shape (B, 1, H, W)) has ``singulars`` of shape (B, r).
Code that uses the SVD broadcasts ``op.singulars`` to (B, r) (:meth:`Operator.singulars_like`).
Zero singular values are allowed; they mark null-space directions.

Sizes: masks and pooling are implicit (no matrix), the Gaussian blur uses the separable
Kronecker SVD A = H ⊗ H of the 1-D blur matrix H (as DDRM's code does), ``dense`` takes any
small (m, n) matrix.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..utils import check_positive, check_range, check_tensor

__all__ = ["Operator", "inpainting", "box_mask", "random_mask", "super_resolution",
           "gaussian_blur", "colorization", "denoising", "dense", "measure",
           "Inpainting", "SuperResolution", "GaussianBlur", "Colorization", "Denoising", "Dense"]


def _orthonormal_with_mean(k: int) -> torch.Tensor:
    """A k×k orthogonal matrix whose first column is 1/√k (the "average" direction), float64."""
    M = torch.eye(k, dtype=torch.float64)
    M[:, 0] = 1.0
    Q, _ = torch.linalg.qr(M)
    if Q[0, 0] < 0:
        Q = -Q
    return Q


class Operator:
    """Base class: a linear map from (B, *x_shape) to (B, *y_shape) with its SVD.

    Subclasses define the SVD pieces (``V_T``, ``V``, ``U_T``, ``U``, ``singulars``); ``A``,
    ``A_T`` and ``A_pinv`` follow from them here and are overridden where a direct form is
    cheaper. ``rcond``: singular values ≤ rcond · max(s) count as zero in the pseudo-inverse.
    """

    name: str = "operator"
    has_svd: bool = True
    rcond: float = 1e-10

    def __init__(self, x_shape, y_shape, name=None):
        self.x_shape = tuple(int(v) for v in x_shape)
        self.y_shape = tuple(int(v) for v in y_shape)
        if name is not None:
            self.name = name

    # ------------------------------------------------------------------ sizes and checks
    @property
    def n(self) -> int:
        return math.prod(self.x_shape)

    @property
    def m(self) -> int:
        return math.prod(self.y_shape)

    @property
    def batch(self):
        """The number of samples the operator is tied to (per-sample masks), or None."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, x_shape={self.x_shape}, " \
               f"y_shape={self.y_shape})"

    def _check(self, v, shape, name):
        check_tensor(v, name)
        if tuple(v.shape[1:]) != shape or v.ndim != len(shape) + 1:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}) for "
                             f"operator {self.name!r}, got {tuple(v.shape)}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
        b = self.batch
        if b is not None and v.shape[0] != b:
            raise ValueError(f"{name} must have batch size {b} (the operator has one mask per "
                             f"sample), got {v.shape[0]}")
        return v

    def check_x(self, x, name="x"):
        return self._check(x, self.x_shape, name)

    def check_y(self, y, name="y"):
        return self._check(y, self.y_shape, name)

    # ------------------------------------------------------------------ the SVD pieces
    singulars: torch.Tensor

    def singulars_like(self, x) -> torch.Tensor:
        """``singulars`` as a (B or 1, r) tensor in x's dtype and device."""
        s = self.singulars.to(device=x.device, dtype=x.dtype)
        return s[None] if s.ndim == 1 else s

    def V_T(self, x):
        raise NotImplementedError

    def V(self, z):
        raise NotImplementedError

    def U_T(self, y):
        raise NotImplementedError

    def U(self, z):
        raise NotImplementedError

    @property
    def r(self) -> int:
        return self.singulars.shape[-1]

    def _pad(self, z, size):
        """(B, r) → (B, size) with zeros after the first r entries."""
        if z.shape[1] == size:
            return z
        return torch.cat([z, z.new_zeros(z.shape[0], size - z.shape[1])], dim=1)

    def _s_pinv(self, like):
        s = self.singulars_like(like)
        cut = self.rcond * s.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
        return torch.where(s.abs() > cut, 1.0 / torch.where(s.abs() > cut, s, torch.ones_like(s)),
                           torch.zeros_like(s))

    # ------------------------------------------------------------------ the maps
    def A(self, x):
        """y = A x (no noise)."""
        x = self.check_x(x)
        z = self.V_T(x)[:, :self.r] * self.singulars_like(x)
        return self.U(self._pad(z, self.m))

    def A_T(self, y):
        """x = Aᵀ y, the adjoint."""
        y = self.check_y(y)
        z = self.U_T(y)[:, :self.r] * self.singulars_like(y)
        return self.V(self._pad(z, self.n))

    def A_pinv(self, y):
        """x = A† y, the Moore–Penrose pseudo-inverse V diag(s⁺) Uᵀ y (Wang et al. 2023, eq 3)."""
        y = self.check_y(y)
        z = self.U_T(y)[:, :self.r] * self._s_pinv(y)
        return self.V(self._pad(z, self.n))

    def project_null(self, x):
        """(I − A† A) x: the part of x that A does not see (DDNM's null-space term)."""
        return x - self.A_pinv(self.A(x))

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """The dense (m, n) matrix, by applying A to the basis (or (B, m, n) per-sample)."""
        b = self.batch or 1
        eye = torch.eye(self.n, dtype=dtype)
        cols = []
        for i in range(b):
            basis = eye.reshape(self.n, *self.x_shape)
            ys = (self._single(i) if self.batch is not None else self).A(basis)
            cols.append(ys.reshape(self.n, self.m).T)
        return torch.stack(cols) if self.batch is not None else cols[0]

    def _single(self, i):
        raise NotImplementedError


# ---------------------------------------------------------------------------- inpainting
class Inpainting(Operator):
    """A = diag(m): keep the pixels where the mask is True (y has x's shape, zeros elsewhere).

    SVD: U = V = I, s = the mask (unsorted; zeros at the missing pixels). A is an orthogonal
    projector, so Aᵀ = A† = A (Zhu's slides, *DDNM*: "A† = A" for inpainting)."""

    name = "inpainting"

    def __init__(self, mask, channels=3):
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = observed), got dtype {mask.dtype}")
        if mask.ndim == 2:
            m = mask[None].expand(channels, *mask.shape)
            self._batch = None
        elif mask.ndim == 4 and mask.shape[1] == 1:
            m = mask.expand(mask.shape[0], channels, *mask.shape[2:])
            self._batch = mask.shape[0]
        else:
            raise ValueError(f"mask must have shape (H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        shape = tuple(m.shape[-3:])
        super().__init__(shape, shape)
        self.mask = m.contiguous()                           # (C, H, W) or (B, C, H, W)
        flat = self.mask.reshape(-1, self.n) if self._batch is not None else self.mask.reshape(-1)
        self.singulars = flat.to(torch.float64)

    @property
    def batch(self):
        return self._batch

    def _m(self, x):
        m = self.mask.to(device=x.device, dtype=x.dtype)
        return m if self._batch is not None else m[None]

    def A(self, x):
        return self.check_x(x) * self._m(x)

    def A_T(self, y):
        return self.check_y(y) * self._m(y)

    def A_pinv(self, y):
        return self.check_y(y) * self._m(y)

    def V_T(self, x):
        return x.reshape(x.shape[0], -1)

    def V(self, z):
        return z.reshape(z.shape[0], *self.x_shape)

    U_T = V_T

    def U(self, z):
        return z.reshape(z.shape[0], *self.y_shape)

    def _single(self, i):
        return Inpainting(self.mask[i, 0], channels=self.x_shape[0])


def inpainting(mask, channels: int = 3) -> Inpainting:
    """Inpainting with a bool ``mask`` (True = observed) of shape (H, W), or (B, 1, H, W) for one
    mask per sample; y = m ⊙ x has x's shape (Zhu's slides, *RePaint* and *DDNM*)."""
    return Inpainting(mask, channels)


def box_mask(size: int, boxes) -> torch.Tensor:
    """Bool mask, True outside the box(es), False inside (the region to fill in).

    ``boxes``: one box ``(x0, y0, x1, y1)`` (pixel columns x, rows y, half-open) → (size, size);
    a list of B boxes (or a (B, 4) tensor) → (B, 1, size, size), one box per sample.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    b = torch.as_tensor(boxes)
    single = b.ndim == 1
    b = b.reshape(-1, 4) if b.numel() % 4 == 0 and b.ndim in (1, 2) else None
    if b is None or b.shape[-1] != 4:
        raise ValueError(f"boxes must be (x0, y0, x1, y1) or a list of them, got {boxes!r}")
    b = b.round().long()
    masks = torch.ones(b.shape[0], 1, size, size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()):
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise ValueError(f"boxes must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= "
                             f"{size}, got {(x0, y0, x1, y1)}")
        masks[i, 0, y0:y1, x0:x1] = False
    return masks[0, 0] if single else masks


def random_mask(size: int, keep_fraction: float, generator: torch.Generator | None = None,
                batch: int = 1) -> torch.Tensor:
    """Bool mask keeping exactly round(keep_fraction · size²) random pixels of each sample.

    ``batch=1`` gives (size, size) (one mask for all); ``batch > 1`` gives (B, 1, size, size)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    keep_fraction = check_range(keep_fraction, "keep_fraction", 0.0, 1.0)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    k = round(keep_fraction * size * size)
    masks = torch.zeros(batch, size * size, dtype=torch.bool)
    for i in range(batch):
        idx = torch.randperm(size * size, generator=generator)[:k]
        masks[i, idx] = True
    masks = masks.reshape(batch, 1, size, size)
    return masks[0, 0] if batch == 1 else masks


# ---------------------------------------------------------------------------- block averages
class _BlockAverage(Operator):
    """Average over blocks of k entries; per block the row is (1/k)·1ᵀ, singular value 1/√k.

    V per block: an orthogonal k×k matrix Q whose first column is 1/√k (the DC direction);
    V_T(x) lists the DC coefficients of all blocks first (in y's order), then the rest."""

    def _blocks(self, x):            # (B, *x_shape) → (B, nblocks, k), nblocks in y's order
        raise NotImplementedError

    def _unblocks(self, b):          # inverse of _blocks
        raise NotImplementedError

    def _q(self, like):
        return self.Q.to(device=like.device, dtype=like.dtype)

    def V_T(self, x):
        c = self._blocks(x) @ self._q(x)                      # (B, nb, k) coefficients
        return torch.cat([c[..., 0], c[..., 1:].reshape(x.shape[0], -1)], dim=1)

    def V(self, z):
        B, nb = z.shape[0], self.m
        c = torch.cat([z[:, :nb, None], z[:, nb:].reshape(B, nb, self.k - 1)], dim=2)
        return self._unblocks(c @ self._q(z).T)

    def U_T(self, y):
        return y.reshape(y.shape[0], -1)

    def U(self, z):
        return z.reshape(z.shape[0], *self.y_shape)


class SuperResolution(_BlockAverage):
    """Average pooling by ``factor`` (Zhu's slides, *DDRM*/*DDNM*: super-resolution).

    A Aᵀ = I / f², so A† = f² Aᵀ = nearest-neighbour upsampling."""

    def __init__(self, factor, size=32, channels=3):
        if not isinstance(factor, int) or factor < 1 or size % factor:
            raise ValueError(f"factor must be a positive int dividing size={size}, got {factor!r}")
        self.f, self.k = factor, factor * factor
        super().__init__((channels, size, size), (channels, size // factor, size // factor),
                         name=f"sr{factor}")
        self.Q = _orthonormal_with_mean(self.k)
        self.singulars = torch.full((self.m,), 1.0 / factor, dtype=torch.float64)

    def _blocks(self, x):
        B, C, H, W = x.shape
        f = self.f
        return x.reshape(B, C, H // f, f, W // f, f).permute(0, 1, 2, 4, 3, 5).reshape(
            B, C * (H // f) * (W // f), f * f)

    def _unblocks(self, b):
        B = b.shape[0]
        C, H, W = self.x_shape
        f = self.f
        return b.reshape(B, C, H // f, W // f, f, f).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)

    def A(self, x):
        x = self.check_x(x)
        return torch.nn.functional.avg_pool2d(x, self.f)

    def A_T(self, y):
        y = self.check_y(y)
        return torch.repeat_interleave(torch.repeat_interleave(y, self.f, 2), self.f, 3) / self.k

    def A_pinv(self, y):
        y = self.check_y(y)
        return torch.repeat_interleave(torch.repeat_interleave(y, self.f, 2), self.f, 3)


def super_resolution(factor: int, size: int = 32, channels: int = 3) -> SuperResolution:
    """×``factor`` super-resolution: y = average pooling of x, (B, C, size/f, size/f)."""
    return SuperResolution(factor, size, channels)


class Colorization(_BlockAverage):
    """y = the mean of the RGB channels, (B, 1, H, W) (Zhu's slides, *DDNM*: colourisation;
    DDRM's code uses the same mean). Per pixel the row is (1/3)(1, 1, 1), singular 1/√3."""

    name = "colorization"

    def __init__(self, size=32, channels=3):
        self.k = channels
        super().__init__((channels, size, size), (1, size, size))
        self.Q = _orthonormal_with_mean(channels)
        self.singulars = torch.full((self.m,), 1.0 / math.sqrt(channels), dtype=torch.float64)

    def _blocks(self, x):
        B, C, H, W = x.shape
        return x.reshape(B, C, H * W).transpose(1, 2)

    def _unblocks(self, b):
        C, H, W = self.x_shape
        return b.transpose(1, 2).reshape(b.shape[0], C, H, W)

    def A(self, x):
        return self.check_x(x).mean(dim=1, keepdim=True)

    def A_T(self, y):
        return self.check_y(y).expand(-1, self.k, -1, -1) / self.k

    def A_pinv(self, y):
        return self.check_y(y).expand(-1, self.k, -1, -1).clone()


def colorization(size: int = 32, channels: int = 3) -> Colorization:
    """Colourisation: y = mean over the channels, shape (B, 1, size, size)."""
    return Colorization(size, channels)


# ---------------------------------------------------------------------------- Gaussian blur
class GaussianBlur(Operator):
    """Separable Gaussian blur with zero boundary: A = H ⊗ H per channel, H the (size × size)
    1-D blur matrix. SVD from H's: H = U_h diag(s_h) V_hᵀ, so A's singular values are
    s_h[i] s_h[j] (unsorted) and V = V_h ⊗ V_h (DDRM's code, ``Deblurring``, does the same).

    ``zero``: 1-D singular values below ``zero`` are set to 0 in the operator itself (DDRM's
    code zeroes them too), so the operator is exactly the truncated factorisation and its
    pseudo-inverse does not blow up noise by 1/s² ≈ 1e10. ``zero=0`` keeps the exact blur."""

    name = "blur"

    def __init__(self, sigma, size=32, channels=3, kernel_size=None, zero=3e-2):
        sigma = check_positive(sigma, "sigma")
        if kernel_size is None:
            kernel_size = 2 * math.ceil(3 * sigma) + 1
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        zero = check_positive(zero, "zero", allow_zero=True)
        super().__init__((channels, size, size), (channels, size, size))
        self.sigma, self.kernel_size, self.zero = sigma, kernel_size, zero
        half = kernel_size // 2
        k = torch.exp(-torch.arange(-half, half + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
        self.kernel = k / k.sum()
        H = torch.zeros(size, size, dtype=torch.float64)
        for i in range(size):
            for d in range(-half, half + 1):
                if 0 <= i + d < size:
                    H[i, i + d] = self.kernel[d + half]
        Uh, sh, Vh_T = torch.linalg.svd(H)
        sh = torch.where(sh < zero, torch.zeros_like(sh), sh)
        self.H = Uh @ torch.diag(sh) @ Vh_T                   # = H when zero = 0
        self.Uh, self.sh, self.Vh = Uh, sh, Vh_T.T
        self.singulars = (sh[:, None] * sh[None, :]).reshape(-1).repeat(channels)

    def _lr(self, M, X, N):          # M X Nᵀ for each image channel
        return M.to(X) @ X @ N.to(X).T

    def V_T(self, x):
        return self._lr(self.Vh.T, x, self.Vh.T).reshape(x.shape[0], -1)

    def V(self, z):
        return self._lr(self.Vh, z.reshape(z.shape[0], *self.x_shape), self.Vh)

    def U_T(self, y):
        return self._lr(self.Uh.T, y, self.Uh.T).reshape(y.shape[0], -1)

    def U(self, z):
        return self._lr(self.Uh, z.reshape(z.shape[0], *self.y_shape), self.Uh)

    def A(self, x):
        return self._lr(self.H, self.check_x(x), self.H)

    def A_T(self, y):
        return self._lr(self.H.T, self.check_y(y), self.H.T)


def gaussian_blur(sigma: float, size: int = 32, channels: int = 3, kernel_size: int | None = None,
                  zero: float = 3e-2) -> GaussianBlur:
    """Gaussian deblurring's forward model (Zhu's slides, *DDRM*: deblurring): y has x's shape."""
    return GaussianBlur(sigma, size, channels, kernel_size, zero)


# ---------------------------------------------------------------------------- identity, dense
class Denoising(Operator):
    """A = I (Zhu's slides, *DDRM*: denoising); U = V = I, s = 1."""

    name = "denoising"

    def __init__(self, x_shape):
        x_shape = (x_shape,) if isinstance(x_shape, int) else tuple(x_shape)
        if not x_shape or any((not isinstance(v, int)) or v < 1 for v in x_shape):
            raise ValueError(f"x_shape must be a tuple of positive ints, got {x_shape!r}")
        super().__init__(x_shape, x_shape)
        self.singulars = torch.ones(self.n, dtype=torch.float64)

    def A(self, x):
        return self.check_x(x).clone()

    def A_T(self, y):
        return self.check_y(y).clone()

    def A_pinv(self, y):
        return self.check_y(y).clone()

    def V_T(self, x):
        return x.reshape(x.shape[0], -1)

    def V(self, z):
        return z.reshape(z.shape[0], *self.x_shape)

    U_T, U = V_T, V


def denoising(x_shape) -> Denoising:
    """Denoising: A = I on (B, *x_shape)."""
    return Denoising(x_shape)


class Dense(Operator):
    """A dense (m, n) matrix acting on (B, n); the full SVD from ``torch.linalg.svd``."""

    name = "dense"

    def __init__(self, matrix, rcond=None):
        check_tensor(matrix, "matrix", ndim=2)
        if not matrix.dtype.is_floating_point:
            raise TypeError(f"matrix must be a floating-point tensor, got dtype {matrix.dtype}")
        M = matrix.detach().to(torch.float64)
        m, n = M.shape
        super().__init__((n,), (m,))
        self.M = M
        U, s, Vh = torch.linalg.svd(M, full_matrices=True)
        self.Um, self.Vm = U, Vh.T
        self.singulars = s
        self.rcond = max(m, n) * torch.finfo(torch.float64).eps if rcond is None else rcond

    def A(self, x):
        return self.check_x(x) @ self.M.to(x).T

    def A_T(self, y):
        return self.check_y(y) @ self.M.to(y)

    def V_T(self, x):
        return x @ self.Vm.to(x)

    def V(self, z):
        return z @ self.Vm.to(z).T

    def U_T(self, y):
        return y @ self.Um.to(y)

    def U(self, z):
        return z @ self.Um.to(z).T


def dense(matrix: torch.Tensor, rcond: float | None = None) -> Dense:
    """A general matrix (m, n) acting on (B, n), for small problems (the Gaussian mixture)."""
    return Dense(matrix, rcond)


# ---------------------------------------------------------------------------- measuring
def measure(operator: Operator, x: torch.Tensor, sigma_y: float = 0.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """y = A x + σ_y n, n ~ N(0, I) drawn from ``generator`` (Zhu's slides, *DPS*: y = A(x₀) + n).

    For inpainting (y has x's shape, zeros where the mask is False) the noise is kept on the
    observed pixels only: the zero rows of A = diag(m) measure nothing, so y stays 0 there."""
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be a diffnotes.restoration.operators.Operator, got "
                        f"{type(operator).__name__}")
    sigma_y = check_positive(sigma_y, "sigma_y", allow_zero=True)
    y = operator.A(x)
    if sigma_y > 0:
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype,
                            device=generator.device if generator is not None else y.device)
        noise = noise.to(y.device)
        if isinstance(operator, Inpainting):
            noise = operator.A(noise)
        y = y + sigma_y * noise
    return y
