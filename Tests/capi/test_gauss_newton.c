/*
 * test_gauss_newton.c — the experimental Gauss-Newton products (kfac_gn_*,
 * kfac_layer_record_output_grad_columns_*), compiled with KFAC_EXPERIMENTAL_API.
 *
 *   1. Output-space helpers, float32 and float64: S Sᵀ = B and B·q against B written out here
 *      from p for the three distributions; error paths (output buffers untouched).
 *   2. Oracles, float32 and float64, the three distributions: a dense 3 →(tanh) 4 → 2 net whose
 *      per-example Jacobian J_n is written out analytically here; G·v = (1/N) Σ J_nᵀ B_n J_n v
 *      against kfac_gn_columns_multiply_* (columns C = J_sᵀ S built here, recorded in two
 *      micro-batches) and kfac_gn_chain_multiply_* (the library's own forward from x); K = 1
 *      FACTOR columns give bitwise the factors of kfac_layer_record_output_grads_*.
 *   3. Misuse on twin handles (after_bad: status, messages, identical state images, an identical
 *      next round) with the kept columns and the chain forward pass compared too: after every
 *      bad call both twins give bitwise identical column and chain products and column info.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"

#include <math.h>

enum { NX = 3, NH = 4, NZ = 2, NE = 3, NP = NH * NX + NH + NZ * NH };

static void softmax_p(int dist, const double *z, double *p) {
    if (dist == KFAC_DIST_CATEGORICAL) {
        double m = z[0] > z[1] ? z[0] : z[1], t = 0;
        for (int i = 0; i < NZ; i++) t += exp(z[i] - m);
        for (int i = 0; i < NZ; i++) p[i] = exp(z[i] - m) / t;
    } else {
        for (int i = 0; i < NZ; i++) p[i] = 1 / (1 + exp(-z[i]));
    }
}

/* B and S at z, written out. */
static void hessian_and_root(int dist, const double *z, double B[NZ][NZ], double S[NZ][NZ]) {
    double p[NZ];
    softmax_p(dist, z, p);
    for (int i = 0; i < NZ; i++)
        for (int j = 0; j < NZ; j++) {
            if (dist == KFAC_DIST_CATEGORICAL) {
                B[i][j] = (i == j ? p[i] : 0) - p[i] * p[j];
                S[i][j] = sqrt(p[j]) * ((i == j ? 1 : 0) - p[i]);
            } else if (dist == KFAC_DIST_BERNOULLI) {
                B[i][j] = i == j ? p[i] * (1 - p[i]) : 0;
                S[i][j] = i == j ? sqrt(p[i] * (1 - p[i])) : 0;
            } else {
                B[i][j] = S[i][j] = i == j ? 1 : 0;
            }
        }
}

static double rel_err(const double *a, const double *b, int n) {
    double e = 0, m = 1e-300;
    for (int i = 0; i < n; i++) {
        if (fabs(a[i] - b[i]) > e) e = fabs(a[i] - b[i]);
        if (fabs(b[i]) > m) m = fabs(b[i]);
    }
    return e / m;
}

static double get(const buf_t *b, size_t i) {
    return b->dtype == KFAC_FLOAT32 ? ((float *)b->p)[i] : ((double *)b->p)[i];
}

