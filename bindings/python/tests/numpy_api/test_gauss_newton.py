"""EXPERIMENTAL Gauss-Newton products (libkfac.gauss_newton) against references written here:
S Sᵀ = B and B·q from p; G·v from stored columns and from the dense chain against the explicit
(1/N) Σ_n J_nᵀ B_n J_n v of a tanh MLP (analytic J) and of a grouped conv net (central-difference
J in float64), also as an R-op chain; KFLR from columns at N = 1 against the exact GGN block; errors."""

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from libkfac import gauss_newton as gn

DISTS = ["categorical", "bernoulli", "gaussian"]


def _probabilities(dist, z):
    if dist == "categorical":
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return 1 / (1 + np.exp(-z))


def _hessian(dist, z):
    """B per row, written out: [rows, d, d]."""
    if dist == "gaussian":
        return np.broadcast_to(np.eye(z.shape[-1]), z.shape + (z.shape[-1],)).copy()
    p = _probabilities(dist, z)
    if dist == "bernoulli":
        return np.stack([np.diag(q * (1 - q)) for q in p])
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])


def _root(dist, z):
    """S per row with S Sᵀ = B: [rows, d, K]."""
    if dist == "gaussian":
        return _hessian(dist, z)
    p = _probabilities(dist, z)
    if dist == "bernoulli":
        return np.stack([np.diag(np.sqrt(q * (1 - q))) for q in p])
    return np.stack([np.diag(np.sqrt(q)) - np.outer(q, np.sqrt(q)) for q in p])


def _tol(dtype):
    return 2e-5 if dtype == np.float32 else 1e-11


@pytest.mark.parametrize("dist", DISTS)
def test_output_hessian_helpers(rng, dtype, dist):
    z = (2 * rng.standard_normal((5, 4))).astype(dtype)
    q = rng.standard_normal((5, 4)).astype(dtype)
    s = gn.output_hessian_sqrt(z, dist)
    assert s.shape == (4, 5, 4) and s.dtype == dtype
    sst = np.einsum("kni,knj->nij", s.astype(np.float64), s.astype(np.float64))
    b = _hessian(dist, z.astype(np.float64))
    np.testing.assert_allclose(sst, b, atol=10 * _tol(dtype))
    u = gn.output_hessian_multiply(z, q, dist)
    np.testing.assert_allclose(u, np.einsum("nij,nj->ni", b, q.astype(np.float64)), atol=10 * _tol(dtype))


class TanhMLP:
    """x (3) → dense 4 (bias) → tanh → dense 2 (bias?) → z; J_n analytic."""

    def __init__(self, rng, bias1):
        self.W0, self.b0 = rng.standard_normal((4, 3)), rng.standard_normal(4)
        self.W1 = 1.5 * rng.standard_normal((2, 4))
        self.b1 = rng.standard_normal(2) if bias1 else None

    def forward(self, x):
        a1 = np.tanh(x @ self.W0.T + self.b0)
        z = a1 @ self.W1.T + (self.b1 if self.b1 is not None else 0)
        return a1, z

    def jacobian(self, x):
        """J_n [2, P] with P = W0, b0, W1 (, b1), each flattened row-major."""
        a1, _ = self.forward(x[None])
        a1 = a1[0]
        phi = 1 - a1 ** 2
        blocks = [np.einsum("kj,j,i->kji", self.W1, phi, x).reshape(2, -1), self.W1 * phi,
                  np.einsum("kr,j->krj", np.eye(2), a1).reshape(2, -1)]
        if self.b1 is not None:
            blocks.append(np.eye(2))
        return np.concatenate(blocks, axis=1)

    def columns(self, dist, x):
        """Layer columns [K, N, out] built from S and the analytic ∂z/∂s_l."""
        a1, z = self.forward(x)
        s = _root(dist, z)                            # [N, 2, K]
        c1 = np.transpose(s, (2, 0, 1))               # ∂z/∂s_1 = I
        c0 = np.einsum("kj,nkc,nj->cnj", self.W1, s, 1 - a1 ** 2)
        return c0, c1


def _explicit(jacobians, hessians, v):
    return sum(j.T @ b @ j @ v for j, b in zip(jacobians, hessians)) / len(jacobians)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("bias1", [True, False])
