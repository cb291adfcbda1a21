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

/* ------------------------------------------------------------------------------------------ */
/* Version macros and exported symbols                                                         */
/* ------------------------------------------------------------------------------------------ */

#define KFAC_TEST_STR_(x) #x
#define KFAC_TEST_STR(x) KFAC_TEST_STR_(x)

/* The 0.1 names that 0.2 renamed or removed: none may be exported any more. */
static const char *const OLD_NAMES[] = {
    "kfac_last_error", "kfac_dtype_of", "kfac_set_param_double", "kfac_get_param_double",
    "kfac_set_param_int", "kfac_get_param_int", "kfac_add_dense", "kfac_add_dense_grouped",
    "kfac_add_conv2d", "kfac_wants_statistics", "kfac_record_inputs_f32",
    "kfac_record_inputs_f64", "kfac_record_output_grads_f32", "kfac_record_output_grads_f64",
    "kfac_update_factors", "kfac_update_inverses", "kfac_get_factors_f32", "kfac_get_factors_f64",
    "kfac_get_group_factors_f32", "kfac_get_group_factors_f64", "kfac_step_f32", "kfac_step_f64",
    "kfac_precondition_f32", "kfac_precondition_f64", "kfac_step_count", "kfac_last_kl_scale",
    "kfac_solve_step_size_f32", "kfac_solve_step_size_f64", "kfac_get_update_f32",
    "kfac_get_update_f64", "kfac_report_loss_change", "kfac_last_reduction_ratio",
    "kfac_candidate_count", "kfac_candidate_directions_f32", "kfac_candidate_directions_f64",
    "kfac_solve_step_size_candidates_f32", "kfac_solve_step_size_candidates_f64",
    "kfac_sampled_output_grads_f32", "kfac_sampled_output_grads_f64", "kfac_state_size",
    "kfac_save_state", "kfac_load_state", "kfac_save_state_file", "kfac_load_state_file",
};

/* Every function of the 0.2 header outside the experimental section (the experimental ones are
 * looked up in test_candidates.c and by check_exports.sh). */
static const char *const NEW_NAMES[] = {
    "kfac_version_number", "kfac_version_string", "kfac_status_string", "kfac_optimizer_create",
    "kfac_optimizer_free", "kfac_optimizer_last_error", "kfac_optimizer_get_dtype",
    "kfac_param_get_info", "kfac_param_list", "kfac_param_set_double", "kfac_param_get_double",
    "kfac_param_set_int", "kfac_param_get_int", "kfac_layer_add_dense", "kfac_layer_add_conv2d",
    "kfac_layer_count", "kfac_layer_get_info", "kfac_optimizer_wants_statistics",
    "kfac_layer_record_inputs_f32", "kfac_layer_record_inputs_f64",
    "kfac_layer_record_output_grads_f32", "kfac_layer_record_output_grads_f64",
    "kfac_optimizer_update_factors", "kfac_optimizer_update_inverses",
    "kfac_layer_get_factors_f32", "kfac_layer_get_factors_f64", "kfac_optimizer_step_f32",
    "kfac_optimizer_step_f64", "kfac_layer_precondition_f32", "kfac_layer_precondition_f64",
    "kfac_optimizer_get_step_count", "kfac_optimizer_get_kl_scale",
    "kfac_adaptive_solve_step_size_f32", "kfac_adaptive_solve_step_size_f64",
    "kfac_adaptive_get_update_f32", "kfac_adaptive_get_update_f64",
    "kfac_adaptive_report_loss_change", "kfac_adaptive_get_reduction_ratio",
    "kfac_sample_targets_f32", "kfac_sample_targets_f64", "kfac_sample_output_grads_f32",
    "kfac_sample_output_grads_f64", "kfac_state_get_size", "kfac_state_save", "kfac_state_load",
    "kfac_state_save_file", "kfac_state_load_file",
};