static void test_output_helpers(int dtype) {
    rng_t r = {71};
    enum { R = 3, D = 4 };
    buf_t z = buf_new(dtype, R * D), q = buf_new(dtype, R * D), u = buf_new(dtype, R * D), s = buf_new(dtype, D * R * D);
    buf_random(&z, &r);
    buf_random(&q, &r);
    const double tol = dtype == KFAC_FLOAT32 ? 1e-6 : 1e-14;
    for (int dist = 0; dist < 3; dist++) {
        int st1, st2;
        if (dtype == KFAC_FLOAT32) {
            st1 = kfac_gn_output_hessian_sqrt_f32(z.p, R, D, dist, s.p);
            st2 = kfac_gn_output_hessian_multiply_f32(z.p, q.p, R, D, dist, u.p);
        } else {
            st1 = kfac_gn_output_hessian_sqrt_f64(z.p, R, D, dist, s.p);
            st2 = kfac_gn_output_hessian_multiply_f64(z.p, q.p, R, D, dist, u.p);
        }
        double worst_s = 0, worst_u = 0;
        for (int n = 0; n < R; n++) {
            double zn[D], p[D], t = 0, m = -1e300;
            for (int i = 0; i < D; i++) { zn[i] = get(&z, n * D + i); if (zn[i] > m) m = zn[i]; }
            for (int i = 0; i < D; i++) t += exp(zn[i] - m);
            for (int i = 0; i < D; i++) p[i] = dist == KFAC_DIST_CATEGORICAL ? exp(zn[i] - m) / t : 1 / (1 + exp(-zn[i]));
            for (int i = 0; i < D; i++) {
                double bq = 0;
                for (int j = 0; j < D; j++) {
                    double b = dist == KFAC_DIST_CATEGORICAL ? (i == j ? p[i] : 0) - p[i] * p[j]
                             : dist == KFAC_DIST_BERNOULLI ? (i == j ? p[i] * (1 - p[i]) : 0) : (i == j);
                    double sst = 0;
                    for (int k = 0; k < D; k++) sst += get(&s, (k * R + n) * D + i) * get(&s, (k * R + n) * D + j);
                    if (fabs(sst - b) > worst_s) worst_s = fabs(sst - b);
                    bq += b * get(&q, n * D + j);
                }
                if (fabs(bq - get(&u, n * D + i)) > worst_u) worst_u = fabs(bq - get(&u, n * D + i));
            }
        }
        check(st1 == KFAC_OK && st2 == KFAC_OK && worst_s < tol && worst_u < tol,
              "[%s] dist %d: S Sᵀ = B (max error %.2e) and B q (%.2e) against B written out", dtype_tag(dtype), dist,
              worst_s, worst_u);
    }
    /* Errors: nothing written. */
    buf_t before = buf_clone(&s);
    buf_t bad = buf_clone(&z);
    buf_set(&bad, 2, NAN);
    struct { const void *z; int64_t rows, dim; int dist; int want; const char *what; } cases[] = {
        {NULL, R, D, 0, KFAC_ERROR_NULL_POINTER, "NULL outputs"},
        {z.p, 0, D, 0, KFAC_ERROR_INVALID_SIZE, "rows 0"},
        {z.p, R, 0, 0, KFAC_ERROR_INVALID_SIZE, "output_dim 0"},
        {z.p, INT64_MAX, 3, 0, KFAC_ERROR_SIZE_OVERFLOW, "rows × dim overflows"},
        {z.p, R, D, 3, KFAC_ERROR_INVALID_ARGUMENT, "distribution 3"},
        {bad.p, R, D, 0, KFAC_ERROR_NON_FINITE, "NaN output"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int st = dtype == KFAC_FLOAT32 ? kfac_gn_output_hessian_sqrt_f32(cases[c].z, cases[c].rows, cases[c].dim, cases[c].dist, s.p)
                                       : kfac_gn_output_hessian_sqrt_f64(cases[c].z, cases[c].rows, cases[c].dim, cases[c].dist, s.p);
        check(st == cases[c].want && buf_same(&s, &before), "[%s] kfac_gn_output_hessian_sqrt: %s -> %s (got %s), columns untouched",
              dtype_tag(dtype), cases[c].what, status_name(cases[c].want), status_name(st));
    }
    buf_set(&bad, 2, 1);
    buf_set(&bad, 5, INFINITY);
    buf_t u0 = buf_clone(&u);
    int st = dtype == KFAC_FLOAT32 ? kfac_gn_output_hessian_multiply_f32(z.p, bad.p, R, D, 0, u.p)
                                   : kfac_gn_output_hessian_multiply_f64(z.p, bad.p, R, D, 0, u.p);
    check(st == KFAC_ERROR_NON_FINITE && buf_same(&u, &u0), "[%s] kfac_gn_output_hessian_multiply: Inf vector -> NON_FINITE",
          dtype_tag(dtype));
    st = dtype == KFAC_FLOAT32 ? kfac_gn_output_hessian_multiply_f32(z.p, NULL, R, D, 0, u.p)
                               : kfac_gn_output_hessian_multiply_f64(z.p, NULL, R, D, 0, u.p);
    check(st == KFAC_ERROR_NULL_POINTER && buf_same(&u, &u0), "[%s] kfac_gn_output_hessian_multiply: NULL vectors", dtype_tag(dtype));
    st = dtype == KFAC_FLOAT32 ? kfac_gn_output_hessian_multiply_f32(z.p, q.p, R, D, 0, NULL)
                               : kfac_gn_output_hessian_multiply_f64(z.p, q.p, R, D, 0, NULL);
    check(st == KFAC_ERROR_NULL_POINTER, "[%s] kfac_gn_output_hessian_multiply: NULL products", dtype_tag(dtype));
    buf_free(&z); buf_free(&q); buf_free(&u); buf_free(&s); buf_free(&before); buf_free(&bad); buf_free(&u0);
}

/* Raw dtype dispatch of the handle calls (void pointer arrays of MAX_LAYERS). */
static int record_columns(kfac_optimizer *h, int dtype, int32_t layer, const void *x, const void *c, int64_t rows, int32_t k,
                          int32_t uses) {
    return dtype == KFAC_FLOAT32 ? kfac_layer_record_output_grad_columns_f32(h, layer, x, c, rows, k, uses)
                                 : kfac_layer_record_output_grad_columns_f64(h, layer, x, c, rows, k, uses);
}

static int gn_multiply(kfac_optimizer *h, int dtype, int chain, void *const *vw, void *const *vb, void *const *pw,
                       void *const *pb, int32_t n) {
    if (dtype == KFAC_FLOAT32)
        return (chain ? kfac_gn_chain_multiply_f32 : kfac_gn_columns_multiply_f32)(
            h, (const float *const *)vw, (const float *const *)vb, (float *const *)pw, (float *const *)pb, n);
    return (chain ? kfac_gn_chain_multiply_f64 : kfac_gn_columns_multiply_f64)(
        h, (const double *const *)vw, (const double *const *)vb, (double *const *)pw, (double *const *)pb, n);
}

static int chain_forward(kfac_optimizer *h, int dtype, void *const *w, void *const *b, void *const *a, void *const *d,
                         int64_t rows, void *out) {
    if (dtype == KFAC_FLOAT32)
        return kfac_gn_chain_forward_f32(h, (const float *const *)w, (const float *const *)b, (const float *const *)a,
                                         (const float *const *)d, rows, out);
    return kfac_gn_chain_forward_f64(h, (const double *const *)w, (const double *const *)b, (const double *const *)a,
                                     (const double *const *)d, rows, out);
}

static void test_oracle(int dtype, int dist) {
    rng_t r = {72 + (uint64_t)dist};
    double W0[NH][NX], b0[NH], W1[NZ][NH], x[NE][NX], v[NP];
    for (int j = 0; j < NH; j++) { for (int i = 0; i < NX; i++) W0[j][i] = rng_sym(&r); b0[j] = rng_sym(&r); }
    for (int k = 0; k < NZ; k++) for (int j = 0; j < NH; j++) W1[k][j] = 1.5 * rng_sym(&r);
    for (int n = 0; n < NE; n++) for (int i = 0; i < NX; i++) x[n][i] = 2 * rng_sym(&r);
    for (int p = 0; p < NP; p++) v[p] = rng_sym(&r);
    /* Explicit G v and the columns. */
    double gv[NP] = {0};
    double a1[NE][NH], c0[NZ][NE][NH], c1[NZ][NE][NZ];
    for (int n = 0; n < NE; n++) {
        double phi[NH], z[NZ] = {0}, B[NZ][NZ], S[NZ][NZ], J[NZ][NP] = {{0}};
        for (int j = 0; j < NH; j++) {
            double s = b0[j];
            for (int i = 0; i < NX; i++) s += W0[j][i] * x[n][i];
            a1[n][j] = tanh(s);
            phi[j] = 1 - a1[n][j] * a1[n][j];
        }
        for (int k = 0; k < NZ; k++) for (int j = 0; j < NH; j++) z[k] += W1[k][j] * a1[n][j];
        hessian_and_root(dist, z, B, S);
        for (int k = 0; k < NZ; k++) {
            for (int j = 0; j < NH; j++) {
                for (int i = 0; i < NX; i++) J[k][j * NX + i] = W1[k][j] * phi[j] * x[n][i];
                J[k][NH * NX + j] = W1[k][j] * phi[j];
                J[k][NH * NX + NH + k * NH + j] = a1[n][j];
            }
        }
        double jv[NZ] = {0}, bjv[NZ] = {0};
        for (int k = 0; k < NZ; k++) for (int p = 0; p < NP; p++) jv[k] += J[k][p] * v[p];
        for (int k = 0; k < NZ; k++) for (int m = 0; m < NZ; m++) bjv[k] += B[k][m] * jv[m];
        for (int p = 0; p < NP; p++) for (int k = 0; k < NZ; k++) gv[p] += J[k][p] * bjv[k] / NE;
        for (int c = 0; c < NZ; c++) {
            for (int k = 0; k < NZ; k++) c1[c][n][k] = S[k][c];
            for (int j = 0; j < NH; j++) {
                double s = 0;
                for (int k = 0; k < NZ; k++) s += W1[k][j] * S[k][c];
                c0[c][n][j] = phi[j] * s;
            }
        }
    }
    kfac_optimizer *h = NULL;
    REQUIRE_OK(h, kfac_optimizer_create(dtype, &h));
    int32_t l0, l1;
    REQUIRE_OK(h, add_dense(h, NX, NH, 1, &l0));
    REQUIRE_OK(h, add_dense(h, NH, NZ, 0, &l1));
    buf_t bx = buf_new(dtype, NE * NX), ba = buf_new(dtype, NE * NH), bc0 = buf_new(dtype, NZ * NE * NH),
          bc1 = buf_new(dtype, NZ * NE * NZ);
    for (int n = 0; n < NE; n++) {
        for (int i = 0; i < NX; i++) buf_set(&bx, n * NX + i, x[n][i]);
        for (int j = 0; j < NH; j++) buf_set(&ba, n * NH + j, a1[n][j]);
    }
    for (int c = 0; c < NZ; c++) for (int n = 0; n < NE; n++) {
        for (int j = 0; j < NH; j++) buf_set(&bc0, (c * NE + n) * NH + j, c0[c][n][j]);
        for (int k = 0; k < NZ; k++) buf_set(&bc1, (c * NE + n) * NZ + k, c1[c][n][k]);
    }
    /* Two micro-batches (1 + 2 examples) per layer: the columns of a part are [k][rows][out]. */
    const size_t es = dtype_size(dtype);
    int ok = 1;
    for (int part = 0; part < 2; part++) {
        const int first = part ? 1 : 0, rows = part ? NE - 1 : 1;
        buf_t p0 = buf_new(dtype, NZ * rows * NH), p1 = buf_new(dtype, NZ * rows * NZ);
        for (int c = 0; c < NZ; c++) {
            memcpy((char *)p0.p + (size_t)c * rows * NH * es, (char *)bc0.p + (size_t)(c * NE + first) * NH * es, (size_t)rows * NH * es);
            memcpy((char *)p1.p + (size_t)c * rows * NZ * es, (char *)bc1.p + (size_t)(c * NE + first) * NZ * es, (size_t)rows * NZ * es);
        }
        ok &= record_columns(h, dtype, l0, (char *)bx.p + (size_t)first * NX * es, p0.p, rows, NZ, KFAC_COLUMNS_PRODUCT) == KFAC_OK;
        ok &= record_columns(h, dtype, l1, (char *)ba.p + (size_t)first * NH * es, p1.p, rows, NZ, KFAC_COLUMNS_PRODUCT) == KFAC_OK;
        buf_free(&p0); buf_free(&p1);
    }
    int64_t examples = 0, values = 0;
    int32_t kk = 0;
    ok &= kfac_gn_columns_get_info(h, &examples, &kk, &values) == KFAC_OK && examples == NE && kk == NZ &&
          values == NE * (NX + NZ * NH) + NE * (NH + NZ * NZ);
    buf_t vw0 = buf_new(dtype, NH * NX), vb0 = buf_new(dtype, NH), vw1 = buf_new(dtype, NZ * NH);
    for (int p = 0; p < NH * NX; p++) buf_set(&vw0, p, v[p]);
    for (int p = 0; p < NH; p++) buf_set(&vb0, p, v[NH * NX + p]);
    for (int p = 0; p < NZ * NH; p++) buf_set(&vw1, p, v[NH * NX + NH + p]);
    buf_t ow0 = buf_new(dtype, NH * NX), ob0 = buf_new(dtype, NH), ow1 = buf_new(dtype, NZ * NH);
    void *vw[2] = {vw0.p, vw1.p}, *vb[2] = {vb0.p, NULL}, *pw[2] = {ow0.p, ow1.p}, *pb[2] = {ob0.p, NULL};
    const double tol = dtype == KFAC_FLOAT32 ? 2e-5 : 1e-12;
    for (int chain = 0; chain < 2; chain++) {
        if (chain) {
            int32_t layers[2] = {l0, l1}, acts[2] = {KFAC_ACTIVATION_TANH, KFAC_ACTIVATION_IDENTITY};
            ok &= kfac_gn_chain_define(h, layers, acts, 2, dist) == KFAC_OK;
            buf_t w0 = buf_new(dtype, NH * NX), bb0 = buf_new(dtype, NH), w1 = buf_new(dtype, NZ * NH), zz = buf_new(dtype, NE * NZ);
            for (int j = 0; j < NH; j++) { for (int i = 0; i < NX; i++) buf_set(&w0, j * NX + i, W0[j][i]); buf_set(&bb0, j, b0[j]); }
            for (int k = 0; k < NZ; k++) for (int j = 0; j < NH; j++) buf_set(&w1, k * NH + j, W1[k][j]);
            void *w[2] = {w0.p, w1.p}, *b[2] = {bb0.p, NULL}, *a[2] = {bx.p, NULL};
            ok &= chain_forward(h, dtype, w, b, a, NULL, NE, zz.p) == KFAC_OK;
            buf_free(&w0); buf_free(&bb0); buf_free(&w1); buf_free(&zz);
        }
        const int st = gn_multiply(h, dtype, chain, vw, vb, pw, pb, 2);
        double got[NP];
        for (int p = 0; p < NH * NX; p++) got[p] = get(&ow0, p);
        for (int p = 0; p < NH; p++) got[NH * NX + p] = get(&ob0, p);
        for (int p = 0; p < NZ * NH; p++) got[NH * NX + NH + p] = get(&ow1, p);
        const double e = rel_err(got, gv, NP);
        check(ok && st == KFAC_OK && e < tol, "[%s] dist %d: %s G·v against the explicit (1/N) Σ JᵀBJ v (relative error %.2e)",
              dtype_tag(dtype), dist, chain ? "chain (R-op)" : "stored columns", e);
    }
    /* In place: products written over the vectors. */
    gn_multiply(h, dtype, 0, vw, vb, pw, pb, 2);
    void *iw[2] = {vw0.p, vw1.p}, *ib[2] = {vb0.p, NULL};
    const int st = gn_multiply(h, dtype, 0, vw, vb, iw, ib, 2);
    check(st == KFAC_OK && buf_same(&vw0, &ow0) && buf_same(&vb0, &ob0) && buf_same(&vw1, &ow1),
          "[%s] dist %d: a product written over its vector equals the product into other buffers, bitwise", dtype_tag(dtype), dist);
    check(kfac_gn_columns_clear(h) == KFAC_OK && kfac_gn_columns_get_info(h, &examples, &kk, &values) == KFAC_OK &&
          examples == 0 && kk == 0 && values == 0 && gn_multiply(h, dtype, 0, vw, vb, pw, pb, 2) == KFAC_ERROR_NO_COLUMNS,
          "[%s] kfac_gn_columns_clear: nothing kept, NO_COLUMNS after", dtype_tag(dtype));
    {
        /* The chain's own back-propagated columns (PRODUCT): the same G·v without the caller's
         * backward passes. (The vectors were overwritten in place above: refill them.) */
        for (int p = 0; p < NH * NX; p++) buf_set(&vw0, p, v[p]);
        for (int p = 0; p < NH; p++) buf_set(&vb0, p, v[NH * NX + p]);
        for (int p = 0; p < NZ * NH; p++) buf_set(&vw1, p, v[NH * NX + NH + p]);
        const int rs = kfac_gn_chain_record_columns(h, KFAC_COLUMNS_PRODUCT);
        const int ms = gn_multiply(h, dtype, 0, vw, vb, pw, pb, 2);
        double got[NP];
        for (int p = 0; p < NH * NX; p++) got[p] = get(&ow0, p);
        for (int p = 0; p < NH; p++) got[NH * NX + p] = get(&ob0, p);
        for (int p = 0; p < NZ * NH; p++) got[NH * NX + NH + p] = get(&ow1, p);
        const double e = rel_err(got, gv, NP);
        check(rs == KFAC_OK && ms == KFAC_OK && e < tol,
              "[%s] dist %d: columns recorded by kfac_gn_chain_record_columns, G·v against the explicit (relative error %.2e)",
              dtype_tag(dtype), dist, e);
        REQUIRE_OK(h, kfac_gn_columns_clear(h));
    }
    /* K = 1 FACTOR columns are bitwise kfac_layer_record_output_grads_* (SUM; loss scale 2). */
    kfac_optimizer *g = NULL;
    REQUIRE_OK(g, kfac_optimizer_create(dtype, &g));
    REQUIRE_OK(g, add_dense(g, NX, NH, 1, &l0));
    REQUIRE_OK(g, add_dense(g, NH, NZ, 0, &l1));
    for (int i = 0; i < 2; i++) {
        kfac_optimizer *o = i ? g : h;
        REQUIRE_OK(o, kfac_param_set_double(o, KFAC_PARAM_OUTPUT_GRAD_SCALE, 2.0));
        REQUIRE_OK(o, record_inputs(o, 0, &bx, NE));
        if (i) REQUIRE_OK(o, record_grads(o, 0, &bc0, NE));
        else REQUIRE_OK(o, record_columns(o, dtype, 0, NULL, bc0.p, NE, 1, KFAC_COLUMNS_FACTOR));
        REQUIRE_OK(o, kfac_optimizer_update_factors(o));
    }
    buf_t ga = buf_new(dtype, (NX + 1) * (NX + 1)), gg = buf_new(dtype, NH * NH), ha = buf_clone(&ga), hg = buf_clone(&gg);
    check(get_factors(g, 0, &ga, &gg) == KFAC_OK && get_factors(h, 0, &ha, &hg) == KFAC_OK && buf_same(&gg, &hg),
          "[%s] K = 1 FACTOR columns: G bitwise that of kfac_layer_record_output_grads", dtype_tag(dtype));
    buf_free(&ga); buf_free(&gg); buf_free(&ha); buf_free(&hg);
    kfac_optimizer_free(g);
    kfac_optimizer_free(h);
    buf_free(&bx); buf_free(&ba); buf_free(&bc0); buf_free(&bc1);
    buf_free(&vw0); buf_free(&vb0); buf_free(&vw1); buf_free(&ow0); buf_free(&ob0); buf_free(&ow1);
}

/* --- Twins ------------------------------------------------------------------------------- */

typedef struct {
    buf_t x0, x1, c0, c1;        /* TWIN_MODEL: 5 -> 4 (bias) -> 3; K = 3, 4 examples */
    buf_t w0, b0, w1;            /* chain weights */
    buf_t v[3], p[2][3];         /* vector (w0, b0, w1) and the products of twins 0 and 1 */
} gn_data_t;

enum { TR = 4, TK = 3 };

static gn_data_t gn_data(int dtype, rng_t *r) {
    gn_data_t d;
    d.x0 = buf_new(dtype, TR * 5); d.x1 = buf_new(dtype, TR * 4);
    d.c0 = buf_new(dtype, TK * TR * 4); d.c1 = buf_new(dtype, TK * TR * 3);
    d.w0 = buf_new(dtype, 20); d.b0 = buf_new(dtype, 4); d.w1 = buf_new(dtype, 12);
    buf_t *all[] = {&d.x0, &d.x1, &d.c0, &d.c1, &d.w0, &d.b0, &d.w1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) buf_random(all[i], r);
    const size_t sizes[3] = {20, 4, 12};
    for (int i = 0; i < 3; i++) {
        d.v[i] = buf_new(dtype, sizes[i]);
        buf_random(&d.v[i], r);
        d.p[0][i] = buf_new(dtype, sizes[i]);
        d.p[1][i] = buf_new(dtype, sizes[i]);
    }
    return d;
}

static void gn_data_free(gn_data_t *d) {
    buf_t *all[] = {&d->x0, &d->x1, &d->c0, &d->c1, &d->w0, &d->b0, &d->w1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) buf_free(all[i]);
    for (int i = 0; i < 3; i++) { buf_free(&d->v[i]); buf_free(&d->p[0][i]); buf_free(&d->p[1][i]); }
}

/* The valid set-up every twin gets: columns of both layers kept, the chain defined and run. */
static int gn_setup(kfac_optimizer *h, int dtype, gn_data_t *d) {
    int32_t layers[2] = {0, 1}, acts[2] = {KFAC_ACTIVATION_TANH, KFAC_ACTIVATION_IDENTITY};
    void *w[2] = {d->w0.p, d->w1.p}, *b[2] = {d->b0.p, NULL}, *a[2] = {d->x0.p, NULL};
    return record_columns(h, dtype, 0, d->x0.p, d->c0.p, TR, TK, KFAC_COLUMNS_PRODUCT) == KFAC_OK &&
           record_columns(h, dtype, 1, d->x1.p, d->c1.p, TR, TK, KFAC_COLUMNS_PRODUCT) == KFAC_OK &&
           kfac_gn_chain_define(h, layers, acts, 2, KFAC_DIST_CATEGORICAL) == KFAC_OK &&
           chain_forward(h, dtype, w, b, a, NULL, TR, NULL) == KFAC_OK;
}

/* Both twins' column info and both products agree bitwise. */
static int gn_agree(twins_t *t, gn_data_t *d) {
    int ok = 1;
    int64_t e[2], v[2];
    int32_t k[2];
    for (int chain = 0; chain < 2; chain++) {
        for (int i = 0; i < 2; i++) {
            void *vw[2] = {d->v[0].p, d->v[2].p}, *vb[2] = {d->v[1].p, NULL};
            void *pw[2] = {d->p[i][0].p, d->p[i][2].p}, *pb[2] = {d->p[i][1].p, NULL};
            ok &= gn_multiply(t->h[i], t->dtype, chain, vw, vb, pw, pb, 2) == KFAC_OK;
            ok &= kfac_gn_columns_get_info(t->h[i], &e[i], &k[i], &v[i]) == KFAC_OK;
        }
        for (int j = 0; j < 3; j++) ok &= buf_same(&d->p[0][j], &d->p[1][j]);
        ok &= e[0] == e[1] && k[0] == k[1] && v[0] == v[1];
    }
    return ok;
}

static void gn_bad(twins_t *t, gn_data_t *d, int got, int want, const char *what, int extra_ok) {
    after_bad(t, bad_call(t->h[1], got), want, what, 1, extra_ok);
    check(gn_agree(t, d), "[%s]   ... then both twins' kept columns and chain give bitwise identical products",
          dtype_tag(t->dtype));
}

static void test_twins(int dtype) {
    twins_t t = twins_new(dtype, 73);
    kfac_optimizer *B = t.h[1];
    rng_t r = {74};
    gn_data_t d = gn_data(dtype, &r);
    int ok = 1;
    for (int i = 0; i < t.n; i++) ok &= gn_setup(t.h[i], dtype, &d);
    check(ok && gn_agree(&t, &d), "[%s] twins: columns kept and chain run on every twin", dtype_tag(dtype));
    const int other = other_dtype(dtype);
    buf_t wrong = buf_new(other, TK * TR * 4), bad = buf_clone(&d.c0);
    buf_set(&bad, 5, NAN);
    /* Records. */
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, NULL, TR, TK, 3), KFAC_ERROR_NULL_POINTER, "record columns: NULL columns", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, NULL, d.c0.p, TR, TK, KFAC_COLUMNS_PRODUCT), KFAC_ERROR_NULL_POINTER,
           "record columns: NULL inputs with PRODUCT", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 2, d.x0.p, d.c0.p, TR, TK, 3), KFAC_ERROR_UNKNOWN_LAYER, "record columns: layer 2", 1);
    gn_bad(&t, &d, record_columns(B, dtype, -1, d.x0.p, d.c0.p, TR, TK, 3), KFAC_ERROR_UNKNOWN_LAYER, "record columns: layer -1", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, d.c0.p, TR, TK, 0), KFAC_ERROR_INVALID_ARGUMENT, "record columns: uses 0", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, d.c0.p, TR, TK, 4), KFAC_ERROR_INVALID_ARGUMENT, "record columns: uses 4", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, d.c0.p, 0, TK, 3), KFAC_ERROR_INVALID_SIZE, "record columns: rows 0", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, d.c0.p, TR, 0, 3), KFAC_ERROR_INVALID_SIZE, "record columns: k 0", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, d.c0.p, 1, 2, 3), KFAC_ERROR_INVALID_SIZE,
           "record columns: k 2 differs from the kept 3 (FACTOR | PRODUCT: nothing recorded)", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, d.c0.p, INT64_MAX / 2, TK, 1), KFAC_ERROR_SIZE_OVERFLOW,
           "record columns: rows overflow", 1);
    gn_bad(&t, &d, record_columns(B, dtype, 0, d.x0.p, bad.p, TR, TK, 3), KFAC_ERROR_NON_FINITE, "record columns: NaN column", 1);
    gn_bad(&t, &d, record_columns(B, other, 0, d.x0.p, wrong.p, TR, TK, 1), KFAC_ERROR_DTYPE_MISMATCH, "record columns: other dtype", 1);
    /* Products. */
    void *vw[2] = {d.v[0].p, d.v[2].p}, *vb[2] = {d.v[1].p, NULL}, *pw[2] = {d.p[1][0].p, d.p[1][2].p}, *pb[2] = {d.p[1][1].p, NULL};
    void *nw[2] = {d.v[0].p, NULL}, *xb[2] = {d.v[1].p, d.v[1].p};
    buf_t keep0 = buf_clone(&d.p[1][0]);
    int inf_status;
    for (int chain = 0; chain < 2; chain++) {
        char what[128];
        const char *name = chain ? "chain multiply" : "columns multiply";
#define GN_BAD_PRODUCT(call, want, label)                                                               \
        do {                                                                                              \
            snprintf(what, sizeof what, "%s: %s", name, label);                                          \
            const int st_ = (call);                                                                       \
            gn_bad(&t, &d, st_, want, what, buf_same(&d.p[1][0], &keep0));                               \
        } while (0)
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, dtype, chain, NULL, vb, pw, pb, 2), KFAC_ERROR_NULL_POINTER, "NULL vector_w");
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, dtype, chain, vw, vb, NULL, pb, 2), KFAC_ERROR_NULL_POINTER, "NULL product_w");
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, dtype, chain, nw, vb, pw, pb, 2), KFAC_ERROR_NULL_POINTER, "NULL vector_w[1]");
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, dtype, chain, vw, NULL, pw, pb, 2), KFAC_ERROR_NULL_POINTER, "NULL bias array (layer 0 has bias)");
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, dtype, chain, vw, xb, pw, pb, 2), KFAC_ERROR_INVALID_ARGUMENT, "bias for layer 1 (no bias)");
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, dtype, chain, vw, vb, pw, pb, 1), KFAC_ERROR_INVALID_SIZE, "n_layers 1");
        buf_set(&d.v[2], 3, INFINITY);
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT((inf_status = gn_multiply(B, dtype, chain, vw, vb, pw, pb, 2), buf_set(&d.v[2], 3, 0.25), inf_status),
                       KFAC_ERROR_NON_FINITE, "Inf in vector_w[1]");
        memcpy(keep0.p, d.p[1][0].p, keep0.n * dtype_size(dtype));
        GN_BAD_PRODUCT(gn_multiply(B, other, chain, vw, vb, pw, pb, 2), KFAC_ERROR_DTYPE_MISMATCH, "other dtype");
