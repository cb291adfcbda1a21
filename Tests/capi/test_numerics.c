/*
 * test_numerics.c — numerics through the C ABI (float64): factors, the eigen and Cholesky
 * strategies against dense oracles, the KL clip, the reduction and scale parameters, the moving
 * average; a convolution against a naive loop and per-group Kronecker solves.
 */
#include "harness.h"
#include "oracles.h"

#include <math.h>

/* The layers of the numeric tests: one with bias, one without. */
static const model_t NUM_MODEL = {2, {{3, 2, 1, NULL}, {2, 3, 0, NULL}}};

/* [W | b] of layer l from a grads_t (float64). */
static void theta_of(const grads_t *g, const model_t *m, int l, double *theta) {
    const int in = (int)m->l[l].in, out = (int)m->l[l].out, p = in + m->l[l].bias;
    for (int i = 0; i < out; i++) {
        for (int j = 0; j < in; j++) theta[i * p + j] = ((double *)g->w[l].p)[i * in + j];
        if (m->l[l].bias) theta[i * p + in] = ((double *)g->b[l].p)[i];
    }
}

void test_numerics(void) {
    section("numerics through the C ABI (float64)");
    rng_t r = {404};
    const model_t *m = &NUM_MODEL;

    /* Single example: A = ā āᵀ and G = g gᵀ exactly. */
    {
        kfac_optimizer *h = make_handle(KFAC_FLOAT64, m);
        double a[3], g[2];
        for (int i = 0; i < 3; i++) a[i] = rng_sym(&r) * 3.7;
        for (int i = 0; i < 2; i++) g[i] = rng_sym(&r) * 0.3;
        double a1[2] = {rng_sym(&r), rng_sym(&r)}, g1[3] = {rng_sym(&r), rng_sym(&r), rng_sym(&r)};
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 0, a, 1));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, g, 1));
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 1, a1, 1));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 1, g1, 1));
        REQUIRE_OK(h, kfac_optimizer_update_factors(h));
        double A[16], G[4], A1[4], G1[9];
        REQUIRE_OK(h, kfac_layer_get_factors_f64(h, 0, 0, A, G));
        REQUIRE_OK(h, kfac_layer_get_factors_f64(h, 1, 0, A1, G1));
        const double abar[4] = {a[0], a[1], a[2], 1.0};
        int exact = 1;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++)
                if (A[i * 4 + j] != abar[i] * abar[j]) exact = 0;
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
                if (G[i * 2 + j] != g[i] * g[j]) exact = 0;
        check(exact, "rows = 1, layer with bias: A == ā āᵀ (ā = [a; 1]) and G == g gᵀ exactly");
        exact = 1;
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
                if (A1[i * 2 + j] != a1[i] * a1[j]) exact = 0;
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                if (G1[i * 3 + j] != g1[i] * g1[j]) exact = 0;
        check(exact, "rows = 1, layer without bias: A == a aᵀ and G == g gᵀ exactly");

        /* Second update: the moving average A ← β A + (1 − β) A_batch (default β = 0.95). */
        double b[3] = {rng_sym(&r), rng_sym(&r), rng_sym(&r)}, gb[2] = {rng_sym(&r), rng_sym(&r)};
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 0, b, 1));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, gb, 1));
        REQUIRE_OK(h, kfac_optimizer_update_factors(h));
        double A2[16], G2[4], A1b[4], EA[16], EG[4];
        REQUIRE_OK(h, kfac_layer_get_factors_f64(h, 0, 0, A2, G2));
        REQUIRE_OK(h, kfac_layer_get_factors_f64(h, 1, 0, A1b, NULL));
        const double bbar[4] = {b[0], b[1], b[2], 1.0};
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) EA[i * 4 + j] = 0.95 * A[i * 4 + j] + 0.05 * bbar[i] * bbar[j];
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++) EG[i * 2 + j] = 0.95 * G[i * 2 + j] + 0.05 * gb[i] * gb[j];
        check(rel_diff(A2, EA, 16) < 1e-14 && rel_diff(G2, EG, 4) < 1e-14 &&
                  memcmp(A1, A1b, sizeof A1) == 0,
              "second factor update: A = 0.95 A + 0.05 ā āᵀ (rel. diff %.1e), G likewise "
              "(%.1e); a layer with nothing pending keeps its factors",
              rel_diff(A2, EA, 16), rel_diff(G2, EG, 4));
        kfac_optimizer_free(h);
    }

    /* Mean reduction and output-gradient scale act exactly as documented (powers of two make
     * the rescaling exact, so the factors must be bitwise equal). */
    {
        const int rows = 4;
        double x[12], gs[8], gm[8], gl[8];
        for (int i = 0; i < 12; i++) x[i] = rng_sym(&r);
        for (int i = 0; i < 8; i++) {
            gs[i] = rng_sym(&r);
            gm[i] = gs[i] / rows; /* gradient of the mean loss */
            gl[i] = gs[i] * 8.0;  /* gradient of the loss scaled by 8 */
        }
        kfac_optimizer *hs = make_handle(KFAC_FLOAT64, m), *hm = make_handle(KFAC_FLOAT64, m),
                       *hl = make_handle(KFAC_FLOAT64, m);
        REQUIRE_OK(hm, kfac_param_set_int(hm, KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN));
        REQUIRE_OK(hl, kfac_param_set_double(hl, KFAC_PARAM_OUTPUT_GRAD_SCALE, 8.0));
        kfac_optimizer *hh[3] = {hs, hm, hl};
        const double *gg[3] = {gs, gm, gl};
        double G[3][4], A[3][16];
        for (int k = 0; k < 3; k++) {
            REQUIRE_OK(hh[k], kfac_layer_record_inputs_f64(hh[k], 0, x, rows));
            REQUIRE_OK(hh[k], kfac_layer_record_output_grads_f64(hh[k], 0, gg[k], rows));
            REQUIRE_OK(hh[k], kfac_optimizer_update_factors(hh[k]));
            REQUIRE_OK(hh[k], kfac_layer_get_factors_f64(hh[k], 0, 0, A[k], G[k]));
        }
        double EG[4] = {0};
        for (int n = 0; n < rows; n++)
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) EG[i * 2 + j] += gs[n * 2 + i] * gs[n * 2 + j] / rows;
        check(rel_diff(G[0], EG, 4) < 1e-15, "G = (1/N) Σ g gᵀ over 4 rows (rel. diff %.1e)",
              rel_diff(G[0], EG, 4));
        check(memcmp(G[0], G[1], sizeof G[0]) == 0,
              "KFAC_REDUCTION_MEAN with mean-loss gradients g/N gives the same G as SUM with g");
        check(memcmp(G[0], G[2], sizeof G[0]) == 0,
              "OUTPUT_GRAD_SCALE = 8 with gradients 8g gives the same G as scale 1 with g");
        check(memcmp(A[0], A[1], sizeof A[0]) == 0 && memcmp(A[0], A[2], sizeof A[0]) == 0,
              "reduction and scale do not touch A");
        for (int k = 0; k < 3; k++) kfac_optimizer_free(hh[k]);
    }

    /* Preconditioning against dense oracles. 6 rows per layer. */
    kfac_optimizer *h = make_handle(KFAC_FLOAT64, m);
    const double lambda = 1e-2;
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));
    for (int l = 0; l < 2; l++) {
        const int rows = 6;
        buf_t x = buf_new(KFAC_FLOAT64, (size_t)(rows * m->l[l].in));
        buf_t g = buf_new(KFAC_FLOAT64, (size_t)(rows * m->l[l].out));
        buf_random(&x, &r);
        buf_random(&g, &r);
        REQUIRE_OK(h, record_inputs(h, l, &x, rows));
        REQUIRE_OK(h, record_grads(h, l, &g, rows));
        buf_free(&x);
        buf_free(&g);
    }
    REQUIRE_OK(h, kfac_optimizer_update_factors(h));
    REQUIRE_OK(h, kfac_optimizer_update_inverses(h));
    double A[2][16], G[2][9];
    for (int l = 0; l < 2; l++) REQUIRE_OK(h, kfac_layer_get_factors_f64(h, l, 0, A[l], G[l]));

    grads_t v = grads_new(KFAC_FLOAT64, m, &r);
    double V[2][12], U[2][12], E[2][12];
    for (int l = 0; l < 2; l++) theta_of(&v, m, l, V[l]);

    /* Eigen strategy (default). */
    grads_t u = grads_clone(&v);
    for (int l = 0; l < 2; l++) {
        REQUIRE_OK(h, precondition(h, l, &u.w[l], m->l[l].bias ? &u.b[l] : NULL));
        theta_of(&u, m, l, U[l]);
        const int p = (int)(m->l[l].in + m->l[l].bias), out = (int)m->l[l].out;
        kron_solve(A[l], G[l], p, out, lambda, V[l], E[l]);
        const double d = rel_diff(U[l], E[l], (size_t)(p * out));
        check(d < 1e-10, "eigen strategy, layer %d (%s): U == (A⊗G + λI)⁻¹ vec(V) by dense "
                         "%dx%d solve (rel. diff %.2e)",
              l, m->l[l].bias ? "with bias" : "no bias", p * out, p * out, d);
    }

    /* The same through kfac_optimizer_step: KL clip off, so ν = 1 and the directions equal U. */
    grads_t s = grads_clone(&v);
    REQUIRE_OK(h, step(h, &s));
    double S[12];
    double worst = 0;
    for (int l = 0; l < 2; l++) {
        theta_of(&s, m, l, S);
        worst = fmax(worst, rel_diff(S, E[l], (size_t)((m->l[l].in + m->l[l].bias) * m->l[l].out)));
    }
    check(worst < 1e-10 && kl_scale(h) == 1.0,
          "kfac_optimizer_step with KL clip 0: directions equal the oracle (rel. diff %.2e), ν = %g", worst,
          kl_scale(h));

    /* KL clip: ν = min(1, sqrt(κ / (η² Σ_l |⟨U_l, V_l⟩|))). */
    double inner = 0;
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < (int)((m->l[l].in + m->l[l].bias) * m->l[l].out); i++)
            inner += E[l][i] * V[l][i];
    const double eta = 0.5, kappa = 1e-4 * eta * eta * fabs(inner);
    const double nu = fmin(1.0, sqrt(kappa / (eta * eta * fabs(inner))));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, kappa));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_LEARNING_RATE, eta));
    grads_t c = grads_clone(&v);
    REQUIRE_OK(h, step(h, &c));
    worst = 0;
    for (int l = 0; l < 2; l++) {
        const size_t n = (size_t)((m->l[l].in + m->l[l].bias) * m->l[l].out);
        double scaled[12];
        for (size_t i = 0; i < n; i++) scaled[i] = nu * E[l][i];
        theta_of(&c, m, l, S);
        worst = fmax(worst, rel_diff(S, scaled, n));
    }
    const double nu_lib = kl_scale(h);
    check(fabs(nu_lib - nu) < 1e-10 * nu && worst < 1e-9,
          "KL clip κ = %.3g, η = %g: ν = %.6g (library %.6g), directions = ν U (rel. diff %.2e)",
          kappa, eta, nu, nu_lib, worst);
    /* η = 0 is accepted and never clips (ν = 1), whatever κ. */
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_LEARNING_RATE, 0.0));
    grads_t c0 = grads_clone(&v);
    REQUIRE_OK(h, step(h, &c0));
    worst = 0;
    for (int l = 0; l < 2; l++) {
        theta_of(&c0, m, l, S);
        worst = fmax(worst, rel_diff(S, E[l], (size_t)((m->l[l].in + m->l[l].bias) * m->l[l].out)));
    }
    check(kl_scale(h) == 1.0 && worst < 1e-10,
          "KL clip κ = %.3g with learning rate η = 0: ν = %g (want 1), directions = U (rel. diff "
          "%.2e)", kappa, kl_scale(h), worst);
    grads_free(&c0);
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_LEARNING_RATE, eta));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));

    /* Cholesky strategy with and without π. */
    for (int use_pi = 1; use_pi >= 0; use_pi--) {
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_CHOLESKY));
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_PI_DAMPING, use_pi));
        REQUIRE_OK(h, kfac_optimizer_update_inverses(h));
        grads_t q = grads_clone(&v);
        for (int l = 0; l < 2; l++) {
            REQUIRE_OK(h, precondition(h, l, &q.w[l], m->l[l].bias ? &q.b[l] : NULL));
            theta_of(&q, m, l, U[l]);
            const int p = (int)(m->l[l].in + m->l[l].bias), out = (int)m->l[l].out;
            factored_solve(A[l], G[l], p, out, lambda, use_pi, V[l], E[l]);
            const double d = rel_diff(U[l], E[l], (size_t)(p * out));
            check(d < 1e-10, "Cholesky strategy, π %s, layer %d: U == (G + (√λ/π)I)⁻¹ V "
                             "(A + π√λ I)⁻¹ (rel. diff %.2e)",
                  use_pi ? "on" : "off", l, d);
        }
        grads_free(&q);
    }

    grads_free(&v);
    grads_free(&u);
    grads_free(&s);
    grads_free(&c);
    kfac_optimizer_free(h);
}