void test_exports(void) {
    section("version macros and exported symbols");
    check(KFAC_VERSION_NUMBER == KFAC_VERSION_MAJOR * 10000 + KFAC_VERSION_MINOR * 100 +
                                     KFAC_VERSION_PATCH,
          "KFAC_VERSION_NUMBER %d == MAJOR*10000 + MINOR*100 + PATCH", KFAC_VERSION_NUMBER);
    char parts[32];
    snprintf(parts, sizeof parts, "%d.%d.%d", KFAC_VERSION_MAJOR, KFAC_VERSION_MINOR,
             KFAC_VERSION_PATCH);
    check(strcmp(KFAC_VERSION_STRING, parts) == 0, "KFAC_VERSION_STRING \"%s\" == \"%s\" (the parts)",
          KFAC_VERSION_STRING, parts);
    const char *vs = kfac_version_string();
    check(vs != NULL && strcmp(vs, KFAC_VERSION_STRING) == 0 && vs == kfac_version_string(),
          "kfac_version_string() \"%s\" == KFAC_VERSION_STRING, the same static string each call",
          vs ? vs : "(NULL)");
    check(kfac_version_number() == (unsigned)KFAC_VERSION_NUMBER &&
              kfac_version_number() / 10000 == (unsigned)KFAC_VERSION_MAJOR &&
              kfac_version_number() / 100 % 100 == (unsigned)KFAC_VERSION_MINOR &&
              kfac_version_number() % 100 == (unsigned)KFAC_VERSION_PATCH,
          "kfac_version_number() %u splits into MAJOR %d, MINOR %d, PATCH %d",
          kfac_version_number(), KFAC_VERSION_MAJOR, KFAC_VERSION_MINOR, KFAC_VERSION_PATCH);

    /* The loaded library, by the SONAME the header's policy gives a 0.x release. */
    const char *soname = KFAC_VERSION_MAJOR == 0
                             ? "libkfac.so.0." KFAC_TEST_STR(KFAC_VERSION_MINOR)
                             : "libkfac.so." KFAC_TEST_STR(KFAC_VERSION_MAJOR);
    void *lib = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
    check(lib != NULL, "the loaded library is found by its SONAME %s (dlopen RTLD_NOLOAD): %s",
          soname, lib ? "yes" : dlerror());
    void *scope = lib ? lib : RTLD_DEFAULT;
    size_t n_old = sizeof OLD_NAMES / sizeof OLD_NAMES[0];
    for (size_t i = 0; i < n_old; i++) {
        dlerror();
        void *sym = dlsym(scope, OLD_NAMES[i]);
        check(sym == NULL, "0.1 name %s is not exported", OLD_NAMES[i]);
    }
    int all_found = 1;
    char missing[256] = "";
    for (size_t i = 0; i < sizeof NEW_NAMES / sizeof NEW_NAMES[0]; i++) {
        if (dlsym(scope, NEW_NAMES[i]) == NULL) {
            all_found = 0;
            snprintf(missing, sizeof missing, "%s", NEW_NAMES[i]);
        }
    }
    check(all_found, "all %zu non-experimental 0.2 functions are found by dlsym%s%s",
          sizeof NEW_NAMES / sizeof NEW_NAMES[0], all_found ? "" : "; missing e.g. ", missing);
    if (lib) dlclose(lib);
}

/* ------------------------------------------------------------------------------------------ */
/* The parameter table: kfac_param_get_info and kfac_param_list                                */
/* ------------------------------------------------------------------------------------------ */

/* The header's table, written out: kfac.h's comments on enum kfac_param. */
typedef struct {
    int32_t id;
    const char *name;
    int32_t type, family;
    double lower, upper;
    int32_t lower_inclusive, upper_inclusive;
    double default_value;
} param_row_t;

