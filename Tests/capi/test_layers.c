/*
 * test_layers.c — layer registration: kfac_dense_desc and kfac_conv2d_desc error paths
 * and growable structs, layer info, convolutions on twin handles.
 */
#include "harness.h"

#include <math.h>

/* kfac_layer_add_conv2d error paths on the twins (before statistics): each must leave the layer list,
 * the state and *layer_id alone. */
void errors_add_conv2d(twins_t *tp) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype;
    char what[256];
    const int64_t big = (int64_t)1 << 30;
    const struct {
        int field;
        int64_t value;
        int want;
        const char *what;
    } cases[] = {
        /* field: 0 struct_size, 1 in, 2 out, 3 kh, 4 kw, 5 sh, 6 sw, 7 ph, 8 pw, 9 dh, 10 dw,
         * 11 groups, 12 H, 13 W, 14 has_bias, 15 layout, 16 approximation, 17 reserved,
         * 18 input_group_size, 19 output_group_size; 20+ combinations (see below) */
        {0, 0, KFAC_ERROR_INVALID_SIZE, "struct_size = 0"},
        {0, sizeof(size_t), KFAC_ERROR_INVALID_SIZE, "struct_size = sizeof(size_t)"},
        {0, offsetof(kfac_conv2d_desc, input_group_size) - 1, KFAC_ERROR_INVALID_SIZE,
         "struct_size one byte short of `reserved`"},
        {1, 0, KFAC_ERROR_INVALID_SIZE, "in_channels = 0"},
        {1, -4, KFAC_ERROR_INVALID_SIZE, "in_channels = -4"},
        {2, 0, KFAC_ERROR_INVALID_SIZE, "out_channels = 0"},
        {2, -6, KFAC_ERROR_INVALID_SIZE, "out_channels = -6"},
        {3, 0, KFAC_ERROR_INVALID_SIZE, "kernel_h = 0"},
        {4, -1, KFAC_ERROR_INVALID_SIZE, "kernel_w = -1"},
        {5, -1, KFAC_ERROR_INVALID_SIZE, "stride_h = -1"},
        {6, INT64_MIN, KFAC_ERROR_INVALID_SIZE, "stride_w = INT64_MIN"},
        {7, -1, KFAC_ERROR_INVALID_SIZE, "padding_h = -1"},
        {8, INT64_MIN, KFAC_ERROR_INVALID_SIZE, "padding_w = INT64_MIN"},
        {9, -2, KFAC_ERROR_INVALID_SIZE, "dilation_h = -2"},
        {10, -1, KFAC_ERROR_INVALID_SIZE, "dilation_w = -1"},
        {11, -2, KFAC_ERROR_INVALID_SIZE, "groups = -2"},
        {11, 3, KFAC_ERROR_INVALID_SIZE, "groups = 3 (divides out_channels 6, not in_channels 4)"},
        {11, 4, KFAC_ERROR_INVALID_SIZE, "groups = 4 (divides in_channels 4, not out_channels 6)"},
        {11, 5, KFAC_ERROR_INVALID_SIZE, "groups = 5 (divides neither)"},
        {12, 0, KFAC_ERROR_INVALID_SIZE, "input_h = 0"},
        {13, -5, KFAC_ERROR_INVALID_SIZE, "input_w = -5"},
        {3, 6, KFAC_ERROR_INVALID_SIZE, "kernel_h = 6 > input_h = 5 (no padding)"},
        {20, 0, KFAC_ERROR_INVALID_SIZE, "kernel_w = 8 > padded input_w = 5 + 2·1"},
        {21, 0, KFAC_ERROR_INVALID_SIZE, "kernel 3 with dilation 3 spans 7 > input 5"},
        {22, 0, KFAC_ERROR_INVALID_SIZE, "1-D: kernel_w = 10 > input_w = 9"},
        {14, 2, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = 2"},
        {14, -1, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = -1"},
        {15, 2, KFAC_ERROR_INVALID_ARGUMENT, "layout = 2"},
        {15, -1, KFAC_ERROR_INVALID_ARGUMENT, "layout = -1"},
        {16, 2, KFAC_ERROR_INVALID_ARGUMENT, "approximation = 2"},
        {16, INT32_MIN, KFAC_ERROR_INVALID_ARGUMENT, "approximation = INT32_MIN"},
        {17, 1, KFAC_ERROR_INVALID_ARGUMENT, "reserved = 1"},
        {17, -1, KFAC_ERROR_INVALID_ARGUMENT, "reserved = -1"},
        {18, -1, KFAC_ERROR_INVALID_SIZE, "input_group_size = -1"},
        {19, INT64_MIN, KFAC_ERROR_INVALID_SIZE, "output_group_size = INT64_MIN"},
        {1, (int64_t)1 << 31, KFAC_ERROR_SIZE_OVERFLOW, "in_channels = 2^31"},
        {23, 0, KFAC_ERROR_SIZE_OVERFLOW, "in_channels = INT64_MAX (groups 1)"},
        {24, 0, KFAC_ERROR_SIZE_OVERFLOW, "out_channels = INT64_MAX (groups 1)"},
        {12, INT64_MAX, KFAC_ERROR_SIZE_OVERFLOW, "input_h = INT64_MAX"},
        {8, INT64_MAX, KFAC_ERROR_SIZE_OVERFLOW, "padding_w = INT64_MAX"},
        {6, INT64_MAX, KFAC_ERROR_SIZE_OVERFLOW, "stride_w = INT64_MAX"},
        {9, INT64_MAX, KFAC_ERROR_SIZE_OVERFLOW, "dilation_h = INT64_MAX"},
        {25, 0, KFAC_ERROR_SIZE_OVERFLOW, "Ω dimension 2048·5·5 + 1 = 51201 > 46340"},
        {26, 0, KFAC_ERROR_SIZE_OVERFLOW, "an input example of 4·2^15·2^15 = 2^32 values"},
        {27, 0, KFAC_ERROR_SIZE_OVERFLOW, "an output-gradient example of 6·(2^15+1)² values "
                                          "(padding 2^14 on a 1×1 input)"},
        {28, 0, KFAC_ERROR_SIZE_OVERFLOW, "kernel 2^30 × 2^30 on a 2^30 × 2^30 input, 2^29 channels "
                                          "per group (patch size 2^89 overflows int64)"},
        {29, 0, KFAC_ERROR_SIZE_OVERFLOW, "padding 2^30 on a 1×1 input: (2^31 + 1)² output "
                                          "positions × 6 channels overflows int64"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kfac_conv2d_desc d = base_conv();
        const int64_t v = cases[i].value;
        switch (cases[i].field) {
        case 0: d.struct_size = (size_t)v; break;
        case 1: d.in_channels = v; break;
        case 2: d.out_channels = v; break;
        case 3: d.kernel_h = v; break;
        case 4: d.kernel_w = v; break;
        case 5: d.stride_h = v; break;
        case 6: d.stride_w = v; break;
        case 7: d.padding_h = v; break;
        case 8: d.padding_w = v; break;
        case 9: d.dilation_h = v; break;
        case 10: d.dilation_w = v; break;
        case 11: d.groups = v; break;
        case 12: d.input_h = v; break;
        case 13: d.input_w = v; break;
        case 14: d.has_bias = (int32_t)v; break;
        case 15: d.layout = (int32_t)v; break;
        case 16: d.approximation = (int32_t)v; break;
        case 17: d.reserved = (int32_t)v; break;
        case 18: d.input_group_size = v; break;
        case 19: d.output_group_size = v; break;
        case 20: d.kernel_w = 8; d.padding_w = 1; break;
        case 21: d.dilation_h = 3; break;
        case 22: d.input_h = 1; d.kernel_h = 1; d.input_w = 9; d.kernel_w = 10; break;
        case 23: d.groups = 1; d.in_channels = INT64_MAX; break;
        case 24: d.groups = 1; d.out_channels = INT64_MAX; break;
        case 25: d.in_channels = 4096; d.kernel_h = d.kernel_w = 5; break;
        case 26: d.input_h = d.input_w = (int64_t)1 << 15; break;
        case 27:
            d.input_h = d.input_w = 1;
            d.kernel_h = d.kernel_w = 1;
            d.padding_h = d.padding_w = (int64_t)1 << 14;
            break;
        case 28:
            d.in_channels = big;
            d.kernel_h = d.kernel_w = big;
            d.input_h = d.input_w = big;
            break;
        case 29:
            d.input_h = d.input_w = 1;
            d.kernel_h = d.kernel_w = 1;
            d.padding_h = d.padding_w = big;
            break;
        }
        snprintf(what, sizeof what, "[%s] kfac_layer_add_conv2d(%s)", dtype_tag(dt), cases[i].what);
        if (!survives_in_child(B, call_add_conv2d, &d, what)) continue;
        int32_t id = -77;
        int st = bad_call(B, kfac_layer_add_conv2d(B, &d, &id));
        snprintf(what, sizeof what, "kfac_layer_add_conv2d(%s)", cases[i].what);
        after_bad(&t, st, cases[i].want, what, 0, id == -77 && layer_count(B) == 2);
    }
    kfac_conv2d_desc d = base_conv();
    int32_t id = -77;
    int st = bad_call(B, kfac_layer_add_conv2d(B, NULL, &id));
    after_bad(&t, st, KFAC_ERROR_NULL_POINTER, "kfac_layer_add_conv2d(desc = NULL)", 0,
              id == -77 && layer_count(B) == 2);
    BAD_NO_ROUND(kfac_layer_add_conv2d(B, &d, NULL), KFAC_ERROR_NULL_POINTER,
                 "kfac_layer_add_conv2d(layer_id = NULL)");
    *tp = t;
}

/* kfac_layer_get_info on the twin model: full, truncated and larger structs. */
void test_layer_info(void) {
    section("layer info");
    kfac_optimizer *h = make_handle(KFAC_FLOAT32, &TWIN_MODEL);
    /* Layer info, full and truncated struct. */
    kfac_layer_info info;
    memset(&info, 0xFF, sizeof info);
    info.struct_size = sizeof info;
    int st = kfac_layer_get_info(h, 0, &info);
    check(st == KFAC_OK && info.kind == KFAC_LAYER_DENSE && info.has_bias == 1 &&
              info.in_features == 5 && info.out_features == 4 && info.a_dim == 6 &&
              info.g_dim == 4 && info.has_factors == 0 && info.has_inverses == 0,
          "kfac_layer_get_info(layer 0): dense 5->4 with bias, a_dim 6, g_dim 4, no factors");
    memset(&info, 0xFF, sizeof info);
    info.struct_size = sizeof info;
    st = kfac_layer_get_info(h, 1, &info);
    check(st == KFAC_OK && info.has_bias == 0 && info.a_dim == 4 && info.g_dim == 3,
          "kfac_layer_get_info(layer 1): no bias, a_dim 4, g_dim 3");
    memset(&info, 0xEE, sizeof info);
    info.struct_size = offsetof(kfac_layer_info, has_bias);
    st = bad_call(h, kfac_layer_get_info(h, 0, &info));
    const unsigned char *tail = (const unsigned char *)&info + offsetof(kfac_layer_info, has_bias);
    int tail_untouched = 1;
    for (size_t i = 0; i < sizeof info - offsetof(kfac_layer_info, has_bias); i++)
        if (tail[i] != 0xEE) tail_untouched = 0;
    check(st == KFAC_OK && info.kind == KFAC_LAYER_DENSE && tail_untouched,
          "kfac_layer_get_info with struct_size = %zu (the first two fields, the minimum the "
          "header allows) fills only those (got %s%s%s)", offsetof(kfac_layer_info, has_bias),
          status_name(st), st ? ": " : "", st ? g_last_error : "");
    /* A caller with a newer, larger struct. */
    struct {
        kfac_layer_info info;
        unsigned char future[32];
    } big;
    memset(&big, 0xEE, sizeof big);
    big.info.struct_size = sizeof big;
    st = kfac_layer_get_info(h, 0, &big.info);
    int future_untouched = 1;
    for (size_t i = 0; i < sizeof big.future; i++)
        if (big.future[i] != 0xEE) future_untouched = 0;
    check(st == KFAC_OK && big.info.in_features == 5 && future_untouched,
          "kfac_layer_get_info with a larger struct_size fills the known fields only");
    kfac_optimizer_free(h);
}

/* The A and G of a one-layer float64 handle registered from `desc` (struct_size bytes of it)
 * after one fixed batch of 6 rows (seed 77): 1 if registration, record and fold succeeded. */
static int dense_factors(const kfac_dense_desc *desc, int64_t in, int64_t out, int bias, double *A,
                         double *G) {
    kfac_optimizer *h = NULL;
    if (kfac_optimizer_create(KFAC_FLOAT64, &h) != KFAC_OK) return 0;
    int32_t id = -1;
    int ok = kfac_layer_add_dense(h, desc, &id) == KFAC_OK && id == 0;
    rng_t r = {77};
    buf_t x = buf_new(KFAC_FLOAT64, (size_t)(6 * in)), g = buf_new(KFAC_FLOAT64, (size_t)(6 * out));
    buf_random(&x, &r);
    buf_random(&g, &r);
    ok = ok && record_inputs(h, 0, &x, 6) == KFAC_OK && record_grads(h, 0, &g, 6) == KFAC_OK &&
         kfac_optimizer_update_factors(h) == KFAC_OK &&
         kfac_layer_get_factors_f64(h, 0, 0, A, G) == KFAC_OK;
    (void)bias;
    buf_free(&x);
    buf_free(&g);
    kfac_optimizer_free(h);
    return ok;
}

/* kfac_dense_desc: error paths on the twins (each leaves the layer list, the state and
 * *layer_id alone), the growable struct (an older struct_size reads the fields past it as 0),
 * group sizes not smaller than the features. */
void test_dense_desc(void) {
    section("kfac_dense_desc");
    for (int dt = KFAC_FLOAT32; dt <= KFAC_FLOAT64; dt++) {
        twins_t t = twins_new(dt, dt == KFAC_FLOAT32 ? 3101 : 3202);
        kfac_optimizer *B = t.h[1];
        char what[256];
        const struct {
            int field; /* 0 struct_size, 1 has_bias, 2 reserved, 3 input_group_size,
                          4 output_group_size */
            int64_t value;
            int want;
            const char *what;
        } cases[] = {
            {0, 0, KFAC_ERROR_INVALID_SIZE, "struct_size = 0"},
            {0, sizeof(size_t), KFAC_ERROR_INVALID_SIZE, "struct_size = sizeof(size_t)"},
            {0, offsetof(kfac_dense_desc, has_bias), KFAC_ERROR_INVALID_SIZE,
             "struct_size ending before has_bias"},
            {0, offsetof(kfac_dense_desc, reserved) + sizeof(int32_t) - 1, KFAC_ERROR_INVALID_SIZE,
             "struct_size one byte short of `reserved`"},
            {1, 2, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = 2"},
            {1, -1, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = -1"},
            {1, INT32_MAX, KFAC_ERROR_INVALID_ARGUMENT, "has_bias = INT32_MAX"},
            {2, 1, KFAC_ERROR_INVALID_ARGUMENT, "reserved = 1"},
            {2, -1, KFAC_ERROR_INVALID_ARGUMENT, "reserved = -1"},
            {2, INT32_MIN, KFAC_ERROR_INVALID_ARGUMENT, "reserved = INT32_MIN"},
            {3, -1, KFAC_ERROR_INVALID_SIZE, "input_group_size = -1"},
            {3, INT64_MIN, KFAC_ERROR_INVALID_SIZE, "input_group_size = INT64_MIN"},
            {4, -3, KFAC_ERROR_INVALID_SIZE, "output_group_size = -3"},
            {4, INT64_MIN, KFAC_ERROR_INVALID_SIZE, "output_group_size = INT64_MIN"},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            kfac_dense_desc d;
            memset(&d, 0, sizeof d);
            d.struct_size = sizeof d;
            d.in_features = 4;
            d.out_features = 3;
            d.has_bias = 1;
            const int64_t v = cases[i].value;
            switch (cases[i].field) {
            case 0: d.struct_size = (size_t)v; break;
            case 1: d.has_bias = (int32_t)v; break;
            case 2: d.reserved = (int32_t)v; break;
            case 3: d.input_group_size = v; break;
            case 4: d.output_group_size = v; break;
            }
            int32_t id = -77;
            const int st = bad_call(B, kfac_layer_add_dense(B, &d, &id));
            snprintf(what, sizeof what, "kfac_layer_add_dense(%s)", cases[i].what);
            after_bad(&t, st, cases[i].want, what, 0, id == -77 && layer_count(B) == 2);
        }
        {
            int32_t id = -77;
            const int st = bad_call(B, kfac_layer_add_dense(B, NULL, &id));
            after_bad(&t, st, KFAC_ERROR_NULL_POINTER, "kfac_layer_add_dense(desc = NULL)", 0,
                      id == -77 && layer_count(B) == 2);
        }
        /* reserved is checked although has_bias, sizes and groups are valid; a short struct
         * that ends before a bad reserved value is still too small. */
        char why[512] = "";
        check(twins_round(&t, why, sizeof why), "[%s] a round after the kfac_dense_desc errors: "
              "identical directions%s%s", dtype_tag(dt), why[0] ? ": " : "", why);
        twins_free(&t);
    }

    /* The growable struct: bytes past an older caller's struct_size are not read (they hold
     * garbage here), and the group sizes read as 0 = no grouping. The factors must equal those
     * of the full struct without grouping, bitwise, and differ from a grouped layer's. */
    enum { IN = 6, OUT = 4 };
    double A_full[(IN + 1) * (IN + 1)], G_full[OUT * OUT], A[(IN + 1) * (IN + 1)], G[OUT * OUT];
    kfac_dense_desc full;
    memset(&full, 0, sizeof full);
    full.struct_size = sizeof full;
    full.in_features = IN;
    full.out_features = OUT;
    full.has_bias = 1;
    const int full_ok = dense_factors(&full, IN, OUT, 1, A_full, G_full);
    check(full_ok, "kfac_dense_desc (full struct, no grouping): registered, factors read back");
    const size_t older[] = {offsetof(kfac_dense_desc, input_group_size),
                            offsetof(kfac_dense_desc, output_group_size)};
    for (size_t i = 0; i < 2; i++) {
        kfac_dense_desc d;
        memset(&d, 0xA5, sizeof d); /* garbage past struct_size: group sizes 0xA5A5... */
        d.struct_size = older[i];
        d.in_features = IN;
        d.out_features = OUT;
        d.has_bias = 1;
        d.reserved = 0;
        if (i == 1) d.input_group_size = 0;
        memset(A, 0, sizeof A);
        memset(G, 0, sizeof G);
        const int ok = dense_factors(&d, IN, OUT, 1, A, G);
        check(ok && full_ok && memcmp(A, A_full, sizeof A) == 0 && memcmp(G, G_full, sizeof G) == 0,
              "kfac_dense_desc with an older struct_size %zu (%s): accepted, the fields past it "
              "read as 0 (factors bitwise those of the ungrouped full struct)", older[i],
              i == 0 ? "no group sizes" : "no output_group_size");
    }
    {
        /* Zero-initialised with only the sizes set, the documented way. */
        kfac_dense_desc d = {sizeof d, .in_features = IN, .out_features = OUT, .has_bias = 1};
        const int ok = dense_factors(&d, IN, OUT, 1, A, G);
        check(ok && memcmp(A, A_full, sizeof A) == 0 && memcmp(G, G_full, sizeof G) == 0,
              "kfac_dense_desc zero-initialised by a designated initialiser: the same layer");
    }
    {
        /* Group sizes not smaller than the features mean no grouping; a real grouping differs. */
        kfac_dense_desc d = full;
        d.input_group_size = IN;
        d.output_group_size = OUT + 5;
        int ok = dense_factors(&d, IN, OUT, 1, A, G);
        check(ok && memcmp(A, A_full, sizeof A) == 0 && memcmp(G, G_full, sizeof G) == 0,
              "kfac_dense_desc with group sizes %d and %d (not smaller than in %d, out %d): no "
              "grouping", IN, OUT + 5, IN, OUT);
        d.input_group_size = 2;
        d.output_group_size = 2;
        ok = dense_factors(&d, IN, OUT, 1, A, G);
        int blocks_ok = ok;
        for (int r = 0; r <= IN; r++)
            for (int c = 0; c <= IN; c++) {
                const int same_block = (r == IN || c == IN) ? r == c : r / 2 == c / 2;
                const double want = same_block ? A_full[r * (IN + 1) + c] : 0.0;
                if (A[r * (IN + 1) + c] != want) blocks_ok = 0;
            }
        for (int r = 0; r < OUT; r++)
            for (int c = 0; c < OUT; c++)
                if (G[r * OUT + c] != (r / 2 == c / 2 ? G_full[r * OUT + c] : 0.0)) blocks_ok = 0;
        check(blocks_ok, "kfac_dense_desc with group sizes 2 and 2: A and G are the full factors' "
                         "blocks (the bias its own 1×1 block), zeros elsewhere");
    }
}


/* 4 -> 6 channels in 2 groups, 3x3 kernel, stride 2, padding 1 on 5x6 NCHW inputs (|T| = 3·3),
 * KFC, channel grouping 1 / 2. */
static const kfac_conv2d_desc CONV_TWIN_A = {
    .struct_size = sizeof(kfac_conv2d_desc), .in_channels = 4, .out_channels = 6,
    .kernel_h = 3, .kernel_w = 3, .stride_h = 2, .stride_w = 2, .padding_h = 1, .padding_w = 1,
    .groups = 2, .input_h = 5, .input_w = 6, .has_bias = 1, .layout = KFAC_LAYOUT_NCHW,
    .approximation = KFAC_CONV_KFC, .input_group_size = 1, .output_group_size = 2};
/* A 1-D convolution (1×7 input, kernel 1×3, padding 1, dilation 2), NHWC, SUA, no bias; stride,
 * dilation_h and groups left 0 (read as 1). */
static const kfac_conv2d_desc CONV_TWIN_B = {
    .struct_size = sizeof(kfac_conv2d_desc), .in_channels = 3, .out_channels = 4,
    .kernel_h = 1, .kernel_w = 3, .padding_w = 1, .dilation_w = 2, .input_h = 1, .input_w = 7,
    .has_bias = 0, .layout = KFAC_LAYOUT_NHWC, .approximation = KFAC_CONV_SUA};
static const model_t CONV_TWIN_MODEL = {
    3, {{5, 4, 1, NULL}, {4, 6, 1, &CONV_TWIN_A}, {3, 4, 0, &CONV_TWIN_B}}};

void test_conv_errors(int dtype) {
    twins_t t = twins_new_model(dtype, dtype == KFAC_FLOAT32 ? 303 : 404, &CONV_TWIN_MODEL);
    kfac_optimizer *B = t.h[1];
    const int dt = dtype, od = other_dtype(dtype);
    char what[256];
    section(dt == KFAC_FLOAT32 ? "float32 handle with convolutions: layer info, error paths"
                               : "float64 handle with convolutions: layer info, error paths");

    /* Layer info of the convolutions. */
    kfac_layer_info info;
    memset(&info, 0xFF, sizeof info);
    info.struct_size = sizeof info;
    int st = kfac_layer_get_info(B, 1, &info);
    check(st == KFAC_OK && info.struct_size == sizeof info && info.kind == KFAC_LAYER_CONV2D &&
              info.has_bias == 1 && info.in_features == 4 && info.out_features == 6 &&
              info.a_dim == 2 * 9 + 1 && info.g_dim == 3 && info.groups == 2 &&
              info.has_factors == 0 && info.has_inverses == 0,
          "[%s] kfac_layer_get_info(conv 4->6, 3x3, groups 2): kind CONV2D, a_dim 19, g_dim 3, "
          "groups 2 (got kind %d, a_dim %lld, g_dim %lld, groups %lld)", dtype_tag(dt), info.kind,
          (long long)info.a_dim, (long long)info.g_dim, (long long)info.groups);
    memset(&info, 0xFF, sizeof info);
    info.struct_size = sizeof info;
    st = kfac_layer_get_info(B, 2, &info);
    check(st == KFAC_OK && info.kind == KFAC_LAYER_CONV2D && info.has_bias == 0 &&
              info.a_dim == 3 * 3 && info.g_dim == 4 && info.groups == 1,
          "[%s] kfac_layer_get_info(1-D conv 3->4, kernel 3, no bias, groups 0 = 1): a_dim 9, "
          "g_dim 4, groups 1", dtype_tag(dt));
    memset(&info, 0xFF, sizeof info);
    info.struct_size = sizeof info;
    st = kfac_layer_get_info(B, 0, &info);
    check(st == KFAC_OK && info.kind == KFAC_LAYER_DENSE && info.groups == 1,
          "[%s] kfac_layer_get_info(dense): groups 1", dtype_tag(dt));
    /* A caller compiled before `groups` existed: the library fills up to has_inverses only. */
    memset(&info, 0xEE, sizeof info);
    info.struct_size = offsetof(kfac_layer_info, groups);
    st = kfac_layer_get_info(B, 1, &info);
    const unsigned char *tail = (const unsigned char *)&info + offsetof(kfac_layer_info, groups);
    int untouched = 1;
    for (size_t i = 0; i < sizeof info - offsetof(kfac_layer_info, groups); i++)
        if (tail[i] != 0xEE) untouched = 0;
    check(st == KFAC_OK && info.struct_size == offsetof(kfac_layer_info, groups) &&
              info.a_dim == 19 && info.has_inverses == 0 && untouched,
          "[%s] kfac_layer_get_info with the older struct_size %zu (no `groups`): fills the "
          "older fields, reports struct_size %zu, leaves `groups` alone", dtype_tag(dt),
          offsetof(kfac_layer_info, groups), (size_t)info.struct_size);

    char why[512] = "";
    int ok = 1;
    for (int r = 0; ok && r < 3; r++) ok = twins_round(&t, why, sizeof why);
    check(ok, "[%s] three valid rounds on twins with a dense, a grouped conv and a 1-D conv "
              "layer: identical directions%s%s", dtype_tag(dt), ok ? "" : ": ", why);

    /* kfac_layer_get_factors on the convolutions. */
    buf_t a = buf_new(dt, 19 * 19), g = buf_new(dt, 16), ao = buf_new(od, 19 * 19),
          go = buf_new(od, 16);
    buf_random(&a, &t.rng);
    buf_random(&g, &t.rng);
    buf_t a0 = buf_clone(&a), g0 = buf_clone(&g), ao0 = buf_clone(&ao), go0 = buf_clone(&go);
    const struct {
        int32_t layer, group;
    } bad_groups[] = {{1, 2}, {1, -1}, {1, INT32_MAX}, {1, INT32_MIN}, {2, 1}, {2, -1}};
    for (size_t i = 0; i < sizeof bad_groups / sizeof bad_groups[0]; i++) {
        snprintf(what, sizeof what, "kfac_layer_get_factors(layer %d with %d group(s), group %d)",
                 (int)bad_groups[i].layer, bad_groups[i].layer == 1 ? 2 : 1, (int)bad_groups[i].group);
        st = bad_call(B, get_group_factors(B, bad_groups[i].layer, bad_groups[i].group, &a, &g));
        after_bad(&t, st, KFAC_ERROR_INVALID_ARGUMENT, what, i < 2, buf_same(&a, &a0) && buf_same(&g, &g0));
    }
    snprintf(what, sizeof what, "kfac_layer_get_factors_%s(conv layer) on a %s handle", dtype_tag(od),
             dtype_tag(dt));
    st = bad_call(B, get_group_factors(B, 1, 1, &ao, &go));
    after_bad(&t, st, KFAC_ERROR_DTYPE_MISMATCH, what, 0, buf_same(&ao, &ao0) && buf_same(&go, &go0));
    {
        buf_t a1 = buf_clone(&a), g1 = buf_clone(&g), a2 = buf_clone(&a), g2 = buf_clone(&g);
        const int got = get_group_factors(B, 1, 0, &a1, &g1) == KFAC_OK &&
                        get_group_factors(B, 1, 1, &a2, &g2) == KFAC_OK &&
                        get_factors(B, 1, &a, &g) == KFAC_OK;
        check(got && !buf_same(&a1, &a2) && buf_same(&a, &a1) && buf_same(&g, &g1),
              "[%s] groups 0 and 1 of the conv layer differ; kfac_layer_get_factors returns group 0",
              dtype_tag(dt));
        buf_free(&a1);
        buf_free(&g1);
        buf_free(&a2);
        buf_free(&g2);
    }

    /* Layers cannot be added after statistics. */
    int32_t id = -77;
    st = bad_call(B, kfac_layer_add_conv2d(B, &CONV_TWIN_A, &id));
    after_bad(&t, st, KFAC_ERROR_LAYERS_FROZEN, "kfac_layer_add_conv2d after recording", 1,
              id == -77 && layer_count(B) == 3);
    st = bad_call(B, add_dense_grouped(B, 3, 3, 1, 1, 1, &id));
    after_bad(&t, st, KFAC_ERROR_LAYERS_FROZEN, "kfac_layer_add_dense after recording", 1,
              id == -77 && layer_count(B) == 3);

    /* Record calls on the convolutions (rows = examples). */
    for (int side = 0; side < 2; side++) {
        const char *fn = side == 0 ? "kfac_layer_record_inputs" : "kfac_layer_record_output_grads";
        int (*rec)(kfac_optimizer *, int32_t, const buf_t *, int64_t) =
            side == 0 ? record_inputs : record_grads;
        for (int l = 1; l < 3; l++) {
            const size_t per = (size_t)(side == 0 ? spec_x_values(&t.model.l[l])
                                                  : spec_g_values(&t.model.l[l]));
            buf_t x = buf_new(dt, 2 * per), xo = buf_new(od, 2 * per);
            buf_random(&x, &t.rng);
            buf_random(&xo, &t.rng);
            const struct {
                int64_t rows;
                int want;
                const char *name;
            } sizes[] = {
                {0, KFAC_ERROR_INVALID_SIZE, "0"},
                {-2, KFAC_ERROR_INVALID_SIZE, "-2"},
                {INT64_MAX, KFAC_ERROR_SIZE_OVERFLOW, "INT64_MAX"},
                {(int64_t)1 << 62, KFAC_ERROR_SIZE_OVERFLOW, "1<<62"},
            };
            for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
                snprintf(what, sizeof what, "%s(conv layer %d, examples = %s)", fn, l, sizes[i].name);
                BAD(rec(B, l, &x, sizes[i].rows), sizes[i].want, what);
            }
            snprintf(what, sizeof what, "%s_%s(conv layer %d) on a %s handle", fn, dtype_tag(od), l,
                     dtype_tag(dt));
            BAD(rec(B, l, &xo, 2), KFAC_ERROR_DTYPE_MISMATCH, what);
            buf_set(&x, 2 * per - 1, side == 0 ? NAN : -INFINITY);
            snprintf(what, sizeof what, "%s(conv layer %d, %s in the last value of 2 examples)", fn, l,
                     side == 0 ? "NaN" : "-Inf");
            BAD(rec(B, l, &x, 2), KFAC_ERROR_NON_FINITE, what);
            buf_free(&x);
            buf_free(&xo);
        }
    }

    /* Steps with a non-finite conv gradient: nothing written, counter unchanged. */
    for (int c = 0; c < 3; c++) {
        if (!twins_record(&t)) check(0, "[%s] twins_record before a bad step", dtype_tag(dt));
        grads_t gr = grads_new(dt, &t.model, &t.rng);
        const char *name = "";
        switch (c) {
        case 0:
            buf_set(&gr.w[1], gr.w[1].n - 1, NAN);
            name = "kfac_optimizer_step(NaN in the last weight of group 1 of the conv layer)";
            break;
        case 1:
            buf_set(&gr.b[1], 3, INFINITY);
            name = "kfac_optimizer_step(Inf in a bias of group 1 of the conv layer)";
            break;
        case 2:
            buf_set(&gr.w[2], 0, -INFINITY);
            name = "kfac_optimizer_step(-Inf in the 1-D conv layer's first weight)";
            break;
        }
        grads_t gr0 = grads_clone(&gr);
        const int64_t k = step_count(B);
        st = bad_call(B, step(B, &gr));
        after_bad(&t, st, KFAC_ERROR_NON_FINITE, name, 1, grads_same(&gr, &gr0) && step_count(B) == k);
        grads_free(&gr);
        grads_free(&gr0);
    }

    /* kfac_layer_precondition on the convolutions: bias rules. */
    {
        grads_t gr = grads_new(dt, &t.model, &t.rng), gr0 = grads_clone(&gr);
        st = bad_call(B, precondition(B, 2, &gr.w[2], &gr.w[0]));
        after_bad(&t, st, KFAC_ERROR_INVALID_ARGUMENT,
                  "kfac_layer_precondition(1-D conv layer without bias, bias_grad given)", 1, grads_same(&gr, &gr0));
        st = bad_call(B, precondition(B, 1, &gr.w[1], NULL));
        after_bad(&t, st, KFAC_ERROR_NULL_POINTER,
                  "kfac_layer_precondition(conv layer with bias, bias_grad = NULL)", 1, grads_same(&gr, &gr0));
        grads_free(&gr);
        grads_free(&gr0);
    }

    /* State images of handles whose convolution differs in one respect. */
    size_t size;
    unsigned char *img = save_image(B, &size);
    for (int c = 0; c < 7; c++) {
        kfac_conv2d_desc d = CONV_TWIN_A;
        const char *name = "";
        switch (c) {
        case 0: d.stride_w = 1; name = "stride"; break;
        case 1: d.padding_h = 0; name = "padding"; break;
        case 2: d.approximation = KFAC_CONV_SUA; name = "approximation"; break;
        case 3: d.layout = KFAC_LAYOUT_NHWC; name = "layout"; break;
        case 4: d.input_w = 7; name = "input width"; break;
        case 5: d.output_group_size = 0; name = "output grouping"; break;
        case 6: d.groups = 1; name = "groups"; break;
        }
        model_t m = CONV_TWIN_MODEL;
        m.l[1].conv = &d;
        kfac_optimizer *o = make_handle(dt, &m);
        size_t osize;
        unsigned char *oimg = save_image(o, &osize);
        snprintf(what, sizeof what, "kfac_state_load(image of a handle whose conv layer differs in %s)", name);
        if (oimg) BAD(kfac_state_load(B, oimg, osize), KFAC_ERROR_STATE_MISMATCH, what);
        free(oimg);
        kfac_optimizer_free(o);
    }
    /* ... and a round trip through an image restores the conv layers' state exactly. */
    if (img) {
        twins_round(&t, why, sizeof why);
        const int restored = kfac_state_load(t.h[0], img, size) == KFAC_OK &&
                             kfac_state_load(B, img, size) == KFAC_OK && same_state(t.h[0], B) &&
                             twins_round(&t, why, sizeof why);
        check(restored, "[%s] both twins restored from an earlier image continue identically%s%s",
              dtype_tag(dt), restored ? "" : ": ", why);
    }
    free(img);

    buf_free(&a);
    buf_free(&g);
    buf_free(&ao);
    buf_free(&go);
    buf_free(&a0);
    buf_free(&g0);
    buf_free(&ao0);
    buf_free(&go0);
    twins_free(&t);
}

/* The growable kfac_conv2d_desc: an older caller's smaller struct_size (fields past it read as
 * 0, whatever bytes follow), zeros read as 1 for stride, dilation and groups, and group sizes not
 * smaller than the channel count meaning no grouping. Handles are compared through their state
 * images (which hold the layer descriptions) or their factors after identical records. */
void test_conv_desc_compat(void) {
    section("kfac_conv2d_desc: struct_size, defaults, group sizes");
    /* The reference: struct_size = sizeof, grouping 0, explicit ones. */
    kfac_conv2d_desc full = base_conv();
    full.stride_h = 2;
    full.padding_w = 1;
    full.input_group_size = full.output_group_size = 0;
    kfac_optimizer *ref = NULL, *h = NULL;
    int32_t id = -1;
    REQUIRE_OK(ref, kfac_optimizer_create(KFAC_FLOAT64, &ref));
    REQUIRE_OK(ref, kfac_layer_add_conv2d(ref, &full, &id));

    /* An older caller: its struct ends at `reserved`; the bytes after it are someone else's. */
    union {
        kfac_conv2d_desc d;
        unsigned char bytes[sizeof(kfac_conv2d_desc)];
    } old;
    memset(old.bytes, 0xFF, sizeof old.bytes); /* input/output_group_size = -1 if they were read */
    memcpy(old.bytes, &full, offsetof(kfac_conv2d_desc, input_group_size));
    old.d.struct_size = offsetof(kfac_conv2d_desc, input_group_size);
    REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));
    int st = kfac_layer_add_conv2d(h, &old.d, &id);
    check(st == KFAC_OK && id == 0 && same_state(ref, h),
          "struct_size = offsetof(input_group_size) = %zu (an older caller): accepted, the "
          "grouping fields read as 0 although the bytes after the struct are 0xFF (got %s: %s)",
          offsetof(kfac_conv2d_desc, input_group_size), status_name(st), kfac_optimizer_last_error(h));
    kfac_optimizer_free(h);

    /* stride, dilation and groups 0 read as 1. */
    kfac_conv2d_desc zeros = full;
    full.groups = 1;
    zeros.groups = 0;
    zeros.stride_w = 0;
    zeros.dilation_h = zeros.dilation_w = 0;
    kfac_optimizer *ones = NULL;
    REQUIRE_OK(ones, kfac_optimizer_create(KFAC_FLOAT64, &ones));
    REQUIRE_OK(ones, kfac_layer_add_conv2d(ones, &full, &id));
    h = NULL;
    REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));
    st = kfac_layer_add_conv2d(h, &zeros, &id);
    check(st == KFAC_OK && same_state(ones, h),
          "stride_w, dilation_h, dilation_w and groups given as 0 read as 1 (same state as a "
          "handle given 1s)");
    kfac_optimizer_free(h);
    kfac_optimizer_free(ones);

    /* A kernel that exactly fits the padded input is valid (one output position). */
    kfac_conv2d_desc fit = base_conv();
    fit.kernel_h = 7;
    fit.padding_h = 1;
    fit.kernel_w = 3;
    fit.dilation_w = 2; /* spans 5 = input_w */
    h = NULL;
    REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT32, &h));
    kfac_layer_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    st = kfac_layer_add_conv2d(h, &fit, &id);
    check(st == KFAC_OK && kfac_layer_get_info(h, 0, &info) == KFAC_OK && info.a_dim == 2 * 21 + 1,
          "a 7x3 kernel (dilation_w 2) that exactly fits the padded 7x5 input is accepted (got %s)",
          status_name(st));
    kfac_optimizer_free(h);

    /* Group sizes not smaller than the channel count mean no grouping: the factors after
     * identical records equal those of an ungrouped layer. Huge sizes too (run isolated: an
     * unchecked product of the group size and kh·kw would overflow). */
    const int64_t sizes[][2] = {{2, 3}, {3, 100}, {(int64_t)1 << 40, (int64_t)1 << 40},
                                {(int64_t)1 << 62, 5}, {INT64_MAX, INT64_MAX}};
    for (int approximation = KFAC_CONV_KFC; approximation <= KFAC_CONV_SUA; approximation++) {
        kfac_conv2d_desc plain = base_conv(); /* 2 input and 3 output channels per group */
        plain.approximation = approximation;
        plain.padding_h = plain.padding_w = 1;
        rng_t r = {77};
        buf_t x = buf_new(KFAC_FLOAT64, 3 * 4 * 5 * 5), g = buf_new(KFAC_FLOAT64, 3 * 6 * 5 * 5);
        buf_random(&x, &r);
        buf_random(&g, &r);
        buf_t a0 = buf_new(KFAC_FLOAT64, 19 * 19), g0 = buf_new(KFAC_FLOAT64, 9);
        buf_t a1 = buf_new(KFAC_FLOAT64, 19 * 19), g1 = buf_new(KFAC_FLOAT64, 9);
        kfac_optimizer *base = NULL;
        REQUIRE_OK(base, kfac_optimizer_create(KFAC_FLOAT64, &base));
        REQUIRE_OK(base, kfac_layer_add_conv2d(base, &plain, &id));
        REQUIRE_OK(base, record_inputs(base, 0, &x, 3));
        REQUIRE_OK(base, record_grads(base, 0, &g, 3));
        REQUIRE_OK(base, kfac_optimizer_update_factors(base));
        REQUIRE_OK(base, get_group_factors(base, 0, 1, &a0, &g0));
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            kfac_conv2d_desc d = plain;
            d.input_group_size = sizes[i][0];
            d.output_group_size = sizes[i][1];
            char what[200];
            snprintf(what, sizeof what, "%s conv with 2/3 channels per group, group sizes %lld/%lld",
                     approximation == KFAC_CONV_KFC ? "KFC" : "SUA", (long long)sizes[i][0],
                     (long long)sizes[i][1]);
            h = NULL;
            REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));
            if (!survives_in_child(h, call_add_conv2d, &d, what)) {
                kfac_optimizer_free(h);
                continue;
            }
            st = kfac_layer_add_conv2d(h, &d, &id);
            const int same = st == KFAC_OK && record_inputs(h, 0, &x, 3) == KFAC_OK &&
                             record_grads(h, 0, &g, 3) == KFAC_OK && kfac_optimizer_update_factors(h) == KFAC_OK &&
                             get_group_factors(h, 0, 1, &a1, &g1) == KFAC_OK &&
                             buf_same(&a0, &a1) && buf_same(&g0, &g1);
            check(same, "%s: accepted, no grouping (factors bitwise equal to the ungrouped layer's; "
                        "got %s)", what, status_name(st));
            kfac_optimizer_free(h);
        }
        kfac_optimizer_free(base);
        buf_free(&x);
        buf_free(&g);
        buf_free(&a0);
        buf_free(&g0);
        buf_free(&a1);
        buf_free(&g1);
    }
    kfac_optimizer_free(ref);
}