#undef GN_BAD_PRODUCT
    }
    /* Chain definition and forward. */
    int32_t layers[2] = {0, 1}, rev[2] = {1, 0}, same[2] = {0, 0}, unknown[2] = {0, 7};
    int32_t acts[2] = {KFAC_ACTIVATION_TANH, KFAC_ACTIVATION_IDENTITY}, last[2] = {KFAC_ACTIVATION_TANH, KFAC_ACTIVATION_RELU},
            oob[2] = {9, KFAC_ACTIVATION_IDENTITY}, custom[2] = {KFAC_ACTIVATION_CUSTOM, KFAC_ACTIVATION_IDENTITY};
    gn_bad(&t, &d, kfac_gn_chain_define(B, NULL, acts, 2, 0), KFAC_ERROR_NULL_POINTER, "chain define: NULL layers", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, layers, NULL, 2, 0), KFAC_ERROR_NULL_POINTER, "chain define: NULL activations", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, layers, acts, 0, 0), KFAC_ERROR_INVALID_SIZE, "chain define: n 0", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, rev, acts, 2, 0), KFAC_ERROR_INVALID_SIZE, "chain define: sizes do not chain", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, same, acts, 2, 0), KFAC_ERROR_INVALID_ARGUMENT, "chain define: layer repeated", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, unknown, acts, 2, 0), KFAC_ERROR_UNKNOWN_LAYER, "chain define: layer 7", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, layers, last, 2, 0), KFAC_ERROR_INVALID_ARGUMENT, "chain define: last activation RELU", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, layers, oob, 2, 0), KFAC_ERROR_INVALID_ARGUMENT, "chain define: activation 9", 1);
    gn_bad(&t, &d, kfac_gn_chain_define(B, layers, acts, 2, 5), KFAC_ERROR_INVALID_ARGUMENT, "chain define: distribution 5", 1);
    gn_bad(&t, &d, kfac_gn_chain_record_columns(B, 0), KFAC_ERROR_INVALID_ARGUMENT, "chain record columns: uses 0", 1);
    gn_bad(&t, &d, kfac_gn_chain_record_columns(B, 7), KFAC_ERROR_INVALID_ARGUMENT, "chain record columns: uses 7", 1);
    void *w[2] = {d.w0.p, d.w1.p}, *b[2] = {d.b0.p, NULL}, *a[2] = {d.x0.p, NULL}, *noa[2] = {NULL, NULL},
         *now[2] = {d.w0.p, NULL}, *b2[2] = {d.b0.p, d.b0.p}, *nob[2] = {NULL, NULL}, *wrong_w[2] = {wrong.p, wrong.p};
    buf_t nan_w = buf_clone(&d.w1);
    buf_set(&nan_w, 1, NAN);
    void *nanw[2] = {d.w0.p, nan_w.p};
    gn_bad(&t, &d, chain_forward(B, dtype, NULL, b, a, NULL, TR, NULL), KFAC_ERROR_NULL_POINTER, "chain forward: NULL weights", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, now, b, a, NULL, TR, NULL), KFAC_ERROR_NULL_POINTER, "chain forward: NULL weights[1]", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, w, b, NULL, NULL, TR, NULL), KFAC_ERROR_NULL_POINTER, "chain forward: NULL inputs", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, w, b, noa, NULL, TR, NULL), KFAC_ERROR_NULL_POINTER, "chain forward: NULL inputs[0]", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, w, nob, a, NULL, TR, NULL), KFAC_ERROR_NULL_POINTER, "chain forward: NULL bias of layer 0", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, w, b2, a, NULL, TR, NULL), KFAC_ERROR_INVALID_ARGUMENT, "chain forward: bias for layer 1", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, w, b, a, NULL, 0, NULL), KFAC_ERROR_INVALID_SIZE, "chain forward: rows 0", 1);
    gn_bad(&t, &d, chain_forward(B, dtype, nanw, b, a, NULL, TR, NULL), KFAC_ERROR_NON_FINITE, "chain forward: NaN weight", 1);
    gn_bad(&t, &d, chain_forward(B, other, wrong_w, b, a, NULL, TR, NULL), KFAC_ERROR_DTYPE_MISMATCH, "chain forward: other dtype", 1);
    /* CUSTOM without derivatives: redefine on every twin (a valid call), then the bad forward. */
    ok = 1;
    for (int i = 0; i < t.n; i++) ok &= kfac_gn_chain_define(t.h[i], layers, custom, 2, 0) == KFAC_OK;
    check(ok, "[%s] every twin: chain redefined with a CUSTOM activation (forward pass dropped)", dtype_tag(dtype));
    after_bad(&t, bad_call(B, gn_multiply(B, dtype, 1, vw, vb, pw, pb, 2)), KFAC_ERROR_NO_COLUMNS,
              "chain multiply before the forward pass", 1, 1);
    after_bad(&t, bad_call(B, chain_forward(B, dtype, w, b, a, NULL, TR, NULL)), KFAC_ERROR_NULL_POINTER,
              "chain forward: CUSTOM without derivatives", 1, 1);
    after_bad(&t, bad_call(B, kfac_gn_chain_record_columns(B, KFAC_COLUMNS_FACTOR)), KFAC_ERROR_NO_COLUMNS,
              "chain record columns before the forward pass", 1, 1);
    ok = 1;
    for (int i = 0; i < t.n; i++) ok &= gn_setup(t.h[i], dtype, &d) && kfac_gn_columns_clear(t.h[i]) == KFAC_OK;
    check(ok, "[%s] every twin: set up again, then columns cleared", dtype_tag(dtype));
    after_bad(&t, bad_call(B, gn_multiply(B, dtype, 0, vw, vb, pw, pb, 2)), KFAC_ERROR_NO_COLUMNS, "columns multiply after clear", 1, 1);
    /* Layers disagree on the examples. */
    ok = 1;
    for (int i = 0; i < t.n; i++) ok &= record_columns(t.h[i], dtype, 0, d.x0.p, d.c0.p, TR, TK, KFAC_COLUMNS_PRODUCT) == KFAC_OK &&
                                       record_columns(t.h[i], dtype, 1, d.x1.p, d.c1.p, 1, TK, KFAC_COLUMNS_PRODUCT) == KFAC_OK;
    check(ok, "[%s] every twin: 4 examples kept for layer 0, 1 for layer 1", dtype_tag(dtype));
    after_bad(&t, bad_call(B, gn_multiply(B, dtype, 0, vw, vb, pw, pb, 2)), KFAC_ERROR_INVALID_SIZE,
              "columns multiply: layers keep different examples", 1, 1);
    check(kfac_gn_columns_get_info(NULL, NULL, NULL, NULL) == KFAC_ERROR_NULL_POINTER && kfac_gn_columns_clear(NULL) == KFAC_ERROR_NULL_POINTER &&
          kfac_gn_chain_define(NULL, layers, acts, 2, 0) == KFAC_ERROR_NULL_POINTER &&
          kfac_gn_chain_record_columns(NULL, 1) == KFAC_ERROR_NULL_POINTER &&
          gn_multiply(NULL, dtype, 0, vw, vb, pw, pb, 2) == KFAC_ERROR_NULL_POINTER &&
          gn_multiply(NULL, dtype, 1, vw, vb, pw, pb, 2) == KFAC_ERROR_NULL_POINTER &&
          chain_forward(NULL, dtype, w, b, a, NULL, TR, NULL) == KFAC_ERROR_NULL_POINTER &&
          record_columns(NULL, dtype, 0, d.x0.p, d.c0.p, TR, TK, 3) == KFAC_ERROR_NULL_POINTER,
          "[%s] NULL handle -> NULL_POINTER for every kfac_gn_* call", dtype_tag(dtype));
    buf_free(&wrong); buf_free(&bad); buf_free(&keep0); buf_free(&nan_w);
    gn_data_free(&d);
    twins_free(&t);
}

void test_gauss_newton(void) {
    section("Gauss-Newton products (experimental)");
    check(nonempty(kfac_status_string(KFAC_ERROR_NO_COLUMNS)) &&
          strcmp(kfac_status_string(KFAC_ERROR_NO_COLUMNS), kfac_status_string(KFAC_ERROR_NO_STEP)) != 0,
          "kfac_status_string(KFAC_ERROR_NO_COLUMNS) is its own (\"%s\")", kfac_status_string(KFAC_ERROR_NO_COLUMNS));
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        test_output_helpers(dtype);
        for (int dist = 0; dist < 3; dist++) test_oracle(dtype, dist);
        test_twins(dtype);
    }
}