#define INT31_MAX 2147483647.0
static const param_row_t PARAM_TABLE[] = {
    {KFAC_PARAM_LEARNING_RATE, "learning_rate", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_CORE, 0.0,
     HUGE_VAL, 1, 0, 0.1},
    {KFAC_PARAM_DAMPING, "damping", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_CORE, 0.0, HUGE_VAL, 0, 0,
     1e-3},
    {KFAC_PARAM_FACTOR_DECAY, "factor_decay", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_CORE, 0.0, 1.0, 1,
     0, 0.95},
    {KFAC_PARAM_KL_CLIP, "kl_clip", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_CORE, 0.0, HUGE_VAL, 1, 0,
     1e-3},
    {KFAC_PARAM_OUTPUT_GRAD_SCALE, "output_grad_scale", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_CORE,
     0.0, HUGE_VAL, 0, 0, 1.0},
    {KFAC_PARAM_FACTOR_UPDATE_PERIOD, "factor_update_period", KFAC_PARAM_TYPE_INT,
     KFAC_FAMILY_CORE, 0.0, INT31_MAX, 1, 1, 1.0},
    {KFAC_PARAM_INVERSE_UPDATE_PERIOD, "inverse_update_period", KFAC_PARAM_TYPE_INT,
     KFAC_FAMILY_CORE, 0.0, INT31_MAX, 1, 1, 10.0},
    {KFAC_PARAM_INVERSE_STRATEGY, "inverse_strategy", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_CORE, 0.0,
     2.0, 1, 1, KFAC_INVERSE_EIGEN},
    {KFAC_PARAM_PI_DAMPING, "pi_damping", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_CORE, 0.0, 1.0, 1, 1,
     1.0},
    {KFAC_PARAM_LOSS_REDUCTION, "loss_reduction", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_CORE, 0.0, 1.0,
     1, 1, KFAC_REDUCTION_SUM},
    {KFAC_PARAM_NUM_THREADS, "num_threads", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_CORE, 0.0, 256.0, 1,
     1, 0.0},
    {KFAC_PARAM_INVERSE_SPREAD, "inverse_spread", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_CORE, 0.0, 1.0, 1,
     1, 0.0},
    {KFAC_PARAM_ASYNC_INVERSION, "async_inversion", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_CORE, 0.0, 2.0,
     1, 1, KFAC_ASYNC_INVERSION_OFF},
    {KFAC_PARAM_LM_INTERVAL, "lm_interval", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_ADAPTIVE, 0.0,
     INT31_MAX, 1, 1, 0.0},
    {KFAC_PARAM_LM_DECAY, "lm_decay", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_ADAPTIVE, 0.0, 1.0, 0, 0,
     0.95},
    {KFAC_PARAM_FACTOR_DAMPING, "factor_damping", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_ADAPTIVE, 0.0,
     HUGE_VAL, 1, 0, 0.0},
    {KFAC_PARAM_FACTOR_DAMPING_PERIOD, "factor_damping_period", KFAC_PARAM_TYPE_INT,
     KFAC_FAMILY_ADAPTIVE, 0.0, INT31_MAX, 1, 1, 0.0},
    {KFAC_PARAM_FACTOR_DAMPING_DECAY, "factor_damping_decay", KFAC_PARAM_TYPE_DOUBLE,
     KFAC_FAMILY_ADAPTIVE, 0.0, 1.0, 0, 0, 0.95},
    {KFAC_PARAM_DAMPING_MIN, "damping_min", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_ADAPTIVE, 0.0,
     HUGE_VAL, 1, 0, 1e-4},
    {KFAC_PARAM_FACTOR_DAMPING_RATIO, "factor_damping_ratio", KFAC_PARAM_TYPE_DOUBLE,
     KFAC_FAMILY_ADAPTIVE, 1.0, HUGE_VAL, 1, 0, 10.0},
    {KFAC_PARAM_EKFAC_DECAY, "ekfac_decay", KFAC_PARAM_TYPE_DOUBLE, KFAC_FAMILY_EKFAC, 0.0, 1.0, 1,
     0, 0.95},
    {KFAC_PARAM_EKFAC_MODE, "ekfac_mode", KFAC_PARAM_TYPE_INT, KFAC_FAMILY_EKFAC, 0.0, 1.0, 1, 1,
     0.0},
    {KFAC_PARAM_DISTRIBUTED_REDUCE, "distributed_reduce", KFAC_PARAM_TYPE_INT,
     KFAC_FAMILY_DISTRIBUTED, 0.0, 1.0, 1, 1, 0.0},
};
enum { N_PARAMS = sizeof PARAM_TABLE / sizeof PARAM_TABLE[0] };

/* 1 if every byte of p[0 .. n) is `byte`. */
static int all_bytes(const void *p, size_t n, unsigned char byte) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != byte) return 0;
    return 1;
}

/* Sets `value` (a bound, or just outside one) through the setter of the parameter's type on h;
 * returns the status. */
static int set_value(kfac_optimizer *h, const param_row_t *row, double value) {
    if (row->type == KFAC_PARAM_TYPE_INT) return kfac_param_set_int(h, row->id, (int64_t)value);
    return kfac_param_set_double(h, row->id, value);
}