/* A float64 convolution through the C ABI: Ω_g and Γ_g against a naive loop over examples,
 * output positions and kernel offsets, and kfac_optimizer_step_f64's directions (eigen strategy, KL clip
 * 0) against a dense solve of (Ω_g ⊗ Γ_g + λI) vec(U_g) = vec(V_g) per group. The same batch is
 * fed in NCHW and in NHWC. */
void test_conv_numerics(void) {
    section("numerics through the C ABI: a float64 convolution (groups 2, padding, stride 2)");
    enum { N = 3, CIN = 4, COUT = 6, G = 2, KH = 3, KW = 2, H = 5, W = 6, SH = 2, SW = 2, PH = 1,
           PW = 1, HO = (H + 2 * PH - (KH - 1) - 1) / SH + 1, WO = (W + 2 * PW - (KW - 1) - 1) / SW + 1,
           T = HO * WO, CG = CIN / G, OG = COUT / G, P = CG * KH * KW, AD = P + 1 };
    const double lambda = 0.02;
    rng_t r = {909};
    static double x[N][CIN][H][W], gr[N][COUT][HO][WO], wt[COUT][CG][KH][KW], bs[COUT];
    static double xl[N][H][W][CIN], gl[N][HO][WO][COUT]; /* the same, channels last */
    for (int n = 0; n < N; n++)
        for (int c = 0; c < CIN; c++)
            for (int i = 0; i < H; i++)
                for (int j = 0; j < W; j++) xl[n][i][j][c] = x[n][c][i][j] = rng_sym(&r);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < COUT; c++)
            for (int i = 0; i < HO; i++)
                for (int j = 0; j < WO; j++) gl[n][i][j][c] = gr[n][c][i][j] = 0.5 * rng_sym(&r);
    for (int o = 0; o < COUT; o++) {
        bs[o] = rng_sym(&r);
        for (int c = 0; c < CG; c++)
            for (int i = 0; i < KH; i++)
                for (int j = 0; j < KW; j++) wt[o][c][i][j] = rng_sym(&r);
    }

    /* The oracle: Ω_g = (1/N) Σ_n Σ_t ā ā ᵀ (patch in [c][i][j] order, zeros in the padding, then
     * 1), Γ_g = (1/(N|T|)) Σ_n Σ_t g gᵀ; U_g by the dense Kronecker solve. */
    static double omega[G][AD * AD], gamma[G][OG * OG], want_w[COUT][P], want_b[COUT];
    memset(omega, 0, sizeof omega);
    memset(gamma, 0, sizeof gamma);
    for (int gi = 0; gi < G; gi++) {
        for (int n = 0; n < N; n++)
            for (int oh = 0; oh < HO; oh++)
                for (int ow = 0; ow < WO; ow++) {
                    double abar[AD];
                    for (int c = 0; c < CG; c++)
                        for (int i = 0; i < KH; i++)
                            for (int j = 0; j < KW; j++) {
                                const int y = oh * SH - PH + i, z = ow * SW - PW + j;
                                abar[(c * KH + i) * KW + j] =
                                    y >= 0 && y < H && z >= 0 && z < W ? x[n][gi * CG + c][y][z] : 0.0;
                            }
                    abar[P] = 1.0;
                    for (int u = 0; u < AD; u++)
                        for (int v = 0; v < AD; v++) omega[gi][u * AD + v] += abar[u] * abar[v] / N;
                    for (int u = 0; u < OG; u++)
                        for (int v = 0; v < OG; v++)
                            gamma[gi][u * OG + v] += gr[n][gi * OG + u][oh][ow] *
                                                     gr[n][gi * OG + v][oh][ow] / (N * T);
                }
        double V[OG * AD], U[OG * AD];
        for (int o = 0; o < OG; o++) {
            for (int k = 0; k < P; k++) V[o * AD + k] = (&wt[gi * OG + o][0][0][0])[k];
            V[o * AD + P] = bs[gi * OG + o];
        }
        kron_solve(omega[gi], gamma[gi], AD, OG, lambda, V, U);
        for (int o = 0; o < OG; o++) {
            for (int k = 0; k < P; k++) want_w[gi * OG + o][k] = U[o * AD + k];
            want_b[gi * OG + o] = U[o * AD + P];
        }
    }

    for (int layout = KFAC_LAYOUT_NCHW; layout <= KFAC_LAYOUT_NHWC; layout++) {
        const char *tag = layout == KFAC_LAYOUT_NCHW ? "NCHW" : "NHWC";
        const kfac_conv2d_desc d = {
            .struct_size = sizeof(kfac_conv2d_desc), .in_channels = CIN, .out_channels = COUT,
            .kernel_h = KH, .kernel_w = KW, .stride_h = SH, .stride_w = SW, .padding_h = PH,
            .padding_w = PW, .dilation_h = 1, .dilation_w = 1, .groups = G, .input_h = H,
            .input_w = W, .has_bias = 1, .layout = layout, .approximation = KFAC_CONV_KFC};
        kfac_optimizer *h = NULL;
        int32_t id = -1;
        REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));
        REQUIRE_OK(h, kfac_layer_add_conv2d(h, &d, &id));
        REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
        REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
        const double *xin = layout == KFAC_LAYOUT_NCHW ? &x[0][0][0][0] : &xl[0][0][0][0];
        const double *gin = layout == KFAC_LAYOUT_NCHW ? &gr[0][0][0][0] : &gl[0][0][0][0];
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, id, xin, N));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, id, gin, N));
        REQUIRE_OK(h, kfac_optimizer_update_factors(h));
        for (int gi = 0; gi < G; gi++) {
            double A[AD * AD], Gm[OG * OG];
            REQUIRE_OK(h, kfac_layer_get_factors_f64(h, id, gi, A, Gm));
            const double da = rel_diff(A, omega[gi], AD * AD), dg = rel_diff(Gm, gamma[gi], OG * OG);
            check(da < 1e-13 && dg < 1e-13,
                  "%s, group %d: Ω_g (%dx%d) and Γ_g (%dx%d) equal the naive loop (rel. diff %.1e, "
                  "%.1e)", tag, gi, AD, AD, OG, OG, da, dg);
        }
        static double w[COUT][CG][KH][KW], b[COUT];
        memcpy(w, wt, sizeof w);
        memcpy(b, bs, sizeof b);
        double *wp[1] = {&w[0][0][0][0]}, *bp[1] = {b};
        REQUIRE_OK(h, kfac_optimizer_step_f64(h, wp, bp, 1));
        const double dw = rel_diff(&w[0][0][0][0], &want_w[0][0], COUT * P);
        const double db = rel_diff(b, want_b, COUT);
        check(dw < 1e-10 && db < 1e-10 && kl_scale(h) == 1.0,
              "%s: kfac_optimizer_step_f64 (eigen, KL clip 0) writes (Ω_g ⊗ Γ_g + λI)⁻¹ vec([W_g | b_g]) per "
              "group, by dense %dx%d solves (rel. diff %.1e weights, %.1e biases)",
              tag, OG * AD, OG * AD, dw, db);
        kfac_optimizer_free(h);
    }
}
