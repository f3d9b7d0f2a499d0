"""Operators of diffnotes.restoration.operators against dense matrices built by brute force."""
import math

import pytest
import torch

from diffnotes.restoration import operators as ops

#: float64 as the default dtype inside this module's tests (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)

def _brute_dense(op, single=None):
    """The (m, n) matrix of op.A applied to the standard basis, column by column."""
    n = op.n
    cols = []
    for j in range(n):
        e = torch.zeros(1, n)
        e[0, j] = 1.0
        cols.append(op.A(e.reshape(1, *op.x_shape)).reshape(-1))
    return torch.stack(cols, dim=1)

def _small_ops():
    g = _gen(1)
    return {
        "box": ops.inpainting(ops.box_mask(4, (1, 0, 3, 2)), channels=3),
        "random": ops.inpainting(ops.random_mask(4, 0.3, generator=g), channels=3),
        "sr2": ops.super_resolution(2, size=4),
        "sr4": ops.super_resolution(4, size=8, channels=2),
        "blur": ops.gaussian_blur(1.0, size=6, channels=2, zero=0.0),
        "blur_trunc": ops.gaussian_blur(1.5, size=6, channels=1),
        "color": ops.colorization(size=3),
        "denoise": ops.denoising((2, 3, 3)),
        "dense": ops.dense(torch.randn(3, 8, generator=g)),
        "dense_tall": ops.dense(torch.randn(7, 4, generator=g) @ torch.randn(4, 5, generator=g)),
    }

_old_dtype = torch.get_default_dtype()
torch.set_default_dtype(torch.float64)       # the small operators are built in float64 too
SMALL = _small_ops()
torch.set_default_dtype(_old_dtype)


