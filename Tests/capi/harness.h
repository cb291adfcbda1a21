/*
 * harness.h — the machinery shared by the C ABI tests (Tests/capi/), written against
 * include/kfac.h only: check() and its counters, status names, seeded random numbers,
 * dtype-generic caller buffers, value readers over the out-parameter getters, models and
 * gradient sets, state images, twin handle groups and the checks made after a bad call, the
 * forked-child guard for calls that could crash a buggy library, and the adaptive-mode data
 * shared by the adaptive and candidate tests. Each test family's entry points are declared at
 * the end; main.c runs them in order.
 */
#ifndef KFAC_CAPI_HARNESS_H
#define KFAC_CAPI_HARNESS_H

#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* mkdtemp, opendir, unlink, rmdir, dlsym under -std=c11 */
#endif

#include <kfac.h>

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Reporting                                                                                   */
/* ------------------------------------------------------------------------------------------ */

extern int g_checks, g_failures;

/* Records one check and prints it. Returns `ok`. */
int check(int ok, const char *fmt, ...);

void section(const char *title);

/* The name of a status code, for readable messages. */
const char *status_name(int s);

int nonempty(const char *s);

/* Checks the status of a call made with a NULL handle. */
void expect_null_handle(int got, int want, const char *what);

/* Aborts the whole test if a setup call fails: later checks would be meaningless. */
#define REQUIRE_OK(h, call)                                                                    \
    do {                                                                                       \
        int require_status_ = (call);                                                          \
        if (require_status_ != KFAC_OK) {                                                      \
            printf("FAIL setup call %s at %s:%d returned %s (%d): %s\n", #call, __FILE__,      \
                   __LINE__, status_name(require_status_), require_status_,                    \
                   (h) ? kfac_optimizer_last_error(h) : "");                                             \
            printf("\n%d checks, %d failed (aborted)\n", g_checks, g_failures + 1);           \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Random numbers and dtype-generic buffers                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct { uint64_t state; } rng_t;

uint64_t rng_next(rng_t *r);

/* Uniform in [-1, 1), a multiple of 2^-20 so it is exact in float32 too. */
double rng_sym(rng_t *r);

size_t dtype_size(int dtype);

int other_dtype(int dtype);

const char *dtype_tag(int dtype);

/* A caller buffer of n values in one precision. */
typedef struct {
    int dtype;
    size_t n;
    void *p;
} buf_t;

buf_t buf_new(int dtype, size_t n);

void buf_free(buf_t *b);

void buf_set(buf_t *b, size_t i, double v);

void buf_random(buf_t *b, rng_t *r);

buf_t buf_clone(const buf_t *b);

int buf_same(const buf_t *a, const buf_t *b);

/* ------------------------------------------------------------------------------------------ */
/* Value readers over the 0.2 out-parameter getters                                            */
/* ------------------------------------------------------------------------------------------ */

/* Each returns the value on success and the (negative) status on failure, so that checks such as
 * `layer_count(B) == 2` fail on either a wrong value or a failed call. The getters' own contract
 * (status, out-parameter untouched on failure) is checked separately in test_library.c. */
int32_t layer_count(const kfac_optimizer *h);

int64_t step_count(const kfac_optimizer *h);

int32_t wants_statistics(const kfac_optimizer *h);

int32_t dtype_of(const kfac_optimizer *h);

/* ν of the last step; NaN if the call fails (tests that expect a failure check the status). */
double kl_scale(const kfac_optimizer *h);

/* ρ of the last report; NaN if the call fails. */
double reduction_ratio(const kfac_optimizer *h);

/* kfac_layer_add_dense from the fields of a kfac_dense_desc. */
int add_dense_grouped(kfac_optimizer *h, int64_t in, int64_t out, int32_t has_bias,
                      int64_t input_group, int64_t output_group, int32_t *id);

int add_dense(kfac_optimizer *h, int64_t in, int64_t out, int32_t has_bias, int32_t *id);

/* Entry points dispatched on the precision of the buffers (not of the handle: calling the
 * "wrong" form is how DTYPE_MISMATCH is tested, always with correctly typed buffers). */
int record_inputs(kfac_optimizer *h, int32_t layer, const buf_t *x, int64_t rows);

int record_grads(kfac_optimizer *h, int32_t layer, const buf_t *g, int64_t rows);

int get_factors(const kfac_optimizer *h, int32_t layer, buf_t *a, buf_t *g);

int get_group_factors(const kfac_optimizer *h, int32_t layer, int32_t group, buf_t *a,
                      buf_t *g);

int precondition(kfac_optimizer *h, int32_t layer, buf_t *w, buf_t *b);

/* ------------------------------------------------------------------------------------------ */
/* Models: layer lists, gradients                                                              */
/* ------------------------------------------------------------------------------------------ */

enum { MAX_LAYERS = 4 };

typedef struct {
    int64_t in, out; /* dense: features; convolution: channels */
    int bias;
    const kfac_conv2d_desc *conv; /* NULL for a dense layer */
} layer_spec_t;

typedef struct {
    int n;
    layer_spec_t l[MAX_LAYERS];
} model_t;

/* The twin groups' model: a layer with bias and one without. */
extern const model_t TWIN_MODEL;

/* Output size of a convolution along one dimension (the header's formula; 0 = 1 for stride
 * and dilation). */
int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t padding,
                 int64_t dilation);

int64_t conv_groups(const kfac_conv2d_desc *d);

/* Values per row (dense) or per example (convolution) of a layer's inputs. */
int64_t spec_x_values(const layer_spec_t *s);

/* Values per row or example of a layer's output gradients. */
int64_t spec_g_values(const layer_spec_t *s);

/* Values of a layer's weight gradient. */
int64_t spec_w_values(const layer_spec_t *s);

kfac_optimizer *make_handle(int dtype, const model_t *m);

/* A set of parameter gradients (weights and biases) for a model, in one precision. */
typedef struct {
    int n;
    buf_t w[MAX_LAYERS], b[MAX_LAYERS]; /* b[l].p is NULL for layers without bias */
} grads_t;

grads_t grads_new(int dtype, const model_t *m, rng_t *r);

grads_t grads_clone(const grads_t *src);

int grads_same(const grads_t *a, const grads_t *b);

void grads_free(grads_t *g);

/* kfac_optimizer_step_* with the pointer arrays built from g; `with_bias_array` = 0 passes bias_grads NULL. */
int step_with(kfac_optimizer *h, grads_t *g, int with_bias_array, int32_t n_layers);

int step(kfac_optimizer *h, grads_t *g);

/* ------------------------------------------------------------------------------------------ */
/* State images                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Saves the handle's state into a new malloc'ed buffer; returns NULL (and reports) on failure. */
unsigned char *save_image(const kfac_optimizer *h, size_t *size);

/* 1 if both handles' state images are byte-identical. */
int same_state(const kfac_optimizer *a, const kfac_optimizer *b);

/* ------------------------------------------------------------------------------------------ */
/* Twin groups                                                                                 */
/* ------------------------------------------------------------------------------------------ */

enum { MAX_TWINS = 3 };

/* Handles of one precision and model that are fed identical valid calls; h[1] also receives the
 * bad calls. The rng produces the shared data. */
typedef struct {
    int dtype, n;
    kfac_optimizer *h[MAX_TWINS];
    model_t model;
    rng_t rng;
    int rounds;
} twins_t;

twins_t twins_new_model(int dtype, uint64_t seed, const model_t *model);

twins_t twins_new(int dtype, uint64_t seed);

void twins_free(twins_t *t);

/* Records one batch of random inputs and output gradients on every twin (if it wants them).
 * Returns 1 if every call succeeded and the twins agreed on kfac_optimizer_wants_statistics. */
int twins_record(twins_t *t);

/* A full round: record, then step every twin with the same gradients; checks all succeeded,
 * left kfac_optimizer_last_error empty, and produced bitwise identical directions and KL scales. */
int twins_round(twins_t *t, char *why, size_t why_size);

/* kfac_optimizer_last_error of the bad twin, captured right after the bad call (before any other call on
 * the handle, which may reset it). */
extern char g_last_error[512];

int bad_call(const kfac_optimizer *h, int status);

/* The checks made after every bad call on twin 1: status, messages, unchanged state and, if
 * `round`, an identical next round. `extra_ok` carries call-specific checks (untouched buffers). */
void after_bad(twins_t *t, int got, int want, const char *what, int round, int extra_ok);

/* BAD(call, status, description): `call` is evaluated with `B` naming the bad twin. */
#define BAD(call, want, what) after_bad(&t, bad_call(B, (call)), (want), (what), 1, 1)

#define BAD_NO_ROUND(call, want, what) after_bad(&t, bad_call(B, (call)), (want), (what), 0, 1)

/* Calls that could make a buggy library abort (e.g. an unchecked integer overflow on huge
 * sizes) are first made in a forked child, on the child's copy of the handle. Returns 1 if the
 * child returned normally (the parent may then make the call itself); otherwise reports a
 * failed check naming the signal and returns 0, so one crash does not end the whole test. */
typedef int (*guarded_fn)(kfac_optimizer *h, const void *arg);

int survives_in_child(kfac_optimizer *h, guarded_fn fn, const void *arg, const char *what);

/* Arguments of kfac_layer_add_dense (grouped = 0) or kfac_layer_add_dense (grouped = 1). */
typedef struct {
    int64_t in, out;
    int bias;
    int64_t input_group, output_group;
    int grouped;
} dense_args_t;

int call_add_dense(kfac_optimizer *h, const void *arg);

int call_add_conv2d(kfac_optimizer *h, const void *arg);

/* A valid convolution for the error tables: 4 -> 6 channels in 2 groups, 3x3 kernel on 5x5. */
kfac_conv2d_desc base_conv(void);

/* A fresh handle with TWIN_MODEL and one recorded batch on both layers. */
kfac_optimizer *handle_with_batch(int dtype, rng_t *r, int record_inputs_side,
                                  int record_grads_side);

/* Checks that a failing call left the handle's image unchanged. */
void expect_fails_unchanged(kfac_optimizer *h, int got, int want, const unsigned char *img,
                            size_t size, const char *what);

/* kfac_adaptive_solve_step_size_* chosen by `dtype` (the buffers' precision), with raw pointers so that
 * NULL can be passed for any of them. */
int solve_raw(kfac_optimizer *h, int dtype, const void *z, const void *jd, const void *jp,
              int64_t rows, int64_t dim, int dist, double *alpha, double *mu, double *m);

/* Outputs and Jacobian products of one "batch" for the adaptive calls (the library does not
 * relate them to the layers: any rows × dim values will do). */
enum { AD_ROWS = 6, AD_DIM = 3 };

typedef struct {
    buf_t z, jd, jp;
} adaptive_data_t;

adaptive_data_t adaptive_data(int dtype, rng_t *r);

void adaptive_data_free(adaptive_data_t *d);

/* A valid solve (with previous products) and a valid report on every twin: returns 1 if all
 * succeeded with bitwise identical α, μ, M(δ) and ρ. This is what shows that a failed call
 * before it consumed no directions and changed no hidden adaptive state (δ₀, the pending
 * prediction, the report counter), which the state images do not all cover. */
int twins_adaptive_agree(twins_t *t, char *why, size_t why_size);

/* After a bad adaptive call on twin 1: the usual checks (status, message, identical state
 * images), then twins_adaptive_agree. */
void after_bad_adaptive(twins_t *t, int got, int want, const char *what, int extra_ok);

/* ------------------------------------------------------------------------------------------ */
/* Test families (one file each; main.c runs them in this order)                               */
/* ------------------------------------------------------------------------------------------ */

/* test_library.c: versions, status strings, symbols, creation, NULL handles, the parameter
 * table (kfac_param_get_info, kfac_param_list), defaults and bounds, the out-parameter getters. */
void test_globals(void);
void test_async_inversion(void);
void test_exports(void);
void test_param_table(void);
void test_params_and_info(void);
void test_getters(void);
void errors_params(twins_t *tp);

/* test_errors.c: the error paths of every entry point on twin handles, per precision. */
void test_errors(int dtype, const char *tmpdir);
void errors_before_statistics(twins_t *tp);
void errors_record(twins_t *tp);
void errors_step(twins_t *tp);

/* test_layers.c: dense and convolution registration (kfac_dense_desc, kfac_conv2d_desc), layer
 * info, convolutions on twin handles. */
void errors_add_conv2d(twins_t *tp);
void test_dense_desc(void);
void test_layer_info(void);
void test_conv_errors(int dtype);
void test_conv_desc_compat(void);

/* test_optimizer.c: call order, the schedule, distinct handles on concurrent threads. */
void test_call_order(void);
void test_concurrency(void);

/* test_numerics.c: factors and directions against dense oracles (float64). */
void test_numerics(void);
void test_conv_numerics(void);

/* test_state.c: state images and files on twin handles. */
void errors_state(twins_t *tp, const char *tmpdir);

/* test_adaptive.c: the adaptive mode and the samplers. */
void errors_adaptive(twins_t *tp);
void test_adaptive_call_order(void);
void test_samplers(void);
void test_adaptive_numerics(void);
void test_adaptive_pending_solve(void);
void test_adaptive_skipped_reports(void);

/* test_candidates.c (KFAC_EXPERIMENTAL_API): re-choosing the factor damping γ. */
void test_candidates_null_handle(void);
void test_candidate_errors(int dtype);
void test_candidate_numerics(void);

/* test_curvature.c (KFAC_EXPERIMENTAL_API): kfac_curvature_multiply_* against the oracles and
 * on twin handles. */
void test_curvature_multiply(void);

/* test_gauss_newton.c (KFAC_EXPERIMENTAL_API): kfac_gn_* and the column recording. */
void test_gauss_newton(void);

/* test_kfra.c (KFAC_EXPERIMENTAL_API): KFRA on the dense chain. */
void test_kfra(void);
/* test_cg.c: conjugate gradient and Newton-CG (experimental kfac_cg_*). */
void test_cg(void);
/* test_ekfac.c (KFAC_EXPERIMENTAL_API): the EKFAC strategy, paired recording, the scaling readout. */
void test_ekfac_numerics(void);
void test_ekfac_errors(int dtype);
/* test_reliability.c: issue 15's regressions (crafted images, the pending bound, worker threads,
 * state files, allocation failures, exhaustive bit flips and truncations, killed saves). */
void test_reliability(const char *tmpdir);

/* test_distributed.c (KFAC_EXPERIMENTAL_API): the fake-world distributed tests. */
void test_distributed(void);
/* test_tridiagonal.c (KFAC_EXPERIMENTAL_API): block-tridiagonal links against the dense Ξᵀ Λ Ξ
 * and on twin handles. */
void test_tridiagonal(void);

#endif /* KFAC_CAPI_HARNESS_H */