void test_param_table(void) {
    section("the parameter table: kfac_param_get_info, kfac_param_list");
    kfac_optimizer *h = NULL;
    REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));

    for (int i = 0; i < N_PARAMS; i++) {
        const param_row_t *row = &PARAM_TABLE[i];
        kfac_param_info info;
        memset(&info, 0xEE, sizeof info);
        info.struct_size = sizeof info;
        const int st = kfac_param_get_info(row->id, &info);
        const int name_ok = info.name && strcmp(info.name, row->name) == 0;
        check(st == KFAC_OK && info.struct_size == sizeof info && name_ok,
              "kfac_param_get_info(%d): OK, struct_size %zu, name \"%s\" (want \"%s\")", row->id,
              info.struct_size, name_ok || !info.name ? row->name : info.name, row->name);
        check(info.type == row->type && info.family == row->family,
              "  %s: type %d (want %d), family %d (want %d)", row->name, info.type, row->type,
              info.family, row->family);
        check(info.lower == row->lower && info.upper == row->upper &&
                  info.lower_inclusive == row->lower_inclusive &&
                  info.upper_inclusive == row->upper_inclusive,
              "  %s: bounds %c%g, %g%c (want %c%g, %g%c)", row->name,
              info.lower_inclusive ? '[' : '(', info.lower, info.upper,
              info.upper_inclusive ? ']' : ')', row->lower_inclusive ? '[' : '(', row->lower,
              row->upper, row->upper_inclusive ? ']' : ')');
        check(info.default_value == row->default_value && info.reserved == 0 &&
                  info.effect >= KFAC_EFFECT_IMMEDIATE && info.effect <= KFAC_EFFECT_NEXT_RECORD,
              "  %s: default %g (want %g), effect %d in the enum, reserved 0", row->name,
              info.default_value, row->default_value, info.effect);

        /* The table drives the handle: its default is a new handle's value, and its bounds are
         * what the setter accepts (a finite bound is accepted exactly when inclusive; the
         * value just outside it is refused). */
        double dv = NAN;
        int64_t iv = -1;
        const int gst = row->type == KFAC_PARAM_TYPE_INT ? kfac_param_get_int(h, row->id, &iv)
                                                         : kfac_param_get_double(h, row->id, &dv);
        const double got = row->type == KFAC_PARAM_TYPE_INT ? (double)iv : dv;
        check(gst == KFAC_OK && got == info.default_value,
              "  %s: a new handle reads the table's default (%g)", row->name, got);
        for (int side = 0; side < 2; side++) {
            const double bound = side == 0 ? info.lower : info.upper;
            const int inclusive = side == 0 ? info.lower_inclusive : info.upper_inclusive;
            if (!isfinite(bound)) continue;
            const double outside =
                row->type == KFAC_PARAM_TYPE_INT ? bound + (side == 0 ? -1.0 : 1.0)
                                                 : nextafter(bound, side == 0 ? -HUGE_VAL : HUGE_VAL);
            const int st_at = set_value(h, row, bound);
            const int st_out = set_value(h, row, outside);
            check(st_at == (inclusive ? KFAC_OK : KFAC_ERROR_PARAMETER_RANGE) &&
                      st_out == KFAC_ERROR_PARAMETER_RANGE,
                  "  %s: set %s bound %.17g -> %s (got %s), %.17g outside -> PARAMETER_RANGE "
                  "(got %s)", row->name, side == 0 ? "lower" : "upper", bound,
                  inclusive ? "OK" : "PARAMETER_RANGE", status_name(st_at), outside,
                  status_name(st_out));
        }
        set_value(h, row, row->default_value);
    }

    /* kfac_param_list: every id of the table, ascending. */
    int32_t ids[N_PARAMS + 8], count = -1;
    for (int i = 0; i < N_PARAMS + 8; i++) ids[i] = -7;
    int st = kfac_param_list(ids, N_PARAMS + 8, &count);
    int same = st == KFAC_OK && count == N_PARAMS;
    for (int i = 0; same && i < N_PARAMS; i++) same = ids[i] == PARAM_TABLE[i].id;
    for (int i = N_PARAMS; i < N_PARAMS + 8; i++) same = same && ids[i] == -7;
    check(same, "kfac_param_list(capacity %d): count %d (want %d), the table's ids ascending, "
                "the rest of the buffer untouched", N_PARAMS + 8, (int)count, N_PARAMS);
    for (int i = 0; i < N_PARAMS + 8; i++) ids[i] = -7;
    count = -1;
    st = kfac_param_list(ids, 5, &count);
    same = st == KFAC_OK && count == N_PARAMS;
    for (int i = 0; same && i < 5; i++) same = ids[i] == PARAM_TABLE[i].id;
    for (int i = 5; i < N_PARAMS + 8; i++) same = same && ids[i] == -7;
    check(same, "kfac_param_list(capacity 5 < count): OK, count %d, the first 5 ids, nothing past "
                "them written (got %s)", (int)count, status_name(st));
    for (int i = 0; i < N_PARAMS + 8; i++) ids[i] = -7;
    count = -1;
    st = kfac_param_list(ids, 0, &count);
    check(st == KFAC_OK && count == N_PARAMS && ids[0] == -7,
          "kfac_param_list(capacity 0): count %d, nothing written (got %s)", (int)count,
          status_name(st));
    count = -1;
    st = kfac_param_list(NULL, 0, &count);
    check(st == KFAC_OK && count == N_PARAMS, "kfac_param_list(NULL, 0): the count %d (got %s)",
          (int)count, status_name(st));
    count = -1;
    st = kfac_param_list(NULL, N_PARAMS, &count);
    check(st == KFAC_OK && count == N_PARAMS,
          "kfac_param_list(NULL, capacity %d): params NULL asks the count only (got %s, %d)",
          N_PARAMS, status_name(st), (int)count);
    const int32_t bad_caps[] = {-1, INT32_MIN};
    for (size_t i = 0; i < 2; i++) {
        count = -1;
        ids[0] = -7;
        st = kfac_param_list(ids, bad_caps[i], &count);
        check(st == KFAC_ERROR_INVALID_SIZE && count == -1 && ids[0] == -7,
              "kfac_param_list(capacity %d) -> INVALID_SIZE, *count and params untouched (got %s)",
              (int)bad_caps[i], status_name(st));
    }
    st = kfac_param_list(ids, N_PARAMS, NULL);
    check(st == KFAC_ERROR_NULL_POINTER && ids[0] == -7,
          "kfac_param_list(count = NULL) -> NULL_POINTER, params untouched (got %s)",
          status_name(st));
    st = kfac_param_list(NULL, 0, NULL);
    check(st == KFAC_ERROR_NULL_POINTER, "kfac_param_list(NULL, 0, NULL) -> NULL_POINTER (got %s)",
          status_name(st));

    /* Unknown ids, NULL. */
    const int32_t unknown[] = {0, 14, 99, 100, 199, 207, 299, 300, 402, 501, 600, 1000, -1,
                               INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        kfac_param_info info;
        memset(&info, 0xEE, sizeof info);
        info.struct_size = sizeof info;
        st = kfac_param_get_info(unknown[i], &info);
        check(st == KFAC_ERROR_UNKNOWN_PARAMETER && info.struct_size == sizeof info &&
                  all_bytes((const unsigned char *)&info + sizeof(size_t),
                            sizeof info - sizeof(size_t), 0xEE),
              "kfac_param_get_info(%d) -> UNKNOWN_PARAMETER, *info untouched (got %s)",
              (int)unknown[i], status_name(st));
    }
    st = kfac_param_get_info(KFAC_PARAM_DAMPING, NULL);
    check(st == KFAC_ERROR_NULL_POINTER, "kfac_param_get_info(damping, NULL) -> NULL_POINTER (got %s)",
          status_name(st));
    st = kfac_param_get_info(12, NULL);
    check(st == KFAC_ERROR_NULL_POINTER || st == KFAC_ERROR_UNKNOWN_PARAMETER,
          "kfac_param_get_info(unknown 12, NULL) fails (got %s)", status_name(st));

    /* The growable struct: an older, smaller struct is filled by whole fields only and
     * struct_size reports the bytes filled; below the first two fields it is INVALID_SIZE. */
    const struct {
        size_t size, filled;
        const char *what;
    } sizes[] = {
        {offsetof(kfac_param_info, type), offsetof(kfac_param_info, type),
         "struct_size, name (the minimum)"},
        {offsetof(kfac_param_info, type) + 2, offsetof(kfac_param_info, type),
         "2 bytes into `type` (a partial field is not written)"},
        {offsetof(kfac_param_info, lower), offsetof(kfac_param_info, lower), "up to family"},
        {offsetof(kfac_param_info, lower) + 4, offsetof(kfac_param_info, lower),
         "up to family + 4 bytes"},
        {offsetof(kfac_param_info, lower_inclusive), offsetof(kfac_param_info, lower_inclusive),
         "up to the bounds"},
        {offsetof(kfac_param_info, effect), offsetof(kfac_param_info, effect),
         "up to default_value"},
        {sizeof(kfac_param_info) - 1, offsetof(kfac_param_info, reserved),
         "one byte short of the whole struct"},
    };
    kfac_param_info full;
    memset(&full, 0, sizeof full);
    full.struct_size = sizeof full;
    REQUIRE_OK(NULL, kfac_param_get_info(KFAC_PARAM_FACTOR_DECAY, &full));
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        struct {
            kfac_param_info info;
            unsigned char guard[16];
        } s;
        memset(&s, 0xEE, sizeof s);
        s.info.struct_size = sizes[i].size;
        st = kfac_param_get_info(KFAC_PARAM_FACTOR_DECAY, &s.info);
        const size_t filled = sizes[i].filled;
        const int prefix_ok = memcmp((const unsigned char *)&s.info + sizeof(size_t),
                                     (const unsigned char *)&full + sizeof(size_t),
                                     filled - sizeof(size_t)) == 0;
        const int tail_ok = all_bytes((const unsigned char *)&s + filled, sizeof s - filled, 0xEE);
        check(st == KFAC_OK && s.info.struct_size == filled && prefix_ok && tail_ok,
              "kfac_param_get_info(struct_size %zu: %s): OK, struct_size = %zu bytes filled (got "
              "%s, %zu), those fields as in the full struct, nothing past them written",
              sizes[i].size, sizes[i].what, filled, status_name(st), s.info.struct_size);
    }
    {
        struct {
            kfac_param_info info;
            unsigned char future[32];
        } big;
        memset(&big, 0xEE, sizeof big);
        big.info.struct_size = sizeof big;
        st = kfac_param_get_info(KFAC_PARAM_FACTOR_DECAY, &big.info);
        check(st == KFAC_OK && big.info.struct_size == sizeof(kfac_param_info) &&
                  memcmp((const unsigned char *)&big.info + sizeof(size_t),
                         (const unsigned char *)&full + sizeof(size_t),
                         sizeof full - sizeof(size_t)) == 0 &&
                  all_bytes(big.future, sizeof big.future, 0xEE),
              "kfac_param_get_info(a newer caller's larger struct_size %zu): struct_size = %zu, "
              "the known fields filled, the rest untouched (got %s, %zu)", sizeof big,
              sizeof(kfac_param_info), status_name(st), big.info.struct_size);
    }
    const size_t small[] = {0, 1, sizeof(size_t), offsetof(kfac_param_info, type) - 1};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++) {
        kfac_param_info info;
        memset(&info, 0xEE, sizeof info);
        info.struct_size = small[i];
        st = kfac_param_get_info(KFAC_PARAM_DAMPING, &info);
        check(st == KFAC_ERROR_INVALID_SIZE && info.struct_size == small[i] &&
                  all_bytes((const unsigned char *)&info + sizeof(size_t),
                            sizeof info - sizeof(size_t), 0xEE),
              "kfac_param_get_info(struct_size %zu < the first two fields) -> INVALID_SIZE, "
              "*info untouched (got %s)", small[i], status_name(st));
    }
    kfac_optimizer_free(h);
}