def test_columns_and_chain_match_explicit_ggn(rng, dtype, dist, bias1):
    net = TanhMLP(rng, bias1)
    x = 2 * rng.standard_normal((5, 3))
    a1, z = net.forward(x)
    js = [net.jacobian(xn) for xn in x]
    v = rng.standard_normal(js[0].shape[1])
    expected = _explicit(js, _hessian(dist, z), v)
    opt = kfac.Optimizer(dtype)
    opt.add_dense(3, 4, bias=True)
    opt.add_dense(4, 2, bias=bias1)
    g = gn.GaussNewton(opt)
    c0, c1 = net.columns(dist, x)
    g.record_columns(0, c0[:, :2], inputs=x[:2], uses="product")     # two micro-batches
    g.record_columns(0, c0[:, 2:], inputs=x[2:], uses="product")
    g.record_columns(1, c1, inputs=a1, uses=["product"])
    assert g.columns_info() == (5, 2, 5 * 3 + 5 * 2 * 4 + 5 * 4 + 5 * 2 * 2)
    splits = np.cumsum([12, 4, 8])
    parts = np.split(v, splits)
    weights = [parts[0].reshape(4, 3), parts[2].reshape(2, 4)]
    biases = [parts[1], parts[3] if bias1 else None]
    for product in ("columns", "chain"):
        if product == "chain":
            g.define_chain([0, 1], ["tanh", "identity"], dist)
            zz = g.chain_forward([net.W0, net.W1], [net.b0, net.b1], [x, None])
            np.testing.assert_allclose(zz, z, rtol=1e-5 if dtype == np.float32 else 1e-12)
            pw, pb = g.chain_multiply(weights, biases)
        else:
            pw, pb = g.columns_multiply(weights, biases)
        got = np.concatenate([pw[0].ravel(), pb[0], pw[1].ravel()] + ([pb[1]] if bias1 else []))
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err < _tol(dtype), (product, err)
    g.clear_columns()
    assert g.columns_info() == (0, 0, 0)
    with pytest.raises(kfac.KFACError) as e:
        g.columns_multiply(weights, biases)
    assert e.value.status == _lib.KFAC_ERROR_NO_COLUMNS


def _conv(x, w, b, groups):
    """NCHW conv, stride 1, no padding, by loops: x [C, H, W], w [O, C/g, kh, kw]."""
    o, cg, kh, kw = w.shape
    _, h, wd = x.shape
    out = np.zeros((o, h - kh + 1, wd - kw + 1))
    per = o // groups
    for oc in range(o):
        g = oc // per
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[oc, i, j] = np.sum(w[oc] * x[g * cg:(g + 1) * cg, i:i + kh, j:j + kw]) + (b[oc] if b is not None else 0)
    return out