@pytest.mark.parametrize("key", list(SMALL))
def test_svd_reconstructs_A_and_adjoint(key):
    op = SMALL[key]
    M = _brute_dense(op)
    assert torch.allclose(op.matrix(), M, atol=1e-13)
    # U and V: apply to the basis; both orthogonal
    Um = op.U(torch.eye(op.m)).reshape(op.m, op.m).T      # column j = U e_j
    Vm = op.V(torch.eye(op.n)).reshape(op.n, op.n).T
    assert torch.allclose(Um.T @ Um, torch.eye(op.m), atol=1e-12)
    assert torch.allclose(Vm.T @ Vm, torch.eye(op.n), atol=1e-12)
    assert torch.allclose(op.U_T(op.U(torch.eye(op.m))), torch.eye(op.m), atol=1e-12)
    r = op.r
    S = torch.zeros(op.m, op.n)
    S[range(r), range(r)] = op.singulars
    assert torch.allclose(Um @ S @ Vm.T, M, atol=1e-12)   # U diag(s) V^T = A
    # adjoint against the brute-force matrix and <Ax, y> = <x, A^T y>
    x = torch.randn(5, *op.x_shape, generator=_gen(2))
    y = torch.randn(5, *op.y_shape, generator=_gen(3))
    assert torch.allclose(op.A_T(y).reshape(5, -1), y.reshape(5, -1) @ M, atol=1e-12)
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.A_T(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-11

@pytest.mark.parametrize("key", list(SMALL))
def test_pinv_penrose_identities(key):
    op = SMALL[key]
    M = op.matrix()
    P = torch.stack([op.A_pinv(e.reshape(1, *op.y_shape))[0].reshape(-1)
                     for e in torch.eye(op.m)], dim=1)              # (n, m)
    assert torch.allclose(P, torch.linalg.pinv(M), atol=1e-9)
    assert torch.allclose(M @ P @ M, M, atol=1e-10)                # A A+ A = A
    assert torch.allclose(P @ M @ P, P, atol=1e-9)                 # A+ A A+ = A+
    assert torch.allclose((M @ P).T, M @ P, atol=1e-10)            # (A A+)^T = A A+
    assert torch.allclose((P @ M).T, P @ M, atol=1e-10)            # (A+ A)^T = A+ A
    x = torch.randn(3, *op.x_shape, generator=_gen(4))
    null = op.project_null(x)
    assert float(op.A(null).abs().max()) < 1e-10                  # I - A+A maps into null(A)

def test_closed_forms_of_the_simple_operators():
    x = torch.randn(2, 3, 8, 8, generator=_gen(5))
    sr = ops.super_resolution(2, size=8)
    assert torch.allclose(sr.A(x), torch.nn.functional.avg_pool2d(x, 2))
    y = sr.A(x)
    assert torch.allclose(sr.A_pinv(y), torch.nn.functional.interpolate(y, scale_factor=2,
                                                                         mode="nearest"))
    assert torch.allclose(sr.A(sr.A_T(y)), y / 4)                   # A A^T = I/4
    assert torch.allclose(sr.singulars, torch.full((48,), 0.5))
    col = ops.colorization(size=8)
    assert torch.allclose(col.A(x), x.mean(1, keepdim=True))
    assert torch.allclose(col.singulars, torch.full((64,), 3 ** -0.5))
    mask = ops.random_mask(8, 0.7, generator=_gen(6))
    inp = ops.inpainting(mask)
    assert int(mask.sum()) == round(0.7 * 64)
    assert torch.equal(inp.A(x), x * mask)
    assert torch.equal(inp.A_pinv(inp.A(x)), inp.A(x))              # A+ = A for a mask
    blur = ops.gaussian_blur(1.0, size=8, zero=0.0)
    ref = torch.nn.functional.conv2d(x.reshape(6, 1, 8, 8),
                                     torch.outer(blur.kernel, blur.kernel)[None, None],
                                     padding=blur.kernel_size // 2).reshape(2, 3, 8, 8)
    assert torch.allclose(blur.A(x), ref, atol=1e-13)               # zero-padded convolution
    trunc = ops.gaussian_blur(1.5, size=8)
    assert float(trunc.sh.min()) == 0.0 and float(trunc.sh[trunc.sh > 0].min()) >= 3e-2
    assert torch.allclose(ops.denoising((3, 8, 8)).A(x), x)

def test_per_sample_masks_and_boxes():
    boxes = [(0, 0, 2, 2), (1, 1, 4, 3)]
    m = ops.box_mask(4, boxes)
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bool
    assert int((~m[0]).sum()) == 4 and int((~m[1]).sum()) == 6
    assert not bool(m[1, 0, 1:3, 1:4].any())                        # rows y, columns x
    op = ops.inpainting(m, channels=3)
    x = torch.randn(2, 3, 4, 4, generator=_gen(7))
    assert torch.equal(op.A(x), x * m)
    assert op.singulars.shape == (2, 48) and op.singulars_like(x).shape == (2, 48)
    Ms = op.matrix()
    assert Ms.shape == (2, 48, 48)
    for i in range(2):
        assert torch.equal(torch.diag(Ms[i]), m[i].expand(3, 4, 4).reshape(-1).double())
    rm = ops.random_mask(4, 0.5, generator=_gen(8), batch=3)
    assert rm.shape == (3, 1, 4, 4) and (rm.reshape(3, -1).sum(1) == 8).all()
    # A via the SVD pieces equals the direct form, per sample
    z = op.V_T(x)[:, :op.r] * op.singulars_like(x)
    assert torch.equal(op.U(z), op.A(x))

def test_float32_and_gradients():
    op = ops.super_resolution(4, size=8)
    x = torch.randn(2, 3, 8, 8, generator=_gen(9), dtype=torch.float32, requires_grad=True)
    y = op.A(x)
    assert y.dtype == torch.float32
    (y ** 2).sum().backward()
    assert torch.allclose(x.grad, 2 * op.A_T(y.detach()), atol=1e-6)

def test_measure_adds_seeded_noise():
    op = ops.denoising((5,))
    x = torch.zeros(4000, 5)
    y = ops.measure(op, x, 0.05, generator=_gen(10))
    assert torch.equal(y, ops.measure(op, x, 0.05, generator=_gen(10)))
    assert abs(float(y.std()) - 0.05) < 0.002
    assert torch.equal(ops.measure(op, x, 0.0), x)
    mask = ops.random_mask(8, 0.5, generator=_gen(11))
    inp = ops.inpainting(mask)
    y = ops.measure(inp, torch.zeros(500, 3, 8, 8), 0.05, generator=_gen(12))
    assert not bool(y[:, :, ~mask].any())                      # no measurement, no noise
    assert abs(float(y[:, :, mask].std()) - 0.05) < 0.002

def test_bad_input():
    with pytest.raises(ValueError, match="sigma_y"):
        ops.measure(ops.denoising((3,)), torch.zeros(1, 3), -0.1)
    with pytest.raises(TypeError, match="mask"):
        ops.inpainting(torch.ones(4, 4))
    with pytest.raises(ValueError, match="mask"):
        ops.inpainting(torch.ones(2, 3, 4, 4, dtype=torch.bool))
    op = ops.inpainting(torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must have shape"):
        op.A(torch.zeros(1, 3, 5, 4))
    per = ops.inpainting(torch.ones(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size 2"):
        per.A(torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="y must have shape"):
        ops.super_resolution(2, size=4).A_T(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="factor"):
        ops.super_resolution(3, size=32)
    with pytest.raises(ValueError, match="sigma"):
        ops.gaussian_blur(0.0)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.gaussian_blur(1.0, kernel_size=4)
    with pytest.raises(ValueError, match="keep_fraction"):
        ops.random_mask(4, 1.5)
    with pytest.raises(ValueError, match="boxes"):
        ops.box_mask(4, (2, 0, 1, 3))
    with pytest.raises(ValueError, match="matrix"):
        ops.dense(torch.zeros(3))
    with pytest.raises(TypeError, match="operator"):
        ops.measure("A", torch.zeros(1, 3), 0.0)
