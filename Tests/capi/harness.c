/*
 * harness.c — the shared machinery of the C ABI tests; see harness.h.
 */
#include "harness.h"

#include <math.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Reporting                                                                                   */
/* ------------------------------------------------------------------------------------------ */

int g_checks, g_failures;

int check(int ok, const char *fmt, ...) {
    va_list ap;
    g_checks++;
    if (!ok) g_failures++;
    printf("%s ", ok ? "ok  " : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    return ok;
}

void section(const char *title) { printf("\n--- %s ---\n", title); }

const char *status_name(int s) {
    switch (s) {
    case KFAC_OK: return "KFAC_OK";
    case KFAC_ERROR_NULL_POINTER: return "NULL_POINTER";
    case KFAC_ERROR_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case KFAC_ERROR_UNKNOWN_PARAMETER: return "UNKNOWN_PARAMETER";
    case KFAC_ERROR_PARAMETER_TYPE: return "PARAMETER_TYPE";
    case KFAC_ERROR_PARAMETER_RANGE: return "PARAMETER_RANGE";
    case KFAC_ERROR_INVALID_SIZE: return "INVALID_SIZE";
    case KFAC_ERROR_SIZE_OVERFLOW: return "SIZE_OVERFLOW";
    case KFAC_ERROR_UNKNOWN_LAYER: return "UNKNOWN_LAYER";
    case KFAC_ERROR_DTYPE_MISMATCH: return "DTYPE_MISMATCH";
    case KFAC_ERROR_NO_STATISTICS: return "NO_STATISTICS";
    case KFAC_ERROR_NO_INVERSES: return "NO_INVERSES";
    case KFAC_ERROR_LAYERS_FROZEN: return "LAYERS_FROZEN";
    case KFAC_ERROR_NO_STEP: return "NO_STEP";
    case KFAC_ERROR_NO_COLUMNS: return "NO_COLUMNS";
    case KFAC_ERROR_NO_SOLVE: return "NO_SOLVE";
    case KFAC_ERROR_NON_FINITE: return "NON_FINITE";
    case KFAC_ERROR_NOT_POSITIVE_DEFINITE: return "NOT_POSITIVE_DEFINITE";
    case KFAC_ERROR_EIGEN_FAILED: return "EIGEN_FAILED";
    case KFAC_ERROR_OUT_OF_MEMORY: return "OUT_OF_MEMORY";
    case KFAC_ERROR_UNSUPPORTED: return "UNSUPPORTED";
    case KFAC_ERROR_IO: return "IO";
    case KFAC_ERROR_BUFFER_TOO_SMALL: return "BUFFER_TOO_SMALL";
    case KFAC_ERROR_CORRUPT_STATE: return "CORRUPT_STATE";
    case KFAC_ERROR_STATE_VERSION: return "STATE_VERSION";
    case KFAC_ERROR_STATE_MISMATCH: return "STATE_MISMATCH";
    case KFAC_ERROR_CALLBACK: return "CALLBACK";
    case KFAC_ERROR_INTERNAL: return "INTERNAL";
    default: return "(unknown status)";
    }
}

int nonempty(const char *s) { return s != NULL && s[0] != '\0'; }

void expect_null_handle(int got, int want, const char *what) {
    check(got == want && nonempty(kfac_status_string(got)) && kfac_optimizer_last_error(NULL) != NULL,
          "NULL handle: %s -> %s (got %s %d)", what, status_name(want), status_name(got), got);
}

/* ------------------------------------------------------------------------------------------ */
/* Random numbers and dtype-generic buffers                                                    */
/* ------------------------------------------------------------------------------------------ */

uint64_t rng_next(rng_t *r) { /* splitmix64 */
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_sym(rng_t *r) { return (double)(int64_t)(rng_next(r) >> 43) / 1048576.0 - 1.0; }

size_t dtype_size(int dtype) { return dtype == KFAC_FLOAT32 ? sizeof(float) : sizeof(double); }

int other_dtype(int dtype) { return dtype == KFAC_FLOAT32 ? KFAC_FLOAT64 : KFAC_FLOAT32; }

const char *dtype_tag(int dtype) { return dtype == KFAC_FLOAT32 ? "f32" : "f64"; }

buf_t buf_new(int dtype, size_t n) {
    buf_t b = {dtype, n, calloc(n ? n : 1, dtype_size(dtype))};
    if (!b.p) {
        printf("FAIL out of memory in the test\n");
        exit(1);
    }
    return b;
}

void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
}

void buf_set(buf_t *b, size_t i, double v) {
    if (b->dtype == KFAC_FLOAT32) ((float *)b->p)[i] = (float)v;
    else ((double *)b->p)[i] = v;
}

void buf_random(buf_t *b, rng_t *r) {
    for (size_t i = 0; i < b->n; i++) buf_set(b, i, rng_sym(r));
}

buf_t buf_clone(const buf_t *b) {
    buf_t c = buf_new(b->dtype, b->n);
    memcpy(c.p, b->p, b->n * dtype_size(b->dtype));
    return c;
}

int buf_same(const buf_t *a, const buf_t *b) {
    return a->dtype == b->dtype && a->n == b->n && memcmp(a->p, b->p, a->n * dtype_size(a->dtype)) == 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Value readers over the 0.2 out-parameter getters                                            */
/* ------------------------------------------------------------------------------------------ */

int32_t layer_count(const kfac_optimizer *h) {
    int32_t n = -1000;
    const int st = kfac_layer_count(h, &n);
    return st == KFAC_OK ? n : st;
}

int64_t step_count(const kfac_optimizer *h) {
    int64_t k = -1000;
    const int st = kfac_optimizer_get_step_count(h, &k);
    return st == KFAC_OK ? k : st;
}

int32_t wants_statistics(const kfac_optimizer *h) {
    int32_t w = -1000;
    const int st = kfac_optimizer_wants_statistics(h, &w);
    return st == KFAC_OK ? w : st;
}

int32_t dtype_of(const kfac_optimizer *h) {
    int32_t d = -1000;
    const int st = kfac_optimizer_get_dtype(h, &d);
    return st == KFAC_OK ? d : st;
}

double kl_scale(const kfac_optimizer *h) {
    double v = NAN;
    return kfac_optimizer_get_kl_scale(h, &v) == KFAC_OK ? v : NAN;
}

double reduction_ratio(const kfac_optimizer *h) {
    double v = NAN;
    return kfac_adaptive_get_reduction_ratio(h, &v) == KFAC_OK ? v : NAN;
}

int add_dense_grouped(kfac_optimizer *h, int64_t in, int64_t out, int32_t has_bias,
                      int64_t input_group, int64_t output_group, int32_t *id) {
    kfac_dense_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.in_features = in;
    d.out_features = out;
    d.has_bias = has_bias;
    d.input_group_size = input_group;
    d.output_group_size = output_group;
    return kfac_layer_add_dense(h, &d, id);
}

int add_dense(kfac_optimizer *h, int64_t in, int64_t out, int32_t has_bias, int32_t *id) {
    return add_dense_grouped(h, in, out, has_bias, 0, 0, id);
}

int record_inputs(kfac_optimizer *h, int32_t layer, const buf_t *x, int64_t rows) {
    return x->dtype == KFAC_FLOAT32 ? kfac_layer_record_inputs_f32(h, layer, (const float *)x->p, rows)
                                    : kfac_layer_record_inputs_f64(h, layer, (const double *)x->p, rows);
}

int record_grads(kfac_optimizer *h, int32_t layer, const buf_t *g, int64_t rows) {
    return g->dtype == KFAC_FLOAT32
               ? kfac_layer_record_output_grads_f32(h, layer, (const float *)g->p, rows)
               : kfac_layer_record_output_grads_f64(h, layer, (const double *)g->p, rows);
}

int get_factors(const kfac_optimizer *h, int32_t layer, buf_t *a, buf_t *g) {
    int dtype = a ? a->dtype : g ? g->dtype : KFAC_FLOAT32;
    if (dtype == KFAC_FLOAT32)
        return kfac_layer_get_factors_f32(h, layer, 0, a ? (float *)a->p : NULL, g ? (float *)g->p : NULL);
    return kfac_layer_get_factors_f64(h, layer, 0, a ? (double *)a->p : NULL, g ? (double *)g->p : NULL);
}

int get_group_factors(const kfac_optimizer *h, int32_t layer, int32_t group, buf_t *a,
                      buf_t *g) {
    int dtype = a ? a->dtype : g ? g->dtype : KFAC_FLOAT32;
    if (dtype == KFAC_FLOAT32)
        return kfac_layer_get_factors_f32(h, layer, group, a ? (float *)a->p : NULL,
                                          g ? (float *)g->p : NULL);
    return kfac_layer_get_factors_f64(h, layer, group, a ? (double *)a->p : NULL,
                                      g ? (double *)g->p : NULL);
}

int precondition(kfac_optimizer *h, int32_t layer, buf_t *w, buf_t *b) {
    if (w->dtype == KFAC_FLOAT32)
        return kfac_layer_precondition_f32(h, layer, (float *)w->p, b ? (float *)b->p : NULL);
    return kfac_layer_precondition_f64(h, layer, (double *)w->p, b ? (double *)b->p : NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* Models: layer lists, gradients                                                              */
/* ------------------------------------------------------------------------------------------ */

const model_t TWIN_MODEL = {2, {{5, 4, 1, NULL}, {4, 3, 0, NULL}}};

int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t padding,
                 int64_t dilation) {
    stride = stride ? stride : 1;
    dilation = dilation ? dilation : 1;
    return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

int64_t conv_groups(const kfac_conv2d_desc *d) { return d->groups ? d->groups : 1; }

int64_t spec_x_values(const layer_spec_t *s) {
    if (!s->conv) return s->in;
    return s->conv->in_channels * s->conv->input_h * s->conv->input_w;
}

int64_t spec_g_values(const layer_spec_t *s) {
    if (!s->conv) return s->out;
    const kfac_conv2d_desc *d = s->conv;
    return d->out_channels *
           conv_out(d->input_h, d->kernel_h, d->stride_h, d->padding_h, d->dilation_h) *
           conv_out(d->input_w, d->kernel_w, d->stride_w, d->padding_w, d->dilation_w);
}

int64_t spec_w_values(const layer_spec_t *s) {
    if (!s->conv) return s->out * s->in;
    const kfac_conv2d_desc *d = s->conv;
    return d->out_channels * (d->in_channels / conv_groups(d)) * d->kernel_h * d->kernel_w;
}

kfac_optimizer *make_handle(int dtype, const model_t *m) {
    kfac_optimizer *h = NULL;
    REQUIRE_OK(h, kfac_optimizer_create(dtype, &h));
    for (int l = 0; l < m->n; l++) {
        int32_t id = -1;
        if (m->l[l].conv)
            REQUIRE_OK(h, kfac_layer_add_conv2d(h, m->l[l].conv, &id));
        else
            REQUIRE_OK(h, add_dense(h, m->l[l].in, m->l[l].out, m->l[l].bias, &id));
        if (id != l) {
            printf("FAIL kfac_layer_add_dense returned layer id %d, expected %d\n", (int)id, l);
            exit(1);
        }
    }
    return h;
}

grads_t grads_new(int dtype, const model_t *m, rng_t *r) {
    grads_t g;
    memset(&g, 0, sizeof g);
    g.n = m->n;
    for (int l = 0; l < m->n; l++) {
        g.w[l] = buf_new(dtype, (size_t)spec_w_values(&m->l[l]));
        buf_random(&g.w[l], r);
        g.b[l].dtype = dtype;
        if (m->l[l].bias) {
            g.b[l] = buf_new(dtype, (size_t)m->l[l].out);
            buf_random(&g.b[l], r);
        }
    }
    return g;
}

grads_t grads_clone(const grads_t *src) {
    grads_t g = *src;
    for (int l = 0; l < src->n; l++) {
        g.w[l] = buf_clone(&src->w[l]);
        if (src->b[l].p) g.b[l] = buf_clone(&src->b[l]);
    }
    return g;
}

int grads_same(const grads_t *a, const grads_t *b) {
    for (int l = 0; l < a->n; l++) {
        if (!buf_same(&a->w[l], &b->w[l])) return 0;
        if ((a->b[l].p == NULL) != (b->b[l].p == NULL)) return 0;
        if (a->b[l].p && !buf_same(&a->b[l], &b->b[l])) return 0;
    }
    return 1;
}

void grads_free(grads_t *g) {
    for (int l = 0; l < g->n; l++) {
        buf_free(&g->w[l]);
        if (g->b[l].p) buf_free(&g->b[l]);
    }
}

int step_with(kfac_optimizer *h, grads_t *g, int with_bias_array, int32_t n_layers) {
    if (g->w[0].dtype == KFAC_FLOAT32) {
        float *w[MAX_LAYERS], *b[MAX_LAYERS];
        for (int l = 0; l < g->n; l++) {
            w[l] = (float *)g->w[l].p;
            b[l] = (float *)g->b[l].p;
        }
        return kfac_optimizer_step_f32(h, w, with_bias_array ? b : NULL, n_layers);
    }
    double *w[MAX_LAYERS], *b[MAX_LAYERS];
    for (int l = 0; l < g->n; l++) {
        w[l] = (double *)g->w[l].p;
        b[l] = (double *)g->b[l].p;
    }
    return kfac_optimizer_step_f64(h, w, with_bias_array ? b : NULL, n_layers);
}

int step(kfac_optimizer *h, grads_t *g) { return step_with(h, g, 1, g->n); }

/* ------------------------------------------------------------------------------------------ */
/* State images                                                                                */
/* ------------------------------------------------------------------------------------------ */

unsigned char *save_image(const kfac_optimizer *h, size_t *size) {
    *size = 0;
    if (kfac_state_get_size(h, size) != KFAC_OK || *size == 0) {
        check(0, "kfac_state_get_size failed: %s", kfac_optimizer_last_error(h));
        return NULL;
    }
    unsigned char *img = malloc(*size);
    size_t written = 0;
    int st = kfac_state_save(h, img, *size, &written);
    if (st != KFAC_OK || written != *size) {
        check(0, "kfac_state_save failed (%s, written %zu of %zu): %s", status_name(st), written,
              *size, kfac_optimizer_last_error(h));
        free(img);
        return NULL;
    }
    return img;
}

int same_state(const kfac_optimizer *a, const kfac_optimizer *b) {
    size_t na, nb;
    unsigned char *ia = save_image(a, &na), *ib = save_image(b, &nb);
    int same = ia && ib && na == nb && memcmp(ia, ib, na) == 0;
    free(ia);
    free(ib);
    return same;
}

/* ------------------------------------------------------------------------------------------ */
/* Twin groups                                                                                 */
/* ------------------------------------------------------------------------------------------ */

twins_t twins_new_model(int dtype, uint64_t seed, const model_t *model) {
    twins_t t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.n = 2;
    t.model = *model;
    t.rng.state = seed;
    for (int i = 0; i < t.n; i++) t.h[i] = make_handle(dtype, &t.model);
    return t;
}

twins_t twins_new(int dtype, uint64_t seed) { return twins_new_model(dtype, seed, &TWIN_MODEL); }

void twins_free(twins_t *t) {
    for (int i = 0; i < t->n; i++) kfac_optimizer_free(t->h[i]);
}

int twins_record(twins_t *t) {
    const int64_t rows = 3 + t->rounds % 4;
    const model_t *m = &t->model;
    buf_t x[MAX_LAYERS], g[MAX_LAYERS];
    for (int l = 0; l < m->n; l++) {
        x[l] = buf_new(t->dtype, (size_t)(rows * spec_x_values(&m->l[l])));
        g[l] = buf_new(t->dtype, (size_t)(rows * spec_g_values(&m->l[l])));
        buf_random(&x[l], &t->rng);
        buf_random(&g[l], &t->rng);
    }
    int ok = 1;
    const int wants0 = wants_statistics(t->h[0]);
    for (int i = 0; i < t->n; i++) {
        const int wants = wants_statistics(t->h[i]);
        if (wants != wants0 || wants < 0) ok = 0;
        if (wants != 1) continue;
        for (int l = 0; l < m->n; l++) {
            if (record_inputs(t->h[i], l, &x[l], rows) != KFAC_OK) ok = 0;
        }
        for (int l = m->n - 1; l >= 0; l--) {
            if (record_grads(t->h[i], l, &g[l], rows) != KFAC_OK) ok = 0;
        }
    }
    for (int l = 0; l < m->n; l++) {
        buf_free(&x[l]);
        buf_free(&g[l]);
    }
    return ok;
}

int twins_round(twins_t *t, char *why, size_t why_size) {
    t->rounds++;
    if (!twins_record(t)) {
        snprintf(why, why_size, "record failed: %s / %s", kfac_optimizer_last_error(t->h[0]),
                 kfac_optimizer_last_error(t->h[1]));
        return 0;
    }
    grads_t g0 = grads_new(t->dtype, &t->model, &t->rng);
    grads_t out[MAX_TWINS];
    int ok = 1;
    why[0] = '\0';
    for (int i = 0; i < t->n; i++) {
        out[i] = grads_clone(&g0);
        int st = step(t->h[i], &out[i]);
        if (st != KFAC_OK) {
            snprintf(why, why_size, "step on twin %d failed: %s: %s", i, status_name(st),
                     kfac_optimizer_last_error(t->h[i]));
            ok = 0;
        } else if (kfac_optimizer_last_error(t->h[i])[0] != '\0') {
            snprintf(why, why_size, "kfac_optimizer_last_error not empty after a successful step");
            ok = 0;
        }
    }
    for (int i = 1; ok && i < t->n; i++) {
        const double k0 = kl_scale(t->h[0]), ki = kl_scale(t->h[i]);
        if (!grads_same(&out[0], &out[i]) || memcmp(&k0, &ki, sizeof k0) != 0 ||
            step_count(t->h[0]) != step_count(t->h[i])) {
            snprintf(why, why_size, "twin %d's directions differ from twin 0's", i);
            ok = 0;
        }
    }
    if (ok && grads_same(&out[0], &g0)) {
        snprintf(why, why_size, "step did not change the gradients");
        ok = 0;
    }
    for (int i = 0; i < t->n; i++) grads_free(&out[i]);
    grads_free(&g0);
    return ok;
}

char g_last_error[512];

int bad_call(const kfac_optimizer *h, int status) {
    const char *le = kfac_optimizer_last_error(h);
    snprintf(g_last_error, sizeof g_last_error, "%s", le ? le : "(NULL)");
    return status;
}

void after_bad(twins_t *t, int got, int want, const char *what, int round, int extra_ok) {
    char last_error[512], why[512] = "";
    snprintf(last_error, sizeof last_error, "%s", g_last_error);
    g_last_error[0] = '\0';
    const int status_ok = got == want;
    const int messages_ok = nonempty(last_error) && nonempty(kfac_status_string(got));
    const int state_ok = same_state(t->h[0], t->h[1]);
    const int round_ok = !round || twins_round(t, why, sizeof why);
    check(status_ok && messages_ok && state_ok && round_ok && extra_ok,
          "[%s] %s -> %s%s%s%s%s%s%s%s (last_error: \"%s\")", dtype_tag(t->dtype), what,
          status_name(want), status_ok ? "" : ", but got ", status_ok ? "" : status_name(got),
          messages_ok ? "" : "; EMPTY MESSAGE", state_ok ? "" : "; STATE CHANGED",
          round_ok ? "" : "; NEXT ROUND: ", round_ok ? "" : why,
          extra_ok ? "" : "; CALLER BUFFER MODIFIED", last_error);
}

int survives_in_child(kfac_optimizer *h, guarded_fn fn, const void *arg, const char *what) {
    fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0) return 1; /* cannot isolate: make the call in the parent */
    if (pid == 0) {
        fn(h, arg);
        _exit(0);
    }
    int status = 0;
    for (int waited = 0;; waited++) {
        const pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid) break;
        if (done < 0 || waited >= 3000) { /* 30 s */
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            check(0, "%s: the call did not return within 30 s (in a forked child)", what);
            return 0;
        }
        const struct timespec ten_ms = {0, 10 * 1000 * 1000};
        nanosleep(&ten_ms, NULL);
    }
    if (WIFSIGNALED(status)) {
        check(0, "%s: the library CRASHED (signal %d, %s) instead of returning an error status "
                 "(run in a forked child; the header promises that no input aborts)",
              what, WTERMSIG(status), strsignal(WTERMSIG(status)));
        return 0;
    }
    return 1;
}

int call_add_dense(kfac_optimizer *h, const void *arg) {
    const dense_args_t *a = arg;
    int32_t id;
    if (a->grouped)
        return add_dense_grouped(h, a->in, a->out, a->bias, a->input_group, a->output_group, &id);
    return add_dense(h, a->in, a->out, a->bias, &id);
}

int call_add_conv2d(kfac_optimizer *h, const void *arg) {
    int32_t id;
    return kfac_layer_add_conv2d(h, (const kfac_conv2d_desc *)arg, &id);
}

kfac_conv2d_desc base_conv(void) {
    kfac_conv2d_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.in_channels = 4;
    d.out_channels = 6;
    d.kernel_h = d.kernel_w = 3;
    d.stride_h = d.stride_w = 1;
    d.dilation_h = d.dilation_w = 1;
    d.groups = 2;
    d.input_h = d.input_w = 5;
    d.has_bias = 1;
    return d;
}

kfac_optimizer *handle_with_batch(int dtype, rng_t *r, int record_inputs_side,
                                  int record_grads_side) {
    kfac_optimizer *h = make_handle(dtype, &TWIN_MODEL);
    for (int l = 0; l < 2; l++) {
        buf_t x = buf_new(dtype, (size_t)(4 * TWIN_MODEL.l[l].in));
        buf_t g = buf_new(dtype, (size_t)(4 * TWIN_MODEL.l[l].out));
        buf_random(&x, r);
        buf_random(&g, r);
        if (record_inputs_side) REQUIRE_OK(h, record_inputs(h, l, &x, 4));
        if (record_grads_side) REQUIRE_OK(h, record_grads(h, l, &g, 4));
        buf_free(&x);
        buf_free(&g);
    }
    return h;
}

void expect_fails_unchanged(kfac_optimizer *h, int got, int want, const unsigned char *img,
                            size_t size, const char *what) {
    size_t now_size;
    char le[512];
    snprintf(le, sizeof le, "%s", kfac_optimizer_last_error(h));
    unsigned char *now = save_image(h, &now_size);
    check(got == want && now && now_size == size && memcmp(now, img, size) == 0 && nonempty(le),
          "%s -> %s (got %s), handle unchanged (last_error: \"%s\")", what, status_name(want),
          status_name(got), le);
    free(now);
}

int solve_raw(kfac_optimizer *h, int dtype, const void *z, const void *jd, const void *jp,
              int64_t rows, int64_t dim, int dist, double *alpha, double *mu, double *m) {
    if (dtype == KFAC_FLOAT32)
        return kfac_adaptive_solve_step_size_f32(h, (const float *)z, (const float *)jd, (const float *)jp,
                                        rows, dim, dist, alpha, mu, m);
    return kfac_adaptive_solve_step_size_f64(h, (const double *)z, (const double *)jd, (const double *)jp,
                                    rows, dim, dist, alpha, mu, m);
}

adaptive_data_t adaptive_data(int dtype, rng_t *r) {
    adaptive_data_t d = {buf_new(dtype, AD_ROWS * AD_DIM), buf_new(dtype, AD_ROWS * AD_DIM),
                         buf_new(dtype, AD_ROWS * AD_DIM)};
    buf_random(&d.z, r);
    buf_random(&d.jd, r);
    buf_random(&d.jp, r);
    for (size_t i = 0; i < d.z.n; i++) buf_set(&d.z, i, 3.0 * rng_sym(r)); /* logits */
    return d;
}

void adaptive_data_free(adaptive_data_t *d) {
    buf_free(&d->z);
    buf_free(&d->jd);
    buf_free(&d->jp);
}

int twins_adaptive_agree(twins_t *t, char *why, size_t why_size) {
    adaptive_data_t d = adaptive_data(t->dtype, &t->rng);
    double res[MAX_TWINS][4];
    int ok = 1;
    why[0] = '\0';
    for (int i = 0; i < t->n; i++) {
        int st = solve_raw(t->h[i], t->dtype, d.z.p, d.jd.p, d.jp.p, AD_ROWS, AD_DIM,
                           KFAC_DIST_CATEGORICAL, &res[i][0], &res[i][1], &res[i][2]);
        if (st != KFAC_OK) {
            snprintf(why, why_size, "solve on twin %d: %s: %s", i, status_name(st),
                     kfac_optimizer_last_error(t->h[i]));
            ok = 0;
            break;
        }
        st = kfac_adaptive_report_loss_change(t->h[i], 2.0, 2.0 + 0.5 * res[i][2], &res[i][3]);
        if (st != KFAC_OK) {
            snprintf(why, why_size, "report on twin %d: %s: %s", i, status_name(st),
                     kfac_optimizer_last_error(t->h[i]));
            ok = 0;
            break;
        }
    }
    if (ok && memcmp(res[0], res[1], sizeof res[0]) != 0) {
        snprintf(why, why_size, "twins disagree: α %.17g / %.17g, μ %.17g / %.17g, ρ %.17g / %.17g",
                 res[0][0], res[1][0], res[0][1], res[1][1], res[0][3], res[1][3]);
        ok = 0;
    }
    adaptive_data_free(&d);
    return ok;
}

void after_bad_adaptive(twins_t *t, int got, int want, const char *what, int extra_ok) {
    after_bad(t, got, want, what, 0, extra_ok);
    char why[512] = "";
    check(twins_adaptive_agree(t, why, sizeof why),
          "[%s]   ... then a valid solve and report give bitwise identical α, μ, M(δ), ρ on both "
          "twins%s%s", dtype_tag(t->dtype), why[0] ? ": " : "", why);
}