@pytest.mark.parametrize("dist", DISTS)
def test_conv_columns_match_explicit_ggn(rng, dist):
    """conv (2→4, 2×2, groups 2, bias) → tanh → flatten → dense 12→3 (no bias); J by central
    differences of the forward written above (float64)."""
    wc, bc = rng.standard_normal((4, 1, 2, 2)), rng.standard_normal(4)
    wd = rng.standard_normal((3, 12))
    x = rng.standard_normal((3, 2, 4, 2))
    theta = np.concatenate([wc.ravel(), bc, wd.ravel()])

    def forward(t, xn):
        s0 = _conv(xn, t[:16].reshape(4, 1, 2, 2), t[16:20], 2)
        a1 = np.tanh(s0).ravel()
        return s0, a1, t[20:].reshape(3, 12) @ a1

    h = 1e-6
    js = []
    for xn in x:
        j = np.zeros((3, theta.size))
        for p in range(theta.size):
            e = np.zeros_like(theta)
            e[p] = h
            j[:, p] = (forward(theta + e, xn)[2] - forward(theta - e, xn)[2]) / (2 * h)
        js.append(j)
    zs = np.stack([forward(theta, xn)[2] for xn in x])
    v = rng.standard_normal(theta.size)
    expected = _explicit(js, _hessian(dist, zs), v)
    opt = kfac.Optimizer(np.float64)
    opt.add_conv2d(2, 4, 2, groups=2, input_size=(4, 2))
    opt.add_dense(12, 3, bias=False)
    g = gn.GaussNewton(opt)
    s = _root(dist, zs)                                             # [N, 3, K]
    a1 = np.stack([forward(theta, xn)[1] for xn in x])
    phi = np.stack([1 - np.tanh(forward(theta, xn)[0]).ravel() ** 2 for xn in x])
    c1 = np.transpose(s, (2, 0, 1))
    c0 = np.einsum("kj,nkc,nj->cnj", wd, s, phi).reshape(3, 3, 4, 3, 1)
    g.record_columns(0, c0, inputs=x)
    g.record_columns(1, c1, inputs=a1)
    pw, pb = g.columns_multiply([v[:16].reshape(4, 1, 2, 2), v[20:].reshape(3, 12)], [v[16:20], None])
    got = np.concatenate([pw[0].ravel(), pb[0], pw[1].ravel()])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-7
    # The same net as a chain (conv → tanh → flatten → dense): the R operator, then the chain's own columns.
    g.define_chain([0, 1], ["tanh", "identity"], dist)
    z = g.chain_forward([wc, wd], [bc, None], [x, None])
    np.testing.assert_allclose(z, zs, rtol=1e-12, atol=1e-12)
    vs = ([v[:16].reshape(4, 1, 2, 2), v[20:].reshape(3, 12)], [v[16:20], None])
    for multiply in ("chain", "chain columns"):
        if multiply == "chain":
            pw, pb = g.chain_multiply(*vs)
        else:
            g.clear_columns()
            g.chain_record_columns("product")
            pw, pb = g.columns_multiply(*vs)
        got = np.concatenate([pw[0].ravel(), pb[0], pw[1].ravel()])
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-7, multiply


@pytest.mark.parametrize("dist", DISTS)
def test_kflr_factor_at_one_example_is_exact_ggn_block(rng, dtype, dist):
    net = TanhMLP(rng, True)
    x = rng.standard_normal((1, 3))
    a1, z = net.forward(x)
    c0, c1 = net.columns(dist, x)
    opt = kfac.Optimizer(dtype)
    opt.add_dense(3, 4, bias=True)
    opt.add_dense(4, 2, bias=True)
    g = gn.GaussNewton(opt)
    opt.record_inputs(0, x.astype(dtype))
    opt.record_inputs(1, a1.astype(dtype))
    g.record_columns(0, c0, uses="factor")
    g.record_columns(1, c1, uses="factor")
    opt.update_factors()
    j = net.jacobian(x[0])
    block = j.T @ _hessian(dist, z)[0] @ j
    for layer, (lo, hi, fan_in, fan_out) in enumerate([(0, 16, 3, 4), (16, 26, 4, 2)]):
        a, gg = (m.astype(np.float64) for m in opt.factors(layer))
        # vec order of the block: W row-major then b; A ⊗ G acts as V ↦ G V A on [W | b].
        exact = block[lo:hi, lo:hi]
        idx = [(r, c) for r in range(fan_out) for c in range(fan_in)] + [(r, fan_in) for r in range(fan_out)]
        kron = np.array([[gg[r, r2] * a[c, c2] for (r2, c2) in idx] for (r, c) in idx])
        np.testing.assert_allclose(kron, exact, atol=10 * _tol(dtype) * max(1, np.abs(exact).max()))


