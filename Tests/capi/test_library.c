/*
 * test_library.c — versions, status strings, exported symbols, handle creation, every
 * entry point with a NULL handle, the parameter table and the out-parameter getters.
 */
#include "harness.h"

#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <unistd.h>

void test_globals(void) {
    section("versions and status strings");
    check(kfac_version_number() == KFAC_VERSION_NUMBER, "kfac_version_number() %u == %d",
          kfac_version_number(), KFAC_VERSION_NUMBER);
    char expected[32];
    snprintf(expected, sizeof expected, "%d.%d.%d", KFAC_VERSION_MAJOR, KFAC_VERSION_MINOR,
             KFAC_VERSION_PATCH);
    const char *vs = kfac_version_string();
    check(vs != NULL && strcmp(vs, expected) == 0, "kfac_version_string() \"%s\" == \"%s\"",
          vs ? vs : "(NULL)", expected);

    const int known[] = {0,   -1,  -2,  -3,  -4,  -5,  -10, -11, -12, -13, -20, -21, -22,
                         -23, -30, -31, -32, -40, -50, -60, -61, -62, -63, -64, -99};
    int all_known = 1;
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        const char *s = kfac_status_string(known[i]);
        if (!nonempty(s)) all_known = 0;
        /* Distinct codes have distinct descriptions. */
        for (size_t j = 0; j < i; j++)
            if (s && strcmp(s, kfac_status_string(known[j])) == 0) all_known = 0;
    }
    check(all_known, "kfac_status_string of the %zu defined codes: non-empty and distinct",
          sizeof known / sizeof known[0]);
    const int unknown[] = {1, 7, -6, -9, -19, -100, -1000, INT32_MIN, INT32_MAX};
    int all_unknown = 1;
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++)
        if (kfac_status_string(unknown[i]) == NULL) all_unknown = 0;
    check(all_unknown, "kfac_status_string of unknown codes (1, 7, -6, ..., INT_MIN, INT_MAX) is "
                       "non-NULL (e.g. \"%s\")", kfac_status_string(-1000));

    kfac_optimizer_free(NULL);
    check(1, "kfac_optimizer_free(NULL) returns");
    check(kfac_optimizer_last_error(NULL) != NULL, "kfac_optimizer_last_error(NULL) non-NULL (\"%s\")",
          kfac_optimizer_last_error(NULL) ? kfac_optimizer_last_error(NULL) : "");

    section("kfac_optimizer_create");
    kfac_optimizer *h = (kfac_optimizer *)&g_checks; /* a non-NULL sentinel that must be reset */
    expect_null_handle(kfac_optimizer_create(KFAC_FLOAT32, NULL), KFAC_ERROR_NULL_POINTER,
                       "kfac_optimizer_create(FLOAT32, NULL)");
    const int bad_dtypes[] = {0, 3, -1, 1000};
    for (size_t i = 0; i < 4; i++) {
        h = (kfac_optimizer *)&g_checks;
        int st = kfac_optimizer_create(bad_dtypes[i], &h);
        check(st == KFAC_ERROR_INVALID_ARGUMENT && h == NULL,
              "kfac_optimizer_create(dtype %d) -> INVALID_ARGUMENT and *out = NULL (got %s, %s)",
              bad_dtypes[i], status_name(st), h == NULL ? "NULL" : "NOT NULL");
    }
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        h = NULL;
        int st = kfac_optimizer_create(dtype, &h);
        double nu = -777;
        const int st_nu = h ? kfac_optimizer_get_kl_scale(h, &nu) : KFAC_OK;
        check(st == KFAC_OK && h != NULL && dtype_of(h) == dtype &&
                  layer_count(h) == 0 && step_count(h) == 0 &&
                  kfac_optimizer_last_error(h) != NULL && st_nu == KFAC_ERROR_NO_STEP && nu == -777,
              "create %s: get_dtype, 0 layers, step 0, get_kl_scale NO_STEP (*scale untouched) "
              "before the first step", dtype_tag(dtype));
        kfac_optimizer_free(h);
    }

    section("every entry point with a NULL handle");
    float f[16] = {0};
    double d[16] = {0};
    float *fp[2] = {f, f};
    double *dp[2] = {d, d};
    double dv = 0;
    int64_t iv = 0;
    int32_t id = 0;
    size_t sz = 0;
    unsigned char img[64] = {0};
    kfac_layer_info info = {sizeof info, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    {
        int32_t i32 = -777;
        expect_null_handle(kfac_optimizer_get_dtype(NULL, &i32), KFAC_ERROR_NULL_POINTER,
                           "kfac_optimizer_get_dtype");
        expect_null_handle(kfac_layer_count(NULL, &i32), KFAC_ERROR_NULL_POINTER, "kfac_layer_count");
        expect_null_handle(kfac_optimizer_wants_statistics(NULL, &i32), KFAC_ERROR_NULL_POINTER,
                           "kfac_optimizer_wants_statistics");
        check(i32 == -777, "NULL handle: get_dtype, layer_count, wants_statistics leave *out");
    }
    expect_null_handle(kfac_param_set_double(NULL, KFAC_PARAM_DAMPING, 1e-2),
                       KFAC_ERROR_NULL_POINTER, "kfac_param_set_double");
    expect_null_handle(kfac_param_get_double(NULL, KFAC_PARAM_DAMPING, &dv),
                       KFAC_ERROR_NULL_POINTER, "kfac_param_get_double");
    expect_null_handle(kfac_param_set_int(NULL, KFAC_PARAM_NUM_THREADS, 1),
                       KFAC_ERROR_NULL_POINTER, "kfac_param_set_int");
    expect_null_handle(kfac_param_get_int(NULL, KFAC_PARAM_NUM_THREADS, &iv),
                       KFAC_ERROR_NULL_POINTER, "kfac_param_get_int");
    expect_null_handle(add_dense(NULL, 2, 2, 1, &id), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_add_dense");
    int32_t null_id = -77;
    expect_null_handle(add_dense_grouped(NULL, 2, 2, 1, 1, 1, &null_id),
                       KFAC_ERROR_NULL_POINTER, "kfac_layer_add_dense");
    kfac_conv2d_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.struct_size = sizeof desc;
    desc.in_channels = desc.out_channels = 2;
    desc.kernel_h = desc.kernel_w = 1;
    desc.input_h = desc.input_w = 3;
    expect_null_handle(kfac_layer_add_conv2d(NULL, &desc, &null_id), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_add_conv2d");
    check(null_id == -77, "NULL handle: kfac_layer_add_dense/kfac_layer_add_conv2d leave *layer_id");
    expect_null_handle(kfac_layer_get_info(NULL, 0, &info), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_info");
    expect_null_handle(kfac_layer_record_inputs_f32(NULL, 0, f, 1), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_record_inputs_f32");
    expect_null_handle(kfac_layer_record_inputs_f64(NULL, 0, d, 1), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_record_inputs_f64");
    expect_null_handle(kfac_layer_record_output_grads_f32(NULL, 0, f, 1), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_record_output_grads_f32");
    expect_null_handle(kfac_layer_record_output_grads_f64(NULL, 0, d, 1), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_record_output_grads_f64");
    expect_null_handle(kfac_optimizer_update_factors(NULL), KFAC_ERROR_NULL_POINTER, "kfac_optimizer_update_factors");
    expect_null_handle(kfac_optimizer_update_inverses(NULL), KFAC_ERROR_NULL_POINTER,
                       "kfac_optimizer_update_inverses");
    expect_null_handle(kfac_layer_get_factors_f32(NULL, 0, 0, f, f), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_factors_f32");
    expect_null_handle(kfac_layer_get_factors_f64(NULL, 0, 0, d, d), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_factors_f64");
    expect_null_handle(kfac_layer_get_factors_f32(NULL, 0, 0, f, f), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_factors_f32");
    expect_null_handle(kfac_layer_get_factors_f64(NULL, 0, 0, d, d), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_factors_f64");
    expect_null_handle(kfac_optimizer_step_f32(NULL, fp, fp, 2), KFAC_ERROR_NULL_POINTER, "kfac_optimizer_step_f32");
    expect_null_handle(kfac_optimizer_step_f64(NULL, dp, dp, 2), KFAC_ERROR_NULL_POINTER, "kfac_optimizer_step_f64");
    expect_null_handle(kfac_layer_precondition_f32(NULL, 0, f, f), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_precondition_f32");
    expect_null_handle(kfac_layer_precondition_f64(NULL, 0, d, d), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_precondition_f64");
    expect_null_handle(kfac_optimizer_get_step_count(NULL, &iv), KFAC_ERROR_NULL_POINTER,
                       "kfac_optimizer_get_step_count");
    expect_null_handle(kfac_optimizer_get_kl_scale(NULL, &dv), KFAC_ERROR_NULL_POINTER,
                       "kfac_optimizer_get_kl_scale");
    {
        double alpha = -777, mu = -777, m = -777, rho = -777;
        expect_null_handle(kfac_adaptive_solve_step_size_f32(NULL, f, f, f, 2, 2, KFAC_DIST_CATEGORICAL,
                                                    &alpha, &mu, &m),
                           KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size_f32");
        expect_null_handle(kfac_adaptive_solve_step_size_f64(NULL, d, d, NULL, 2, 2, KFAC_DIST_GAUSSIAN,
                                                    &alpha, &mu, &m),
                           KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size_f64");
        expect_null_handle(kfac_adaptive_report_loss_change(NULL, 1.0, 0.5, &rho), KFAC_ERROR_NULL_POINTER,
                           "kfac_adaptive_report_loss_change");
        check(alpha == -777 && mu == -777 && m == -777 && rho == -777,
              "NULL handle: the adaptive calls leave *alpha, *mu, *predicted_change, *rho");
        expect_null_handle(kfac_adaptive_get_reduction_ratio(NULL, &rho), KFAC_ERROR_NULL_POINTER,
                           "kfac_adaptive_get_reduction_ratio");
        check(rho == -777, "NULL handle: kfac_adaptive_get_reduction_ratio leaves *rho");

    }
    expect_null_handle(kfac_state_get_size(NULL, &sz), KFAC_ERROR_NULL_POINTER, "kfac_state_get_size");
    expect_null_handle(kfac_state_save(NULL, img, sizeof img, &sz), KFAC_ERROR_NULL_POINTER,
                       "kfac_state_save");
    expect_null_handle(kfac_state_load(NULL, img, sizeof img), KFAC_ERROR_NULL_POINTER,
                       "kfac_state_load");
    expect_null_handle(kfac_state_save_file(NULL, "/tmp/kfac-never-written"),
                       KFAC_ERROR_NULL_POINTER, "kfac_state_save_file");
    expect_null_handle(kfac_state_load_file(NULL, "/tmp/kfac-never-written"),
                       KFAC_ERROR_NULL_POINTER, "kfac_state_load_file");
    check(access("/tmp/kfac-never-written", F_OK) != 0,
          "NULL handle: kfac_state_save_file created no file");
}

void test_exports(void) {}
void test_param_table(void) {}
void test_getters(void) {}

void test_params_and_info(void) {
    section("parameter defaults and bounds");
    kfac_optimizer *h = make_handle(KFAC_FLOAT32, &TWIN_MODEL);
    const struct {
        int param;
        double value;
    } ddef[] = {{KFAC_PARAM_LEARNING_RATE, 0.1},
                {KFAC_PARAM_DAMPING, 1e-3},
                {KFAC_PARAM_FACTOR_DECAY, 0.95},
                {KFAC_PARAM_KL_CLIP, 1e-3},
                {KFAC_PARAM_OUTPUT_GRAD_SCALE, 1.0},
                {KFAC_PARAM_LM_DECAY, 0.95},
                {KFAC_PARAM_FACTOR_DAMPING, 0.0},
                {KFAC_PARAM_FACTOR_DAMPING_DECAY, 0.95}};
    for (size_t i = 0; i < sizeof ddef / sizeof ddef[0]; i++) {
        double v = -1;
        int st = kfac_param_get_double(h, ddef[i].param, &v);
        check(st == KFAC_OK && v == ddef[i].value, "default of double param %d: %g (want %g)",
              ddef[i].param, v, ddef[i].value);
    }
    const struct {
        int param;
        int64_t value;
    } idef[] = {{KFAC_PARAM_FACTOR_UPDATE_PERIOD, 1}, {KFAC_PARAM_INVERSE_UPDATE_PERIOD, 10},
                {KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN}, {KFAC_PARAM_PI_DAMPING, 1},
                {KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_SUM}, {KFAC_PARAM_NUM_THREADS, 0},
                {KFAC_PARAM_LM_INTERVAL, 0}, {KFAC_PARAM_FACTOR_DAMPING_PERIOD, 0}};
    for (size_t i = 0; i < sizeof idef / sizeof idef[0]; i++) {
        int64_t v = -1;
        int st = kfac_param_get_int(h, idef[i].param, &v);
        check(st == KFAC_OK && v == idef[i].value, "default of int param %d: %lld (want %lld)",
              idef[i].param, (long long)v, (long long)idef[i].value);
    }
    /* Boundary values that are inside the bounds. */
    const struct {
        int param;
        double value;
    } dok[] = {{KFAC_PARAM_FACTOR_DECAY, 0.0}, {KFAC_PARAM_FACTOR_DECAY, 0.999999},
               {KFAC_PARAM_KL_CLIP, 0.0}, {KFAC_PARAM_DAMPING, 1e-300},
               {KFAC_PARAM_LEARNING_RATE, 1e300}, {KFAC_PARAM_OUTPUT_GRAD_SCALE, 65536.0},
               {KFAC_PARAM_LM_DECAY, 1e-300}, {KFAC_PARAM_LM_DECAY, 0.9999999999},
               {KFAC_PARAM_LM_DECAY, 0.5}, {KFAC_PARAM_LEARNING_RATE, 0.0},
               {KFAC_PARAM_FACTOR_DAMPING, 1e-300}, {KFAC_PARAM_FACTOR_DAMPING, 1e300},
               {KFAC_PARAM_FACTOR_DAMPING, 0.0}, {KFAC_PARAM_FACTOR_DAMPING_DECAY, 1e-300},
               {KFAC_PARAM_FACTOR_DAMPING_DECAY, 0.9999999999},
               {KFAC_PARAM_FACTOR_DAMPING_DECAY, 0.5}};
    for (size_t i = 0; i < sizeof dok / sizeof dok[0]; i++) {
        double v = -1;
        int st = bad_call(h, kfac_param_set_double(h, dok[i].param, dok[i].value));
        kfac_param_get_double(h, dok[i].param, &v);
        check(st == KFAC_OK && v == dok[i].value,
              "set double param %d = %g accepted and read back (got %s%s%s)", dok[i].param,
              dok[i].value, status_name(st), st ? ": " : "", st ? g_last_error : "");
    }
    const struct {
        int param;
        int64_t value;
    } iok[] = {{KFAC_PARAM_FACTOR_UPDATE_PERIOD, 0}, {KFAC_PARAM_INVERSE_UPDATE_PERIOD, 0},
               {KFAC_PARAM_INVERSE_UPDATE_PERIOD, INT32_MAX}, {KFAC_PARAM_NUM_THREADS, 256},
               {KFAC_PARAM_NUM_THREADS, 1}, {KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_CHOLESKY},
               {KFAC_PARAM_PI_DAMPING, 0}, {KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN},
               {KFAC_PARAM_LM_INTERVAL, 0}, {KFAC_PARAM_LM_INTERVAL, 1},
               {KFAC_PARAM_LM_INTERVAL, INT32_MAX}, {KFAC_PARAM_FACTOR_DAMPING_PERIOD, 1},
               {KFAC_PARAM_FACTOR_DAMPING_PERIOD, INT32_MAX},
               {KFAC_PARAM_FACTOR_DAMPING_PERIOD, 0}};
    for (size_t i = 0; i < sizeof iok / sizeof iok[0]; i++) {
        int64_t v = -1;
        int st = bad_call(h, kfac_param_set_int(h, iok[i].param, iok[i].value));
        kfac_param_get_int(h, iok[i].param, &v);
        check(st == KFAC_OK && v == iok[i].value,
              "set int param %d = %lld accepted and read back (got %s%s%s)", iok[i].param,
              (long long)iok[i].value, status_name(st), st ? ": " : "", st ? g_last_error : "");
    }
    /* A failed set changes nothing. */
    double before = 0, after = 0;
    kfac_param_get_double(h, KFAC_PARAM_DAMPING, &before);
    kfac_param_set_double(h, KFAC_PARAM_DAMPING, NAN);
    kfac_param_get_double(h, KFAC_PARAM_DAMPING, &after);
    check(before == after, "a failed kfac_param_set_double(damping, NaN) kept damping %g", after);

    kfac_optimizer_free(h);
}

/* Parameters on twin handles: ids, types, ranges. */
/* Parameters: ids, types, ranges. */
void errors_params(twins_t *tp) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype;
    char what[256];
    double dv = -123.0;
    int64_t iv = -123;
    section(dt == KFAC_FLOAT32 ? "float32 handle: parameters" : "float64 handle: parameters");

    /* 12 and 205: the first undefined ids after the core and the adaptive band; 100, 300, 400,
     * 500, 600: reserved bands without parameters yet; 1000: the experimental band. 9 and 108 were
     * the 0.1 table's first undefined ids (9 is now KFAC_PARAM_PI_DAMPING: not here). */
    const int unknown[] = {0, 12, 99, 100, 108, 199, 205, 299, 300, 400, 500, 600, -1, 1000,
                           INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        snprintf(what, sizeof what, "kfac_param_set_double(param %d)", unknown[i]);
        BAD_NO_ROUND(kfac_param_set_double(B, unknown[i], 0.5), KFAC_ERROR_UNKNOWN_PARAMETER, what);
        snprintf(what, sizeof what, "kfac_param_set_int(param %d)", unknown[i]);
        BAD_NO_ROUND(kfac_param_set_int(B, unknown[i], 1), KFAC_ERROR_UNKNOWN_PARAMETER, what);
        snprintf(what, sizeof what, "kfac_param_get_double(param %d)", unknown[i]);
        BAD_NO_ROUND(kfac_param_get_double(B, unknown[i], &dv), KFAC_ERROR_UNKNOWN_PARAMETER, what);
        snprintf(what, sizeof what, "kfac_param_get_int(param %d)", unknown[i]);
        BAD_NO_ROUND(kfac_param_get_int(B, unknown[i], &iv), KFAC_ERROR_UNKNOWN_PARAMETER, what);
    }
    check(dv == -123.0 && iv == -123, "[%s] failed getters left *value untouched", dtype_tag(dt));

    const int dparams[] = {KFAC_PARAM_LEARNING_RATE, KFAC_PARAM_DAMPING, KFAC_PARAM_FACTOR_DECAY,
                           KFAC_PARAM_KL_CLIP, KFAC_PARAM_OUTPUT_GRAD_SCALE, KFAC_PARAM_LM_DECAY,
                           KFAC_PARAM_FACTOR_DAMPING, KFAC_PARAM_FACTOR_DAMPING_DECAY};
    const int iparams[] = {KFAC_PARAM_FACTOR_UPDATE_PERIOD, KFAC_PARAM_INVERSE_UPDATE_PERIOD,
                           KFAC_PARAM_INVERSE_STRATEGY, KFAC_PARAM_PI_DAMPING,
                           KFAC_PARAM_LOSS_REDUCTION, KFAC_PARAM_NUM_THREADS,
                           KFAC_PARAM_LM_INTERVAL, KFAC_PARAM_FACTOR_DAMPING_PERIOD};
    for (size_t i = 0; i < sizeof dparams / sizeof dparams[0]; i++) {
        snprintf(what, sizeof what, "kfac_param_set_int(double param %d)", dparams[i]);
        BAD_NO_ROUND(kfac_param_set_int(B, dparams[i], 1), KFAC_ERROR_PARAMETER_TYPE, what);
        snprintf(what, sizeof what, "kfac_param_get_int(double param %d)", dparams[i]);
        BAD_NO_ROUND(kfac_param_get_int(B, dparams[i], &iv), KFAC_ERROR_PARAMETER_TYPE, what);
        snprintf(what, sizeof what, "kfac_param_get_double(param %d, value = NULL)", dparams[i]);
        BAD_NO_ROUND(kfac_param_get_double(B, dparams[i], NULL), KFAC_ERROR_NULL_POINTER, what);
    }
    for (size_t i = 0; i < sizeof iparams / sizeof iparams[0]; i++) {
        snprintf(what, sizeof what, "kfac_param_set_double(int param %d)", iparams[i]);
        BAD_NO_ROUND(kfac_param_set_double(B, iparams[i], 1.0), KFAC_ERROR_PARAMETER_TYPE, what);
        snprintf(what, sizeof what, "kfac_param_get_double(int param %d)", iparams[i]);
        BAD_NO_ROUND(kfac_param_get_double(B, iparams[i], &dv), KFAC_ERROR_PARAMETER_TYPE, what);
        snprintf(what, sizeof what, "kfac_param_get_int(param %d, value = NULL)", iparams[i]);
        BAD_NO_ROUND(kfac_param_get_int(B, iparams[i], NULL), KFAC_ERROR_NULL_POINTER, what);
    }

    const struct {
        int param;
        double value;
        const char *what;
    } dranges[] = {
        /* Learning rate 0 is accepted (see test_params_and_info). */
        {KFAC_PARAM_LEARNING_RATE, -0.1, "learning rate -0.1"},
        {KFAC_PARAM_LEARNING_RATE, -DBL_MIN, "learning rate -DBL_MIN"},
        {KFAC_PARAM_LEARNING_RATE, NAN, "learning rate NaN"},
        {KFAC_PARAM_LEARNING_RATE, INFINITY, "learning rate +Inf"},
        {KFAC_PARAM_DAMPING, 0.0, "damping 0"},
        {KFAC_PARAM_DAMPING, -1e-3, "damping -1e-3"},
        {KFAC_PARAM_DAMPING, NAN, "damping NaN"},
        {KFAC_PARAM_DAMPING, INFINITY, "damping +Inf"},
        {KFAC_PARAM_DAMPING, -0.0, "damping -0"},
        {KFAC_PARAM_FACTOR_DECAY, -0.01, "factor decay -0.01"},
        {KFAC_PARAM_FACTOR_DECAY, 1.0, "factor decay 1"},
        {KFAC_PARAM_FACTOR_DECAY, 1.5, "factor decay 1.5"},
        {KFAC_PARAM_FACTOR_DECAY, NAN, "factor decay NaN"},
        {KFAC_PARAM_KL_CLIP, -1e-3, "KL clip -1e-3"},
        {KFAC_PARAM_KL_CLIP, NAN, "KL clip NaN"},
        {KFAC_PARAM_KL_CLIP, INFINITY, "KL clip +Inf"},
        {KFAC_PARAM_OUTPUT_GRAD_SCALE, 0.0, "output grad scale 0"},
        {KFAC_PARAM_OUTPUT_GRAD_SCALE, -2.0, "output grad scale -2"},
        {KFAC_PARAM_OUTPUT_GRAD_SCALE, INFINITY, "output grad scale +Inf"},
        {KFAC_PARAM_OUTPUT_GRAD_SCALE, -INFINITY, "output grad scale -Inf"},
        {KFAC_PARAM_OUTPUT_GRAD_SCALE, NAN, "output grad scale NaN"},
        {KFAC_PARAM_LM_DECAY, 0.0, "LM decay 0"},
        {KFAC_PARAM_LM_DECAY, -0.0, "LM decay -0"},
        {KFAC_PARAM_LM_DECAY, 1.0, "LM decay 1"},
        {KFAC_PARAM_LM_DECAY, -0.5, "LM decay -0.5"},
        {KFAC_PARAM_LM_DECAY, 1.5, "LM decay 1.5"},
        {KFAC_PARAM_LM_DECAY, NAN, "LM decay NaN"},
        {KFAC_PARAM_LM_DECAY, INFINITY, "LM decay +Inf"},
        {KFAC_PARAM_LM_DECAY, -INFINITY, "LM decay -Inf"},
        {KFAC_PARAM_FACTOR_DAMPING, -1e-3, "factor damping -1e-3"},
        {KFAC_PARAM_FACTOR_DAMPING, NAN, "factor damping NaN"},
        {KFAC_PARAM_FACTOR_DAMPING, INFINITY, "factor damping +Inf"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, 0.0, "factor damping decay 0"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, -0.0, "factor damping decay -0"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, 1.0, "factor damping decay 1"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, -0.5, "factor damping decay -0.5"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, 1.5, "factor damping decay 1.5"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, NAN, "factor damping decay NaN"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, INFINITY, "factor damping decay +Inf"},
        {KFAC_PARAM_FACTOR_DAMPING_DECAY, -INFINITY, "factor damping decay -Inf"},
    };
    for (size_t i = 0; i < sizeof dranges / sizeof dranges[0]; i++) {
        snprintf(what, sizeof what, "kfac_param_set_double(%s)", dranges[i].what);
        BAD_NO_ROUND(kfac_param_set_double(B, dranges[i].param, dranges[i].value),
                     KFAC_ERROR_PARAMETER_RANGE, what);
    }
    const struct {
        int param;
        int64_t value;
        const char *what;
    } iranges[] = {
        {KFAC_PARAM_FACTOR_UPDATE_PERIOD, -1, "factor update period -1"},
        {KFAC_PARAM_FACTOR_UPDATE_PERIOD, INT64_MIN, "factor update period INT64_MIN"},
        {KFAC_PARAM_INVERSE_UPDATE_PERIOD, -1, "inverse update period -1"},
        {KFAC_PARAM_INVERSE_STRATEGY, 2, "inverse strategy 2"},
        {KFAC_PARAM_INVERSE_STRATEGY, -1, "inverse strategy -1"},
        {KFAC_PARAM_PI_DAMPING, 2, "pi damping 2"},
        {KFAC_PARAM_PI_DAMPING, -1, "pi damping -1"},
        {KFAC_PARAM_LOSS_REDUCTION, 2, "loss reduction 2"},
        {KFAC_PARAM_LOSS_REDUCTION, -1, "loss reduction -1"},
        {KFAC_PARAM_NUM_THREADS, -1, "num threads -1"},
        {KFAC_PARAM_NUM_THREADS, 257, "num threads 257"},
        {KFAC_PARAM_NUM_THREADS, INT64_MAX, "num threads INT64_MAX"},
        {KFAC_PARAM_INVERSE_UPDATE_PERIOD, (int64_t)INT32_MAX + 1, "inverse update period 2^31"},
        {KFAC_PARAM_FACTOR_UPDATE_PERIOD, INT64_MAX, "factor update period INT64_MAX"},
        {KFAC_PARAM_LM_INTERVAL, -1, "LM interval -1"},
        {KFAC_PARAM_LM_INTERVAL, INT64_MIN, "LM interval INT64_MIN"},
        {KFAC_PARAM_LM_INTERVAL, (int64_t)INT32_MAX + 1, "LM interval 2^31"},
        {KFAC_PARAM_LM_INTERVAL, INT64_MAX, "LM interval INT64_MAX"},
        {KFAC_PARAM_FACTOR_DAMPING_PERIOD, -1, "factor damping period -1"},
        {KFAC_PARAM_FACTOR_DAMPING_PERIOD, INT64_MIN, "factor damping period INT64_MIN"},
        {KFAC_PARAM_FACTOR_DAMPING_PERIOD, (int64_t)INT32_MAX + 1, "factor damping period 2^31"},
        {KFAC_PARAM_FACTOR_DAMPING_PERIOD, INT64_MAX, "factor damping period INT64_MAX"},
    };
    for (size_t i = 0; i < sizeof iranges / sizeof iranges[0]; i++) {
        snprintf(what, sizeof what, "kfac_param_set_int(%s)", iranges[i].what);
        BAD_NO_ROUND(kfac_param_set_int(B, iranges[i].param, iranges[i].value),
                     KFAC_ERROR_PARAMETER_RANGE, what);
    }
    /* One round at the end shows the twins still behave identically. */
    char why[512] = "";
    check(twins_round(&t, why, sizeof why), "[%s] a round after all parameter errors: identical%s%s",
          dtype_tag(dt), why[0] ? ": " : "", why);
    *tp = t;
}