/* ------------------------------------------------------------------------------------------ */
/* The out-parameter getters                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* On a handle: NULL out-parameters, NO_STEP before the first step or report (out untouched, the
 * handle unchanged), then values after a step and a report. */
void test_getters(void) {
    section("out-parameter getters");
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        twins_t t = twins_new(dtype, dtype == KFAC_FLOAT32 ? 2101 : 2202);
        kfac_optimizer *B = t.h[1];
        char what[160];
        BAD_NO_ROUND(kfac_optimizer_get_dtype(B, NULL), KFAC_ERROR_NULL_POINTER,
                     "kfac_optimizer_get_dtype(dtype = NULL)");
        BAD_NO_ROUND(kfac_layer_count(B, NULL), KFAC_ERROR_NULL_POINTER,
                     "kfac_layer_count(count = NULL)");
        BAD_NO_ROUND(kfac_optimizer_wants_statistics(B, NULL), KFAC_ERROR_NULL_POINTER,
                     "kfac_optimizer_wants_statistics(wanted = NULL)");
        BAD_NO_ROUND(kfac_optimizer_get_step_count(B, NULL), KFAC_ERROR_NULL_POINTER,
                     "kfac_optimizer_get_step_count(count = NULL)");
        BAD_NO_ROUND(kfac_optimizer_get_kl_scale(B, NULL), KFAC_ERROR_NULL_POINTER,
                     "kfac_optimizer_get_kl_scale(scale = NULL) before any step");
        BAD_NO_ROUND(kfac_adaptive_get_reduction_ratio(B, NULL), KFAC_ERROR_NULL_POINTER,
                     "kfac_adaptive_get_reduction_ratio(rho = NULL) before any report");
        double nu = -777, rho = -777;
        int st = bad_call(B, kfac_optimizer_get_kl_scale(B, &nu));
        after_bad(&t, st, KFAC_ERROR_NO_STEP, "kfac_optimizer_get_kl_scale before the first step",
                  0, nu == -777);
        st = bad_call(B, kfac_adaptive_get_reduction_ratio(B, &rho));
        after_bad(&t, st, KFAC_ERROR_NO_STEP,
                  "kfac_adaptive_get_reduction_ratio before the first report", 0, rho == -777);

        int32_t d = -1, n = -1, w = -1;
        int64_t k = -1;
        check(kfac_optimizer_get_dtype(B, &d) == KFAC_OK && d == dtype &&
                  kfac_layer_count(B, &n) == KFAC_OK && n == 2 &&
                  kfac_optimizer_wants_statistics(B, &w) == KFAC_OK && w == 1 &&
                  kfac_optimizer_get_step_count(B, &k) == KFAC_OK && k == 0 &&
                  kfac_optimizer_last_error(B)[0] == '\0',
              "[%s] get_dtype %d, layer_count %d, wants_statistics %d, get_step_count %lld on a "
              "new handle; last_error empty after them", dtype_tag(dtype), (int)d, (int)n, (int)w,
              (long long)k);

        /* After a round: ν exists, ρ still does not. */
        char why[512] = "";
        check(twins_round(&t, why, sizeof why), "[%s] a round on the twins%s%s", dtype_tag(dtype),
              why[0] ? ": " : "", why);
        nu = -777;
        st = kfac_optimizer_get_kl_scale(B, &nu);
        check(st == KFAC_OK && nu > 0 && nu <= 1 && step_count(B) == 1,
              "[%s] kfac_optimizer_get_kl_scale after a step: %.6g in (0, 1], step count 1",
              dtype_tag(dtype), nu);
        rho = -777;
        st = bad_call(B, kfac_adaptive_get_reduction_ratio(B, &rho));
        after_bad(&t, st, KFAC_ERROR_NO_STEP,
                  "kfac_adaptive_get_reduction_ratio after a step, before any report", 0,
                  rho == -777);

        /* After a solve and a report: ρ is the value the report returned. */
        adaptive_data_t ad = adaptive_data(dtype, &t.rng);
        double alpha, mu, m, rho_report = NAN;
        st = solve_raw(B, dtype, ad.z.p, ad.jd.p, NULL, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL,
                       &alpha, &mu, &m);
        const int st2 = kfac_adaptive_report_loss_change(B, 2.0, 2.0 + 0.5 * m, &rho_report);
        rho = -777;
        const int st3 = kfac_adaptive_get_reduction_ratio(B, &rho);
        snprintf(what, sizeof what, "[%s] kfac_adaptive_get_reduction_ratio after a report: %.6g "
                 "== the report's ρ", dtype_tag(dtype), rho);
        check(st == KFAC_OK && st2 == KFAC_OK && st3 == KFAC_OK &&
                  memcmp(&rho, &rho_report, sizeof rho) == 0, "%s", what);
        adaptive_data_free(&ad);
        twins_free(&t);
    }
}

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
                {KFAC_PARAM_FACTOR_DAMPING_DECAY, 0.95},
                {KFAC_PARAM_DAMPING_MIN, 1e-4},
                {KFAC_PARAM_FACTOR_DAMPING_RATIO, 10.0}};
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
                {KFAC_PARAM_LM_INTERVAL, 0}, {KFAC_PARAM_FACTOR_DAMPING_PERIOD, 0},
                {KFAC_PARAM_INVERSE_SPREAD, 0}, {KFAC_PARAM_ASYNC_INVERSION, 0},
                {KFAC_PARAM_DISTRIBUTED_REDUCE, 0}};
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
               {KFAC_PARAM_FACTOR_DAMPING_DECAY, 0.5}, {KFAC_PARAM_DAMPING_MIN, 0.0},
               {KFAC_PARAM_DAMPING_MIN, 1e300}, {KFAC_PARAM_FACTOR_DAMPING_RATIO, 1.0},
               {KFAC_PARAM_FACTOR_DAMPING_RATIO, 1e300}};
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
               {KFAC_PARAM_FACTOR_DAMPING_PERIOD, 0}, {KFAC_PARAM_INVERSE_SPREAD, 1},
               {KFAC_PARAM_INVERSE_SPREAD, 0},
               {KFAC_PARAM_ASYNC_INVERSION, KFAC_ASYNC_INVERSION_DETERMINISTIC},
               {KFAC_PARAM_ASYNC_INVERSION, KFAC_ASYNC_INVERSION_NEWEST},
               {KFAC_PARAM_ASYNC_INVERSION, KFAC_ASYNC_INVERSION_OFF}};
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

    /* 14, 207, 402 and 501: the first undefined ids after the core, the adaptive, the EKFAC
     * and the distributed band; 100, 300, 600: reserved bands without parameters yet; 1000: the experimental band. 9
     * and 108 were the 0.1 table's first undefined ids (9 is now KFAC_PARAM_PI_DAMPING: not here). */
    const int unknown[] = {0, 14, 99, 100, 108, 199, 207, 299, 300, 402, 499, 501, 600, -1, 1000,
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
                           KFAC_PARAM_FACTOR_DAMPING, KFAC_PARAM_FACTOR_DAMPING_DECAY,
                           KFAC_PARAM_DAMPING_MIN, KFAC_PARAM_FACTOR_DAMPING_RATIO,
                           KFAC_PARAM_EKFAC_DECAY};
    const int iparams[] = {KFAC_PARAM_FACTOR_UPDATE_PERIOD, KFAC_PARAM_INVERSE_UPDATE_PERIOD,
                           KFAC_PARAM_INVERSE_STRATEGY, KFAC_PARAM_PI_DAMPING,
                           KFAC_PARAM_LOSS_REDUCTION, KFAC_PARAM_NUM_THREADS,
                           KFAC_PARAM_LM_INTERVAL, KFAC_PARAM_FACTOR_DAMPING_PERIOD,
                           KFAC_PARAM_INVERSE_SPREAD, KFAC_PARAM_EKFAC_MODE,
                           KFAC_PARAM_DISTRIBUTED_REDUCE, KFAC_PARAM_ASYNC_INVERSION};
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
        {KFAC_PARAM_INVERSE_STRATEGY, 3, "inverse strategy 3"},
        {KFAC_PARAM_EKFAC_MODE, 2, "EKFAC mode 2"},
        {KFAC_PARAM_EKFAC_MODE, -1, "EKFAC mode -1"},
        {KFAC_PARAM_INVERSE_STRATEGY, -1, "inverse strategy -1"},
        {KFAC_PARAM_PI_DAMPING, 2, "pi damping 2"},
        {KFAC_PARAM_PI_DAMPING, -1, "pi damping -1"},
        {KFAC_PARAM_ASYNC_INVERSION, 3, "async inversion 3"},
        {KFAC_PARAM_ASYNC_INVERSION, -1, "async inversion -1"},
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