def test_errors(rng):
    opt = kfac.Optimizer(np.float32)
    opt.add_dense(3, 2)
    g = gn.GaussNewton(opt)
    c = rng.standard_normal((2, 4, 2)).astype(np.float32)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    for call, status in [
        (lambda: g.record_columns(0, c, inputs=None, uses="product"), _lib.KFAC_ERROR_NULL_POINTER),
        (lambda: g.record_columns(5, c, inputs=x), _lib.KFAC_ERROR_UNKNOWN_LAYER),
        (lambda: g.record_columns(0, c, inputs=x, uses=4), _lib.KFAC_ERROR_INVALID_ARGUMENT),
        (lambda: g.columns_multiply([np.zeros((2, 3))], [np.zeros(2)]), _lib.KFAC_ERROR_NO_COLUMNS),
        (lambda: g.chain_multiply([np.zeros((2, 3))], [np.zeros(2)]), _lib.KFAC_ERROR_NO_COLUMNS),
        (lambda: g.define_chain([0], ["tanh"], "gaussian"), _lib.KFAC_ERROR_INVALID_ARGUMENT),
        (lambda: gn.output_hessian_sqrt(np.full((2, 3), np.nan), "gaussian"), _lib.KFAC_ERROR_NON_FINITE),
    ]:
        with pytest.raises(kfac.KFACError) as e:
            call()
        assert e.value.status == status
    g.record_columns(0, c, inputs=x)
    with pytest.raises(kfac.KFACError) as e:
        g.record_columns(0, c[:1], inputs=x)
    assert e.value.status == _lib.KFAC_ERROR_INVALID_SIZE
    assert g.columns_info() == (4, 2, 4 * 3 + 2 * 4 * 2)


@pytest.mark.parametrize("dist", DISTS)
def test_chain_records_the_same_columns(rng, dtype, dist):
    """kfac_gn_chain_record_columns: the chain's own columns give the caller's KFLR factors and
    the same column product."""
    net = TanhMLP(rng, True)
    x = rng.standard_normal((4, 3))
    a1, _ = net.forward(x)
    c0, c1 = net.columns(dist, x)
    factors, products = [], []
    v = [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))], [rng.standard_normal(4), rng.standard_normal(2)]
    for via_chain in (False, True):
        opt = kfac.Optimizer(dtype)
        opt.add_dense(3, 4, bias=True)
        opt.add_dense(4, 2, bias=True)
        g = gn.GaussNewton(opt)
        opt.record_inputs(0, x.astype(dtype))
        opt.record_inputs(1, a1.astype(dtype))
        if via_chain:
            g.define_chain([0, 1], ["tanh", "identity"], dist)
            g.chain_forward([net.W0, net.W1], [net.b0, net.b1], [x, None])
            g.chain_record_columns(("factor", "product"))
        else:
            g.record_columns(0, c0, inputs=x)
            g.record_columns(1, c1, inputs=a1)
        opt.update_factors()
        factors.append([opt.factors(layer)[1].astype(np.float64) for layer in range(2)])
        products.append(np.concatenate([p.ravel() for pair in zip(*g.columns_multiply(*v)) for p in pair]))
    for a, b in zip(*factors):
        np.testing.assert_allclose(a, b, atol=10 * _tol(dtype) * max(1, np.abs(b).max()))
    np.testing.assert_allclose(products[1], products[0], atol=10 * _tol(dtype) * np.abs(products[0]).max())


