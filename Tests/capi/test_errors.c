/*
 * test_errors.c — the error paths of every entry point on twin handles (one float32
 * and one float64 group): registration before statistics, record calls, factors, step and
 * precondition; then the adaptive (test_adaptive.c), parameter (test_library.c) and state
 * (test_state.c) error paths on the same twins.
 */
#include "harness.h"

#include <math.h>

/* Bad calls possible before any statistics exist (the layers are not frozen yet). */
void errors_before_statistics(twins_t *tp) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype;
    char what[256];

    section(dt == KFAC_FLOAT32 ? "float32 handle: before any statistics"
                               : "float64 handle: before any statistics");
    /* kfac_layer_add_dense: each failure must leave the layer list and *layer_id alone. */
    struct {
        int64_t in, out;
        int bias, want;
        const char *what;
    } adds[] = {
        {0, 4, 1, KFAC_ERROR_INVALID_SIZE, "in_features = 0"},
        {4, 0, 1, KFAC_ERROR_INVALID_SIZE, "out_features = 0"},
        {-1, 4, 0, KFAC_ERROR_INVALID_SIZE, "in_features = -1"},
        {4, -7, 1, KFAC_ERROR_INVALID_SIZE, "out_features = -7"},
        {INT64_MIN, 4, 1, KFAC_ERROR_INVALID_SIZE, "in_features = INT64_MIN"},
        {(int64_t)1 << 40, 4, 1, KFAC_ERROR_SIZE_OVERFLOW, "in_features = 1<<40"},
        {4, (int64_t)1 << 40, 1, KFAC_ERROR_SIZE_OVERFLOW, "out_features = 1<<40"},
        {INT64_MAX, 4, 0, KFAC_ERROR_SIZE_OVERFLOW, "in_features = INT64_MAX"},
        {4, INT64_MAX, 0, KFAC_ERROR_SIZE_OVERFLOW, "out_features = INT64_MAX"},
        {INT64_MAX, 4, 1, KFAC_ERROR_SIZE_OVERFLOW, "in_features = INT64_MAX with bias"},
        {46340, 2, 1, KFAC_ERROR_SIZE_OVERFLOW, "in_features = 46340 with bias (A dim 46341)"},
        {2, 46341, 0, KFAC_ERROR_SIZE_OVERFLOW, "out_features = 46341"},
        {4, 4, 2, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = 2"},
        {4, 4, -1, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = -1"},
    };
    for (size_t i = 0; i < sizeof adds / sizeof adds[0]; i++) {
        int32_t id = -77;
        dense_args_t args = {adds[i].in, adds[i].out, adds[i].bias, 0, 0, 0};
        snprintf(what, sizeof what, "[%s] kfac_layer_add_dense(%s)", dtype_tag(dt), adds[i].what);
        if (!survives_in_child(B, call_add_dense, &args, what)) continue;
        int st = bad_call(B, add_dense(B, adds[i].in, adds[i].out, adds[i].bias, &id));
        snprintf(what, sizeof what, "kfac_layer_add_dense(%s)", adds[i].what);
        after_bad(&t, st, adds[i].want, what, 0, id == -77 && layer_count(B) == 2);
    }
    BAD_NO_ROUND(add_dense(B, 3, 3, 1, NULL), KFAC_ERROR_NULL_POINTER,
                 "kfac_layer_add_dense(layer_id = NULL)");

    /* kfac_layer_add_dense: the errors of kfac_layer_add_dense, and negative group sizes. */
    struct {
        int64_t in, out;
        int bias;
        int64_t input_group, output_group;
        int want;
        const char *what;
    } gadds[] = {
        {0, 4, 1, 2, 2, KFAC_ERROR_INVALID_SIZE, "in_features = 0"},
        {4, 0, 1, 2, 2, KFAC_ERROR_INVALID_SIZE, "out_features = 0"},
        {-3, 4, 0, 2, 2, KFAC_ERROR_INVALID_SIZE, "in_features = -3"},
        {4, INT64_MIN, 0, 2, 2, KFAC_ERROR_INVALID_SIZE, "out_features = INT64_MIN"},
        {4, 4, 1, -1, 0, KFAC_ERROR_INVALID_SIZE, "input_group_size = -1"},
        {4, 4, 1, 0, -2, KFAC_ERROR_INVALID_SIZE, "output_group_size = -2"},
        {4, 4, 0, INT64_MIN, 2, KFAC_ERROR_INVALID_SIZE, "input_group_size = INT64_MIN"},
        {4, 4, 0, 2, INT64_MIN, KFAC_ERROR_INVALID_SIZE, "output_group_size = INT64_MIN"},
        {4, 4, 2, 2, 2, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = 2"},
        {4, 4, -1, 2, 2, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = -1"},
        {(int64_t)1 << 40, 4, 1, 2, 2, KFAC_ERROR_SIZE_OVERFLOW, "in_features = 1<<40"},
        {4, (int64_t)1 << 40, 1, 2, 2, KFAC_ERROR_SIZE_OVERFLOW, "out_features = 1<<40"},
        {INT64_MAX, 4, 0, 2, 2, KFAC_ERROR_SIZE_OVERFLOW, "in_features = INT64_MAX"},
        {4, INT64_MAX, 0, 2, 2, KFAC_ERROR_SIZE_OVERFLOW, "out_features = INT64_MAX"},
        {INT64_MAX, 4, 1, 2, 2, KFAC_ERROR_SIZE_OVERFLOW, "in_features = INT64_MAX with bias"},
        {46340, 2, 1, 100, 1, KFAC_ERROR_SIZE_OVERFLOW,
         "in_features = 46340 with bias (A dim 46341, in blocks of 100)"},
        {2, 46341, 0, 1, 7, KFAC_ERROR_SIZE_OVERFLOW, "out_features = 46341 (in blocks of 7)"},
    };
    for (size_t i = 0; i < sizeof gadds / sizeof gadds[0]; i++) {
        int32_t id = -77;
        dense_args_t args = {gadds[i].in, gadds[i].out, gadds[i].bias, gadds[i].input_group,
                             gadds[i].output_group, 1};
        snprintf(what, sizeof what, "[%s] kfac_layer_add_dense(%s)", dtype_tag(dt), gadds[i].what);
        if (!survives_in_child(B, call_add_dense, &args, what)) continue;
        int st = bad_call(B, add_dense_grouped(B, gadds[i].in, gadds[i].out, gadds[i].bias,
                                                    gadds[i].input_group, gadds[i].output_group, &id));
        snprintf(what, sizeof what, "kfac_layer_add_dense(%s)", gadds[i].what);
        after_bad(&t, st, gadds[i].want, what, 0, id == -77 && layer_count(B) == 2);
    }
    BAD_NO_ROUND(add_dense_grouped(B, 3, 3, 1, 1, 1, NULL), KFAC_ERROR_NULL_POINTER,
                 "kfac_layer_add_dense(layer_id = NULL)");

    /* kfac_layer_add_conv2d */
    errors_add_conv2d(&t);

    /* kfac_layer_get_factors before any statistics: NO_STATISTICS, buffers untouched. */
    {
        buf_t ga = buf_new(dt, 36), gg = buf_new(dt, 16);
        buf_random(&ga, &t.rng);
        buf_random(&gg, &t.rng);
        buf_t ga0 = buf_clone(&ga), gg0 = buf_clone(&gg);
        int st = bad_call(B, get_group_factors(B, 0, 0, &ga, &gg));
        after_bad(&t, st, KFAC_ERROR_NO_STATISTICS, "kfac_layer_get_factors before any statistics",
                  0, buf_same(&ga, &ga0) && buf_same(&gg, &gg0));
        buf_free(&ga);
        buf_free(&gg);
        buf_free(&ga0);
        buf_free(&gg0);
    }

    /* kfac_layer_get_info */
    kfac_layer_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    BAD_NO_ROUND(kfac_layer_get_info(B, 0, NULL), KFAC_ERROR_NULL_POINTER,
                 "kfac_layer_get_info(info = NULL)");
    const int32_t bad_layers[] = {-1, 2, INT32_MAX, INT32_MIN};
    for (size_t i = 0; i < 4; i++) {
        snprintf(what, sizeof what, "kfac_layer_get_info(layer %d)", (int)bad_layers[i]);
        BAD_NO_ROUND(kfac_layer_get_info(B, bad_layers[i], &info), KFAC_ERROR_UNKNOWN_LAYER, what);
    }
    info.struct_size = 0;
    BAD_NO_ROUND(kfac_layer_get_info(B, 0, &info), KFAC_ERROR_INVALID_SIZE,
                 "kfac_layer_get_info(struct_size = 0)");
    info.struct_size = offsetof(kfac_layer_info, kind) + sizeof(int32_t) - 1;
    BAD_NO_ROUND(kfac_layer_get_info(B, 0, &info), KFAC_ERROR_INVALID_SIZE,
                 "kfac_layer_get_info(struct_size smaller than the first two fields)");

    /* Calls that need statistics. */
    grads_t g = grads_new(dt, &t.model, &t.rng), g_copy = grads_clone(&g);
    int st = bad_call(B, step(B, &g));
    after_bad(&t, st, KFAC_ERROR_NO_STATISTICS, "kfac_optimizer_step before any statistics", 0,
              grads_same(&g, &g_copy) && step_count(B) == 0);
    st = bad_call(B, precondition(B, 0, &g.w[0], &g.b[0]));
    after_bad(&t, st, KFAC_ERROR_NO_STATISTICS, "kfac_layer_precondition before any statistics", 0,
              grads_same(&g, &g_copy));
    buf_t a = buf_new(dt, 36), gg = buf_new(dt, 16);
    buf_t a0 = buf_clone(&a), gg0 = buf_clone(&gg);
    st = bad_call(B, get_factors(B, 0, &a, &gg));
    after_bad(&t, st, KFAC_ERROR_NO_STATISTICS, "kfac_layer_get_factors before any statistics", 0,
              buf_same(&a, &a0) && buf_same(&gg, &gg0));
    BAD_NO_ROUND(kfac_optimizer_update_inverses(B), KFAC_ERROR_NO_STATISTICS,
                 "kfac_optimizer_update_inverses before any statistics");
    check(kfac_optimizer_update_factors(B) == KFAC_OK && kfac_optimizer_update_factors(t.h[0]) == KFAC_OK &&
              same_state(t.h[0], t.h[1]),
          "[%s] kfac_optimizer_update_factors with nothing recorded succeeds and changes nothing",
          dtype_tag(dt));
    {
        double nu = -777;
        const int st_nu = kfac_optimizer_get_kl_scale(B, &nu);
        check(st_nu == KFAC_ERROR_NO_STEP && nu == -777,
              "[%s] kfac_optimizer_get_kl_scale -> NO_STEP before the first step, *scale untouched "
              "(got %s)", dtype_tag(dt), status_name(st_nu));
    }

    buf_free(&a);
    buf_free(&gg);
    buf_free(&a0);
    buf_free(&gg0);
    grads_free(&g);
    grads_free(&g_copy);
    *tp = t;
}

/* Record calls: NULL, ids, sizes, dtype, non-finite values. */
void errors_record(twins_t *tp) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype, od = other_dtype(dt);
    char what[256];
    section(dt == KFAC_FLOAT32 ? "float32 handle: record calls" : "float64 handle: record calls");

    /* add_dense after statistics were recorded (the twins have had rounds by now). */
    int32_t id = -77;
    int st = bad_call(B, add_dense(B, 3, 3, 1, &id));
    after_bad(&t, st, KFAC_ERROR_LAYERS_FROZEN, "kfac_layer_add_dense after recording", 1, id == -77);

    for (int side = 0; side < 2; side++) {
        const char *fn = side == 0 ? "kfac_layer_record_inputs" : "kfac_layer_record_output_grads";
        int (*rec)(kfac_optimizer *, int32_t, const buf_t *, int64_t) =
            side == 0 ? record_inputs : record_grads;
        buf_t x = buf_new(dt, 64), xo = buf_new(od, 64);
        buf_random(&x, &t.rng);
        buf_random(&xo, &t.rng);

        snprintf(what, sizeof what, "%s(buffer = NULL)", fn);
        if (dt == KFAC_FLOAT32)
            BAD(side == 0 ? kfac_layer_record_inputs_f32(B, 0, NULL, 2)
                          : kfac_layer_record_output_grads_f32(B, 0, NULL, 2),
                KFAC_ERROR_NULL_POINTER, what);
        else
            BAD(side == 0 ? kfac_layer_record_inputs_f64(B, 0, NULL, 2)
                          : kfac_layer_record_output_grads_f64(B, 0, NULL, 2),
                KFAC_ERROR_NULL_POINTER, what);

        const int32_t bad_layers[] = {-1, 2, INT32_MAX, INT32_MIN};
        for (size_t i = 0; i < 4; i++) {
            snprintf(what, sizeof what, "%s(layer %d)", fn, (int)bad_layers[i]);
            BAD(rec(B, bad_layers[i], &x, 2), KFAC_ERROR_UNKNOWN_LAYER, what);
        }
        const struct {
            int64_t rows;
            int want;
            const char *name;
        } sizes[] = {
            {0, KFAC_ERROR_INVALID_SIZE, "0"},
            {-1, KFAC_ERROR_INVALID_SIZE, "-1"},
            {INT64_MIN, KFAC_ERROR_INVALID_SIZE, "INT64_MIN"},
            {INT64_MAX, KFAC_ERROR_SIZE_OVERFLOW, "INT64_MAX"},
            {INT64_MAX / 2, KFAC_ERROR_SIZE_OVERFLOW, "INT64_MAX/2"},
            {(int64_t)1 << 62, KFAC_ERROR_SIZE_OVERFLOW, "1<<62"},
        };
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            snprintf(what, sizeof what, "%s(rows = %s)", fn, sizes[i].name);
            BAD(rec(B, 0, &x, sizes[i].rows), sizes[i].want, what);
        }
        snprintf(what, sizeof what, "%s_%s on a %s handle", fn, dtype_tag(od), dtype_tag(dt));
        BAD(rec(B, 0, &xo, 2), KFAC_ERROR_DTYPE_MISMATCH, what);

        /* Non-finite values: the factors must not change, and nothing may become pending (the
         * state comparison and the next round show that; here the factors are compared
         * explicitly too, after folding on both twins). */
        const struct {
            int layer;
            size_t index;
            double value;
            const char *name;
        } bad_values[] = {
            {0, 0, NAN, "NaN in the first value, layer 0"},
            {0, 9, NAN, "NaN in the last value of 2 rows, layer 0"},
            {1, 3, INFINITY, "+Inf, layer 1 (no bias)"},
            {1, 0, -INFINITY, "-Inf, layer 1 (no bias)"},
        };
        for (size_t i = 0; i < sizeof bad_values / sizeof bad_values[0]; i++) {
            const int l = bad_values[i].layer;
            const size_t adim = (size_t)(t.model.l[l].in + t.model.l[l].bias);
            const size_t gdim = (size_t)t.model.l[l].out;
            const size_t width = (size_t)(side == 0 ? t.model.l[l].in : t.model.l[l].out);
            buf_t a_before = buf_new(dt, adim * adim), g_before = buf_new(dt, gdim * gdim);
            buf_t a_after = buf_new(dt, adim * adim), g_after = buf_new(dt, gdim * gdim);
            buf_t a_twin = buf_new(dt, adim * adim), g_twin = buf_new(dt, gdim * gdim);
            REQUIRE_OK(B, get_factors(B, l, &a_before, &g_before));

            buf_t bad = buf_new(dt, 2 * width);
            buf_random(&bad, &t.rng);
            const size_t index = bad_values[i].index < 2 * width ? bad_values[i].index : 2 * width - 1;
            buf_set(&bad, index, bad_values[i].value);
            st = bad_call(B, rec(B, l, &bad, 2));
            const int unchanged = get_factors(B, l, &a_after, &g_after) == KFAC_OK &&
                                  buf_same(&a_before, &a_after) && buf_same(&g_before, &g_after);
            snprintf(what, sizeof what, "%s(%s); factors unchanged", fn, bad_values[i].name);
            after_bad(&t, st, KFAC_ERROR_NON_FINITE, what, 0, unchanged);

            /* Fold whatever is pending on both twins and compare the factors bitwise. */
            const int folded = twins_record(&t) && kfac_optimizer_update_factors(t.h[0]) == KFAC_OK &&
                               kfac_optimizer_update_factors(B) == KFAC_OK &&
                               get_factors(t.h[0], l, &a_twin, &g_twin) == KFAC_OK &&
                               get_factors(B, l, &a_after, &g_after) == KFAC_OK &&
                               buf_same(&a_twin, &a_after) && buf_same(&g_twin, &g_after);
            char why[512] = "";
            const int round_ok = twins_round(&t, why, sizeof why);
            check(folded && round_ok,
                  "[%s]   ... then folding identical statistics gives bitwise identical factors "
                  "and directions on both twins%s%s", dtype_tag(dt), round_ok ? "" : ": ", why);
            buf_free(&bad);
            buf_free(&a_before);
            buf_free(&g_before);
            buf_free(&a_after);
            buf_free(&g_after);
            buf_free(&a_twin);
            buf_free(&g_twin);
        }
        buf_free(&x);
        buf_free(&xo);
    }
    *tp = t;
}

/* Factors, step and precondition. */
void errors_step(twins_t *tp) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype, od = other_dtype(dt);
    char what[256];
    section(dt == KFAC_FLOAT32 ? "float32 handle: factors, step, precondition"
                               : "float64 handle: factors, step, precondition");

    /* kfac_layer_get_factors */
    buf_t a = buf_new(dt, 36), g = buf_new(dt, 16), ao = buf_new(od, 36), go = buf_new(od, 16);
    const int32_t bad_layers[] = {-1, 2, INT32_MAX, INT32_MIN};
    for (size_t i = 0; i < 4; i++) {
        snprintf(what, sizeof what, "kfac_layer_get_factors(layer %d)", (int)bad_layers[i]);
        BAD(get_factors(B, bad_layers[i], &a, &g), KFAC_ERROR_UNKNOWN_LAYER, what);
    }
    snprintf(what, sizeof what, "kfac_layer_get_factors_%s on a %s handle", dtype_tag(od), dtype_tag(dt));
    buf_t ao0 = buf_clone(&ao), go0 = buf_clone(&go);
    int st = bad_call(B, get_factors(B, 0, &ao, &go));
    after_bad(&t, st, KFAC_ERROR_DTYPE_MISMATCH, what, 1, buf_same(&ao, &ao0) && buf_same(&go, &go0));
    check((dt == KFAC_FLOAT32 ? kfac_layer_get_factors_f32(B, 0, 0, NULL, NULL)
                              : kfac_layer_get_factors_f64(B, 0, 0, NULL, NULL)) == KFAC_OK,
          "[%s] kfac_layer_get_factors(layer 0, NULL, NULL) succeeds (both outputs skipped)",
          dtype_tag(dt));

    /* kfac_layer_get_factors on dense layers (one group): group out of range, unknown layer,
     * dtype; buffers untouched. */
    {
        buf_t a0 = buf_clone(&a), g0 = buf_clone(&g);
        const int32_t bad_groups[] = {1, -1, 2, INT32_MAX, INT32_MIN};
        for (size_t i = 0; i < sizeof bad_groups / sizeof bad_groups[0]; i++) {
            for (int l = 0; l < 2; l++) {
                snprintf(what, sizeof what, "kfac_layer_get_factors(layer %d, group %d)", l,
                         (int)bad_groups[i]);
                st = bad_call(B, get_group_factors(B, l, bad_groups[i], &a, &g));
                after_bad(&t, st, KFAC_ERROR_INVALID_ARGUMENT, what, i == 0,
                          buf_same(&a, &a0) && buf_same(&g, &g0));
            }
        }
        for (size_t i = 0; i < 4; i++) {
            snprintf(what, sizeof what, "kfac_layer_get_factors(layer %d, group 0)", (int)bad_layers[i]);
            st = bad_call(B, get_group_factors(B, bad_layers[i], 0, &a, &g));
            after_bad(&t, st, KFAC_ERROR_UNKNOWN_LAYER, what, 0, buf_same(&a, &a0) && buf_same(&g, &g0));
        }
        snprintf(what, sizeof what, "kfac_layer_get_factors_%s on a %s handle", dtype_tag(od),
                 dtype_tag(dt));
        st = bad_call(B, get_group_factors(B, 0, 0, &ao, &go));
        after_bad(&t, st, KFAC_ERROR_DTYPE_MISMATCH, what, 1, buf_same(&ao, &ao0) && buf_same(&go, &go0));
        buf_t a1 = buf_clone(&a), g1 = buf_clone(&g), a2 = buf_clone(&a), g2 = buf_clone(&g);
        const int same = get_factors(B, 0, &a1, &g1) == KFAC_OK &&
                         get_group_factors(B, 0, 0, &a2, &g2) == KFAC_OK && buf_same(&a1, &a2) &&
                         buf_same(&g1, &g2) &&
                         (dt == KFAC_FLOAT32 ? kfac_layer_get_factors_f32(B, 1, 0, NULL, NULL)
                                             : kfac_layer_get_factors_f64(B, 1, 0, NULL, NULL)) == KFAC_OK;
        check(same, "[%s] kfac_layer_get_factors(group 0) of a dense layer: two reads agree (helpers get_factors, "
                    "get_group_factors); "
                    "NULL outputs are skipped", dtype_tag(dt));
        buf_free(&a0);
        buf_free(&g0);
        buf_free(&a1);
        buf_free(&g1);
        buf_free(&a2);
        buf_free(&g2);
    }

    /* kfac_optimizer_step: each bad step follows a valid record on both twins, so a failed step that
     * folded the pending statistics anyway would show in the state comparison. */
    struct {
        const char *what;
        int want;
    } cases[] = {
        {"kfac_optimizer_step(weight_grads = NULL)", KFAC_ERROR_NULL_POINTER},
        {"kfac_optimizer_step(weight_grads[1] = NULL)", KFAC_ERROR_NULL_POINTER},
        {"kfac_optimizer_step(bias_grads = NULL, layer 0 has a bias)", KFAC_ERROR_NULL_POINTER},
        {"kfac_optimizer_step(bias_grads[0] = NULL, layer 0 has a bias)", KFAC_ERROR_NULL_POINTER},
        {"kfac_optimizer_step(bias_grads[1] given, layer 1 has no bias)", KFAC_ERROR_INVALID_ARGUMENT},
        {"kfac_optimizer_step(n_layers = 0)", KFAC_ERROR_INVALID_SIZE},
        {"kfac_optimizer_step(n_layers = 1 < layer count)", KFAC_ERROR_INVALID_SIZE},
        {"kfac_optimizer_step(n_layers = 3 > layer count)", KFAC_ERROR_INVALID_SIZE},
        {"kfac_optimizer_step(n_layers = -1)", KFAC_ERROR_INVALID_SIZE},
        {"kfac_optimizer_step(n_layers = INT32_MIN)", KFAC_ERROR_INVALID_SIZE},
        {"kfac_optimizer_step_<other dtype>", KFAC_ERROR_DTYPE_MISMATCH},
        {"kfac_optimizer_step(NaN in layer 0's first weight gradient)", KFAC_ERROR_NON_FINITE},
        {"kfac_optimizer_step(+Inf in layer 1's last weight gradient)", KFAC_ERROR_NON_FINITE},
        {"kfac_optimizer_step(NaN in layer 0's bias gradient)", KFAC_ERROR_NON_FINITE},
        {"kfac_optimizer_step(-Inf in layer 0's last bias gradient)", KFAC_ERROR_NON_FINITE},
    };
    for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
        if (!twins_record(&t)) check(0, "[%s] twins_record before a bad step", dtype_tag(dt));
        grads_t gr = grads_new(c == 10 ? od : dt, &t.model, &t.rng);
        /* Arrays of 3 entries so that n_layers = 3 reads valid memory even if it is accepted. */
        void *w[3] = {gr.w[0].p, gr.w[1].p, gr.w[1].p}, *b[3] = {gr.b[0].p, NULL, NULL};
        void **wp = w, **bp = b;
        int32_t n = 2;
        switch (c) {
        case 0: wp = NULL; break;
        case 1: w[1] = NULL; break;
        case 2: bp = NULL; break;
        case 3: b[0] = NULL; break;
        case 4: b[1] = gr.w[0].p; break; /* any valid buffer of >= 3 values */
        case 5: n = 0; break;
        case 6: n = 1; break;
        case 7: n = 3; break;
        case 8: n = -1; break;
        case 9: n = INT32_MIN; break;
        case 10: break;
        case 11: buf_set(&gr.w[0], 0, NAN); break;
        case 12: buf_set(&gr.w[1], gr.w[1].n - 1, INFINITY); break;
        case 13: buf_set(&gr.b[0], 1, NAN); break;
        case 14: buf_set(&gr.b[0], gr.b[0].n - 1, -INFINITY); break;
        }
        grads_t gr0 = grads_clone(&gr); /* after poisoning: must come back untouched */
        const int64_t k = step_count(B);
        if (gr.w[0].dtype == KFAC_FLOAT32) {
            float *wf[3], *bf[3];
            for (int i = 0; i < 3; i++) {
                wf[i] = (float *)w[i];
                bf[i] = (float *)b[i];
            }
            st = bad_call(B, kfac_optimizer_step_f32(B, wp ? wf : NULL, bp ? bf : NULL, n));
        } else {
            double *wd[3], *bd[3];
            for (int i = 0; i < 3; i++) {
                wd[i] = (double *)w[i];
                bd[i] = (double *)b[i];
            }
            st = bad_call(B, kfac_optimizer_step_f64(B, wp ? wd : NULL, bp ? bd : NULL, n));
        }
        after_bad(&t, st, cases[c].want, cases[c].what, 1,
                  grads_same(&gr, &gr0) && step_count(B) == k + (st == KFAC_OK));
        grads_free(&gr);
        grads_free(&gr0);
    }

    /* kfac_layer_precondition: the twins have inverses now. */
    grads_t gr = grads_new(dt, &t.model, &t.rng), gro = grads_new(od, &t.model, &t.rng);
    grads_t gr0 = grads_clone(&gr);
    const struct {
        int layer, which; /* which: 0 = NULL weight, 1 = missing bias, 2 = extra bias, 3 = NaN W,
                             4 = Inf b, 5 = other dtype, 6 = plain */
        int want;
        const char *what;
    } pc[] = {
        {0, 0, KFAC_ERROR_NULL_POINTER, "kfac_layer_precondition(weight_grad = NULL)"},
        {0, 1, KFAC_ERROR_NULL_POINTER, "kfac_layer_precondition(bias_grad = NULL, layer has a bias)"},
        {1, 2, KFAC_ERROR_INVALID_ARGUMENT, "kfac_layer_precondition(bias_grad given, layer has none)"},
        {0, 3, KFAC_ERROR_NON_FINITE, "kfac_layer_precondition(NaN in the weight gradient)"},
        {0, 4, KFAC_ERROR_NON_FINITE, "kfac_layer_precondition(Inf in the bias gradient)"},
        {0, 5, KFAC_ERROR_DTYPE_MISMATCH, "kfac_layer_precondition_<other dtype>"},
        {-1, 6, KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_precondition(layer -1)"},
        {2, 6, KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_precondition(layer 2)"},
        {INT32_MAX, 6, KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_precondition(layer INT32_MAX)"},
    };
    for (size_t i = 0; i < sizeof pc / sizeof pc[0]; i++) {
        grads_free(&gr);
        gr = grads_clone(&gr0);
        int l = pc[i].layer >= 0 && pc[i].layer < 2 ? pc[i].layer : 0;
        buf_t *w = &gr.w[l], *b = gr.b[l].p ? &gr.b[l] : NULL;
        switch (pc[i].which) {
        case 0:
            st = dt == KFAC_FLOAT32 ? kfac_layer_precondition_f32(B, 0, NULL, (float *)b->p)
                                    : kfac_layer_precondition_f64(B, 0, NULL, (double *)b->p);
            break;
        case 1: st = precondition(B, 0, w, NULL); break;
        case 2: st = precondition(B, 1, w, &gr.w[0]); break; /* a buffer with >= 3 values */
        case 3:
            buf_set(w, 2, NAN);
            st = precondition(B, 0, w, b);
            break;
        case 4:
            buf_set(b, 0, INFINITY);
            st = precondition(B, 0, w, b);
            break;
        case 5: st = precondition(B, 0, &gro.w[0], &gro.b[0]); break;
        default: st = precondition(B, pc[i].layer, w, b); break;
        }
        bad_call(B, st);
        /* Untouched: compare with the input as it was just before the call. */
        grads_t expect = grads_clone(&gr0);
        if (pc[i].which == 3) buf_set(&expect.w[0], 2, NAN);
        if (pc[i].which == 4) buf_set(&expect.b[0], 0, INFINITY);
        after_bad(&t, st, pc[i].want, pc[i].what, 1, grads_same(&gr, &expect));
        grads_free(&expect);
    }
    /* A successful precondition must not change the handle either. */
    grads_free(&gr);
    gr = grads_clone(&gr0);
    st = precondition(B, 0, &gr.w[0], &gr.b[0]);
    int st1 = precondition(B, 1, &gr.w[1], NULL);
    check(st == KFAC_OK && st1 == KFAC_OK && !grads_same(&gr, &gr0) && same_state(t.h[0], B),
          "[%s] successful kfac_layer_precondition on both layers changes the gradients, not the handle",
          dtype_tag(dt));

    grads_free(&gr);
    grads_free(&gro);
    grads_free(&gr0);
    buf_free(&a);
    buf_free(&g);
    buf_free(&ao);
    buf_free(&go);
    buf_free(&ao0);
    buf_free(&go0);
    *tp = t;
}

void test_errors(int dtype, const char *tmpdir) {
    twins_t t = twins_new(dtype, dtype == KFAC_FLOAT32 ? 101 : 202);
    check(dtype_of(t.h[1]) == dtype && layer_count(t.h[1]) == 2,
          "[%s] twin handles created with 2 layers", dtype_tag(dtype));
    errors_before_statistics(&t);
    char why[512] = "";
    int ok = 1;
    for (int r = 0; ok && r < 3; r++) ok = twins_round(&t, why, sizeof why);
    check(ok, "[%s] three valid rounds on the twins: identical directions%s%s", dtype_tag(dtype),
          ok ? "" : ": ", why);
    errors_record(&t);
    errors_step(&t);
    errors_adaptive(&t);
    errors_params(&t);
    errors_state(&t, tmpdir);
    twins_free(&t);
}