def _kfra_numpy(dist, weights, biases, x, grads=None):
    """The KFRA recursion in numpy for a tanh chain (every hidden activation tanh)."""
    a, pre = x, []
    for i, (w, b) in enumerate(zip(weights, biases)):
        s = a @ w.T + (b if b is not None else 0)
        pre.append(s)
        a = np.tanh(s) if i < len(weights) - 1 else s
    n = x.shape[0]
    G = _hessian(dist, pre[-1]).mean(0)
    out = [G]
    g = grads
    for i in range(len(weights) - 1, 0, -1):
        w, t = weights[i], np.tanh(pre[i - 1])
        d1, d2 = 1 - t * t, -2 * t * (1 - t * t)
        G = (w.T @ G @ w) * (d1.T @ d1 / n)
        if g is not None:
            da = g @ w
            G = G + np.diag((d2 * da).mean(0))
            g = d1 * da
        out.insert(0, G)
    return out


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("variant", ["ggn", "hessian"])
def test_chain_kfra_matches_numpy_recursion(rng, dtype, dist, variant):
    """kfac_gn_chain_record_kfra_*: Ḡ of every layer of a 3 →tanh 5 →tanh 4 → 3 chain at N = 50
    against the recursion in numpy (the Hessian variant's D̄ from given output gradients), A from
    the chain's inputs; KFRA differs from KFLR there but equals it at N = 1."""
    sizes = [3, 5, 4, 3]
    ws = [rng.standard_normal((sizes[i + 1], sizes[i])) for i in range(3)]
    bs = [rng.standard_normal(sizes[i + 1]) for i in range(3)]
    x = rng.standard_normal((50, 3))
    grads = rng.standard_normal((50, 3)) if variant == "hessian" else None
    ws_, bs_, x_ = [w.astype(dtype) for w in ws], [b.astype(dtype) for b in bs], x.astype(dtype)
    expected = _kfra_numpy(dist, [w.astype(np.float64) for w in ws_], [b.astype(np.float64) for b in bs_],
                           x_.astype(np.float64), None if grads is None else grads.astype(dtype).astype(np.float64))

    def run(rows, kfra):
        opt = kfac.Optimizer(dtype)
        for i in range(3):
            opt.add_dense(sizes[i], sizes[i + 1], bias=True)
        g = gn.GaussNewton(opt)
        g.define_chain([0, 1, 2], ["tanh", "tanh", "identity"], dist)
        g.chain_forward(ws_, bs_, [x_[:rows], None, None])
        if kfra:
            g.chain_record_kfra(variant, record_inputs=True,
                                output_grads=None if grads is None else grads[:rows].astype(dtype))
        else:
            g.chain_record_columns(("factor",))
            a = x_[:rows].astype(np.float64)
            for i in range(3):
                opt.record_inputs(i, a.astype(dtype))
                a = np.tanh(a @ ws_[i].T.astype(np.float64) + bs_[i])
        opt.update_factors()
        return [opt.factors(i) for i in range(3)]

    got = run(50, True)
    for (a, G), E in zip(got, expected):
        np.testing.assert_allclose(G.astype(np.float64), E, atol=10 * _tol(dtype) * np.abs(E).max())
    if variant == "ggn":
        kflr = run(50, False)
        assert np.abs(kflr[0][1] - got[0][1]).max() > 1e-3 * np.abs(got[0][1]).max()
        one, kflr_one = run(1, True), run(1, False)
        for (a1, g1), (a2, g2) in zip(one, kflr_one):
            np.testing.assert_allclose(g1, g2, atol=10 * _tol(dtype) * np.abs(g2).max())
            np.testing.assert_allclose(a1, a2, atol=10 * _tol(dtype) * np.abs(a2).max())


def test_record_columns_checks_buffer_shapes_against_the_layer(dtype):
    """The library reads rows·K·(values per row) from the given pointers: arrays of another size
    must be refused in Python (no read past their end) and leave the kept columns as they were."""
    opt = kfac.Optimizer(dtype)
    opt.add_dense(3, 2)
    opt.add_conv2d(2, 4, 2, groups=2, input_size=(4, 2))
    g = gn.GaussNewton(opt)
    ones = lambda *shape: np.ones(shape, dtype)
    g.record_columns(0, ones(2, 5, 2), inputs=ones(5, 3), uses="product")
    before = g.columns_info()
    assert before == (5, 2, before[2]) and before[2] > 0
    bad = [
        (0, ones(2, 5, 3), ones(5, 3)),              # a dense column of 3 values, the layer has 2 outputs
        (0, ones(2, 5, 2, 1), ones(5, 3)),           # an extra dimension
        (0, ones(2, 5, 2), ones(4, 3)),              # fewer input rows than column rows
        (0, ones(2, 5, 2), ones(5, 2)),              # inputs of 2 features, the layer has 3
        (1, ones(2, 5, 4, 2, 1), ones(5, 2, 4, 2)),  # 8 values per example; the outputs are 4 × 3 × 1
        (1, ones(2, 5, 4, 3, 1), ones(4, 2, 4, 2)),  # 4 input examples for 5 column rows
        (1, ones(2, 5, 4, 3, 1), ones(5, 2, 4, 1)),  # 8 input values per example, the layer reads 16
    ]
    for layer, columns, inputs in bad:
        with pytest.raises(ValueError):
            g.record_columns(layer, columns, inputs=inputs, uses="product")
        assert g.columns_info() == before
    g.record_columns(1, ones(2, 5, 4, 3, 1), inputs=ones(5, 2, 4, 2), uses="product")  # the right shapes
    assert g.columns_info()[0] == 5
