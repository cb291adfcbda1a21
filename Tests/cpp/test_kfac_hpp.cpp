// Tests of include/kfac.hpp: every failure path turns the C status and the handle's message
// into kfac::error (status, function, message), results come back through return values, the
// handle is owned (move-only), the parameter table reads as through C, and a training step
// works. Built and run by `make test-cpp` (against .build/release) and by the C++ install check
// (against an installed prefix, through pkg-config).
#define KFAC_EXPERIMENTAL_API
#include <kfac.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

static int failures = 0, checks = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        ++checks;                                                                        \
        if (!(cond)) {                                                                   \
            ++failures;                                                                  \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                                \
    } while (0)

// Runs `call`, which must throw kfac::error with `status` from C function `function`; returns
// the error's message.
template <class Call>
static std::string expect_error(Call call, int status, const char *function) {
    try {
        call();
    } catch (const kfac::error &e) {
        CHECK(e.status() == status);
        CHECK(std::strcmp(e.function(), function) == 0);
        CHECK(!e.message().empty());
        CHECK(std::string(e.what()).find(e.message()) != std::string::npos);
        CHECK(std::string(e.what()).find(kfac_status_string(status)) != std::string::npos);
        if (e.status() != status || std::strcmp(e.function(), function) != 0)
            std::fprintf(stderr, "  got %s\n", e.what());
        return e.message();
    }
    ++checks;
    ++failures;
    std::fprintf(stderr, "no kfac::error thrown, expected %s from %s\n", kfac_status_string(status), function);
    return "";
}

static void test_errors() {
    // Creation without a handle: the message is the status string.
    CHECK(expect_error([] { kfac::optimizer bad(99); }, KFAC_ERROR_INVALID_ARGUMENT, "kfac_optimizer_create") ==
          kfac_status_string(KFAC_ERROR_INVALID_ARGUMENT));
    CHECK(expect_error([] { kfac::param_get_info(9999); }, KFAC_ERROR_UNKNOWN_PARAMETER, "kfac_param_get_info") ==
          kfac_status_string(KFAC_ERROR_UNKNOWN_PARAMETER));
    CHECK(expect_error([] { kfac::sample_targets<float>(nullptr, 1, 1, KFAC_DIST_CATEGORICAL, 0, nullptr); },
                       KFAC_ERROR_NULL_POINTER, "kfac_sample_targets_f32") != "");

    kfac::optimizer opt(KFAC_FLOAT32);
    // With a handle: the message is kfac_optimizer_last_error, exactly.
    auto desc = kfac::dense_desc();
    desc.in_features = 0;
    desc.out_features = 3;
    std::string message = expect_error([&] { opt.layer_add_dense(desc); }, KFAC_ERROR_INVALID_SIZE, "kfac_layer_add_dense");
    CHECK(message == opt.last_error());
    message = expect_error([&] { opt.param_set_double(KFAC_PARAM_DAMPING, -1.0); }, KFAC_ERROR_PARAMETER_RANGE,
                           "kfac_param_set_double");
    CHECK(message == opt.last_error());
    expect_error([&] { opt.param_set_int(KFAC_PARAM_DAMPING, 1); }, KFAC_ERROR_PARAMETER_TYPE, "kfac_param_set_int");
    expect_error([&] { opt.get_kl_scale(); }, KFAC_ERROR_NO_STEP, "kfac_optimizer_get_kl_scale");
    expect_error([&] { opt.adaptive_get_reduction_ratio(); }, KFAC_ERROR_NO_STEP, "kfac_adaptive_get_reduction_ratio");
    expect_error([&] { opt.adaptive_skip_loss_report(); }, KFAC_ERROR_NO_STEP, "kfac_adaptive_skip_loss_report");
    opt.param_set_int(KFAC_PARAM_LM_INTERVAL, 1);
    CHECK(opt.adaptive_get_report_needed());   // interval 1: every report adjusts λ
    opt.param_set_int(KFAC_PARAM_LM_INTERVAL, 0);
    CHECK(!opt.adaptive_get_report_needed());  // interval 0: none does
    expect_error([&] { opt.layer_get_info(7); }, KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_get_info");
    expect_error([&] { opt.state_load_file("/nonexistent/dir/state.bin"); }, KFAC_ERROR_IO, "kfac_state_load_file");

    desc.in_features = 4;
    const int32_t layer = opt.layer_add_dense(desc);
    CHECK(layer == 0 && opt.layer_count() == 1);
    std::vector<double> rows64(8, 0.5);
    expect_error([&] { opt.layer_record_inputs(layer, rows64.data(), 2); }, KFAC_ERROR_DTYPE_MISMATCH,
                 "kfac_layer_record_inputs_f64");
    std::vector<float> w(12, 0.1f);
    float *weights[] = {w.data()};
    expect_error([&] { opt.step(weights); }, KFAC_ERROR_NO_STATISTICS, "kfac_optimizer_step_f32");
    expect_error([&] { opt.curvature_multiply(1, weights); }, KFAC_ERROR_NO_STATISTICS, "kfac_curvature_multiply_f32");
    std::vector<float> x4(8, 0.5f), g3(6, 0.25f), s(12, -1.0f);
    expect_error([&] { opt.layer_record_examples(layer, x4.data(), g3.data(), 2, 3); }, KFAC_ERROR_INVALID_SIZE,
                 "kfac_layer_record_examples_f32");
    expect_error([&] { opt.layer_get_ekfac_scaling(layer, 0, s.data()); }, KFAC_ERROR_NO_INVERSES,
                 "kfac_layer_get_ekfac_scaling_f32");
    {  // EKFAC through the wrapper: paired rows, then S of out × (in + 1) non-negative values.
        kfac::optimizer e(KFAC_FLOAT32);
        auto d = kfac::dense_desc();
        d.in_features = 4;
        d.out_features = 3;
        d.has_bias = 1;
        e.param_set_int(KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC);
        const int32_t id = e.layer_add_dense(d);
        std::vector<float> xs{0.5f, -1, 2, 0.25f, 1, 0.5f, -0.5f, 1.5f}, gs{0.1f, -0.2f, 0.3f, 0.2f, 0.1f, -0.4f};
        e.layer_record_examples(id, xs.data(), gs.data(), 2, 1);
        e.update_factors();
        e.update_inverses();
        std::vector<float> scaling(15, -1.0f);
        e.layer_get_ekfac_scaling(id, 0, scaling.data());
        bool nonnegative = true;
        for (float v : scaling) nonnegative = nonnegative && v >= 0;
        CHECK(nonnegative);
    }
    // The one check of the wrapper's own: a bias span must be empty or as long as the weights.
    float *two_biases[] = {w.data(), w.data()};
    expect_error([&] { opt.step(weights, two_biases); }, KFAC_ERROR_INVALID_SIZE, "kfac_optimizer_step_f32");
    // A failed call left the handle as it was.
    CHECK(opt.get_step_count() == 0);
    CHECK(opt.param_get_double(KFAC_PARAM_DAMPING) == kfac::param_get_info(KFAC_PARAM_DAMPING).default_value);
}

static void test_ownership() {
    static_assert(!std::is_copy_constructible_v<kfac::optimizer>, "move-only");
    static_assert(std::is_nothrow_move_constructible_v<kfac::optimizer>, "movable");
    kfac::optimizer a(KFAC_FLOAT64);
    kfac_optimizer *handle = a.get();
    kfac::optimizer b(std::move(a));
    CHECK(a.get() == nullptr && b.get() == handle);
    CHECK(b.get_dtype() == KFAC_FLOAT64);
    kfac::optimizer c(KFAC_FLOAT32);
    c = std::move(b);  // frees c's own handle
    CHECK(c.get() == handle && b.get() == nullptr);
    kfac_optimizer *raw = c.release();
    CHECK(c.get() == nullptr);
    kfac::optimizer d = kfac::optimizer::adopt(raw);
    CHECK(d.get_dtype() == KFAC_FLOAT64);
    // A moved-from handle is NULL: calls fail as the C functions do with NULL.
    expect_error([&] { a.layer_count(); }, KFAC_ERROR_NULL_POINTER, "kfac_layer_count");
}

static void test_parameter_table() {
    const std::vector<int32_t> ids = kfac::param_list();
    int32_t count = 0;
    CHECK(kfac_param_list(nullptr, 0, &count) == KFAC_OK && ids.size() == static_cast<std::size_t>(count));
    kfac::optimizer opt(KFAC_FLOAT64);
    for (int32_t id : ids) {
        kfac_param_info c_info{};
        c_info.struct_size = sizeof c_info;
        CHECK(kfac_param_get_info(id, &c_info) == KFAC_OK);
        const kfac_param_info info = kfac::param_get_info(id);
        CHECK(std::strcmp(info.name, c_info.name) == 0 && info.type == c_info.type && info.family == c_info.family);
        CHECK(info.lower == c_info.lower && info.upper == c_info.upper && info.effect == c_info.effect);
        if (info.type == KFAC_PARAM_TYPE_DOUBLE)
            CHECK(opt.param_get_double(id) == info.default_value);
        else
            CHECK(static_cast<double>(opt.param_get_int(id)) == info.default_value);
    }
    CHECK(ids.size() >= 16);
}

static void test_training_steps() {
    // Least squares with one dense layer; the loss must go down.
    const int n = 32, in = 5, out = 2;
    std::vector<float> x(n * in), y(n * out), w(out * in, 0.0f), b(out, 0.0f), r(n * out), dw(out * in), db(out);
    for (int i = 0; i < n * in; ++i) x[i] = std::sin(0.7f * i);
    for (int i = 0; i < n; ++i)
        for (int o = 0; o < out; ++o) y[i * out + o] = x[i * in + o] - 0.5f * x[i * in + 4] + 0.1f * o;
    kfac::optimizer opt(KFAC_FLOAT32);
    opt.param_set_double(KFAC_PARAM_DAMPING, 1e-2);
    opt.param_set_double(KFAC_PARAM_KL_CLIP, 0.0);
    auto desc = kfac::dense_desc();
    desc.in_features = in;
    desc.out_features = out;
    desc.has_bias = 1;
    const int32_t layer = opt.layer_add_dense(desc);
    double first = 0, last = 0;
    for (int step = 0; step < 10; ++step) {
        double loss = 0;
        for (int i = 0; i < n; ++i)
            for (int o = 0; o < out; ++o) {
                float s = b[o];
                for (int k = 0; k < in; ++k) s += w[o * in + k] * x[i * in + k];
                r[i * out + o] = s - y[i * out + o];
                loss += 0.5 * r[i * out + o] * r[i * out + o] / n;
            }
        (step == 0 ? first : last) = loss;
        for (int o = 0; o < out; ++o) {
            db[o] = 0;
            for (int k = 0; k < in; ++k) dw[o * in + k] = 0;
            for (int i = 0; i < n; ++i) {
                db[o] += r[i * out + o] / n;
                for (int k = 0; k < in; ++k) dw[o * in + k] += r[i * out + o] * x[i * in + k] / n;
            }
        }
        if (opt.wants_statistics()) {
            opt.layer_record_inputs(layer, x.data(), n);
            opt.layer_record_output_grads(layer, r.data(), n);
        }
        opt.step({dw.data()}, {db.data()});
        for (int i = 0; i < out * in; ++i) w[i] -= 0.1f * dw[i];
        for (int o = 0; o < out; ++o) b[o] -= 0.1f * db[o];
    }
    CHECK(opt.get_step_count() == 10);
    CHECK(opt.get_kl_scale() == 1.0);
    CHECK(last < 0.5 * first);
    const kfac_layer_info info = opt.layer_get_info(layer);
    CHECK(info.kind == KFAC_LAYER_DENSE && info.a_dim == in + 1 && info.g_dim == out && info.has_inverses == 1);
    std::vector<float> a(info.a_dim * info.a_dim), g(info.g_dim * info.g_dim);
    opt.layer_get_factors(layer, 0, a.data(), g.data());
    CHECK(a[a.size() - 1] == 1.0f);  // the bias coordinate's second moment
    // State round trip through a buffer.
    std::vector<unsigned char> image(opt.state_get_size());
    CHECK(opt.state_save(image.data(), image.size()) == image.size());
    kfac::optimizer copy(KFAC_FLOAT32);
    copy.layer_add_dense(desc);
    copy.state_load(image.data(), image.size());
    CHECK(copy.get_step_count() == 10);
    std::printf("training: loss %.4f -> %.4f in 10 steps\n", first, last);
}

// The experimental Gauss-Newton wrappers: a one-layer linear chain with Gaussian output, where
// G·v = (1/N) Σ_n v x_n x_nᵀ (weights) exactly; columns from the chain give the same product.
static void test_gauss_newton() {
    kfac::optimizer opt(KFAC_FLOAT64);
    kfac_dense_desc desc = kfac::dense_desc();
    desc.in_features = 2;
    desc.out_features = 1;
    opt.layer_add_dense(desc);
    const double x[4] = {1, 2, 3, -1}, w[2] = {0.5, -0.25}, v[2] = {1, 2};
    double z[2], p1[2], p2[2];
    const int32_t layers[1] = {0}, acts[1] = {KFAC_ACTIVATION_IDENTITY};
    opt.gn_chain_define(layers, acts, KFAC_DIST_GAUSSIAN);
    const double *ws[1] = {w}, *xs[1] = {x}, *vs[1] = {v};
    double *p1s[1] = {p1}, *p2s[1] = {p2};
    opt.gn_chain_forward(ws, {}, xs, {}, 2, z);
    CHECK(z[0] == 0.0 && z[1] == 1.75);
    opt.gn_chain_multiply(vs, {}, p1s, {});
    // (1/2)·Σ_n (vᵀx_n) x_nᵀ = ((5)·(1, 2) + (1)·(3, −1)) / 2 = (4, 4.5).
    CHECK(std::fabs(p1[0] - 4) < 1e-14 && std::fabs(p1[1] - 4.5) < 1e-14);
    opt.gn_chain_record_columns(KFAC_COLUMNS_PRODUCT);
    CHECK(opt.gn_columns_get_info().examples == 2 && opt.gn_columns_get_info().k == 1);
    opt.gn_columns_multiply(vs, {}, p2s, {});
    CHECK(std::fabs(p2[0] - 4) < 1e-14 && std::fabs(p2[1] - 4.5) < 1e-14);
    double s[4];
    kfac::gn_output_hessian_sqrt(z, 2, 1, KFAC_DIST_GAUSSIAN, s);
    CHECK(s[0] == 1.0 && s[1] == 1.0);
    kfac::gn_output_hessian_multiply(z, z, 2, 1, KFAC_DIST_GAUSSIAN, s);
    CHECK(s[1] == 1.75);
    opt.layer_record_output_grad_columns(0, x, s, 2, 1, KFAC_COLUMNS_FACTOR);
    opt.gn_columns_clear();
    expect_error([&] { opt.gn_columns_multiply(vs, {}, p2s, {}); }, KFAC_ERROR_NO_COLUMNS, "kfac_gn_columns_multiply_f64");
    // KFRA of the linear Gaussian chain: Ḡ = I (1×1), A from the chain's inputs.
    opt.gn_chain_record_kfra(KFAC_KFRA_GGN, true, static_cast<const double *>(nullptr));
    expect_error([&] { opt.gn_chain_record_kfra(KFAC_KFRA_HESSIAN, false, static_cast<const double *>(nullptr)); },
                 KFAC_ERROR_NULL_POINTER, "kfac_gn_chain_record_kfra_f64");
    const float gf[2] = {0.5f, 1.0f};
    expect_error([&] { opt.gn_chain_record_kfra(KFAC_KFRA_HESSIAN, false, gf); }, KFAC_ERROR_DTYPE_MISMATCH,
                 "kfac_gn_chain_record_kfra_f32");
    std::printf("gauss-newton: chain and column products %.2f %.2f\n", p1[0], p2[1]);
}

// The distributed wrappers: two handles, each recording half a batch, a sum of their packed
// buffers as the allreduce; their directions are bit-identical and close to one handle's.
// distributed_synchronize in a world of one: the collective (the identity, counting its calls)
// runs for the statistics and the inverses, and the directions equal a handle's without any
// exchange bitwise; a collective returning non-zero throws CALLBACK.
static int identity_allreduce(double *, int64_t, void *user) {
    ++*static_cast<int *>(user);
    return 0;
}
static int failing_allreduce(double *, int64_t, void *) { return 3; }

static void test_distributed_synchronize() {
    auto desc = kfac::dense_desc();
    desc.in_features = 4;
    desc.out_features = 3;
    desc.has_bias = 1;
    kfac::optimizer alone(KFAC_FLOAT64), synced(KFAC_FLOAT64);
    std::vector<double> x(5 * 4), g(5 * 3);
    for (std::size_t i = 0; i < x.size(); i++) x[i] = std::sin(3.0 + double(i));
    for (std::size_t i = 0; i < g.size(); i++) g[i] = std::cos(1.0 + double(i));
    for (auto *o : {&alone, &synced}) {
        o->layer_add_dense(desc);
        o->layer_record_inputs(0, x.data(), 5);
        o->layer_record_output_grads(0, g.data(), 5);
    }
    int calls = 0;
    kfac_collectives failing = {sizeof(kfac_collectives), nullptr, nullptr, failing_allreduce, nullptr, nullptr};
    expect_error([&] { synced.distributed_synchronize(failing); }, KFAC_ERROR_CALLBACK, "kfac_distributed_synchronize");
    kfac_collectives identity = {sizeof(kfac_collectives), &calls, nullptr, identity_allreduce, nullptr, nullptr};
    synced.distributed_synchronize(identity);
    CHECK(calls == 2);
    std::vector<double> w[2], bias[2];
    kfac::optimizer *both[] = {&alone, &synced};
    for (int k = 0; k < 2; k++) {
        w[k].assign(12, 0.25);
        bias[k].assign(3, -0.5);
        double *wp[] = {w[k].data()}, *bp[] = {bias[k].data()};
        both[k]->step(wp, bp);
    }
    CHECK(w[0] == w[1] && bias[0] == bias[1]);
    CHECK(w[0][0] != 0.25);
}

// The gathered inverse exchange: two ranks, statistics summed, inverses as the concatenation of
// each rank's own segment; directions bit-identical and equal to one handle's on the union batch.
static void test_distributed_gathered() {
    auto desc = kfac::dense_desc();
    desc.in_features = 4;
    desc.out_features = 3;
    desc.has_bias = 1;
    kfac::optimizer ref(KFAC_FLOAT64), r0(KFAC_FLOAT64), r1(KFAC_FLOAT64);
    kfac::optimizer *all[] = {&ref, &r0, &r1};
    for (auto *o : all) o->layer_add_dense(desc);
    r0.distributed_set_world(0, 2);
    r1.distributed_set_world(1, 2);
    std::vector<double> x(6 * 4), g(6 * 3);
    for (std::size_t i = 0; i < x.size(); i++) x[i] = std::sin(0.5 + double(i));
    for (std::size_t i = 0; i < g.size(); i++) g[i] = std::cos(0.7 + double(i));
    ref.layer_record_inputs(0, x.data(), 6);
    ref.layer_record_output_grads(0, g.data(), 6);
    r0.layer_record_inputs(0, x.data(), 1);
    r0.layer_record_output_grads(0, g.data(), 1);
    r1.layer_record_inputs(0, x.data() + 4, 5);
    r1.layer_record_output_grads(0, g.data() + 3, 5);
    const auto n = static_cast<std::size_t>(r0.distributed_get_count(KFAC_DISTRIBUTED_STATISTICS));
    std::vector<double> a(n), b(n), sum(n);
    r0.distributed_pack_statistics(a);
    r1.distributed_pack_statistics(b);
    for (std::size_t i = 0; i < n; i++) sum[i] = a[i] + b[i];
    r0.distributed_unpack_statistics(sum);
    r1.distributed_unpack_statistics(sum);
    std::vector<int64_t> counts(2), displacements(2);
    r0.distributed_get_inverse_layout(counts, displacements);
    CHECK(displacements[0] == 0 && displacements[1] == counts[0]);
    std::vector<double> gathered(static_cast<std::size_t>(counts[0] + counts[1]));
    r0.distributed_pack_owned_inverses(kfac::span<double>(gathered.data(), static_cast<std::size_t>(counts[0])));
    r1.distributed_pack_owned_inverses(kfac::span<double>(gathered.data() + counts[0], static_cast<std::size_t>(counts[1])));
    r0.distributed_unpack_gathered_inverses(gathered);
    r1.distributed_unpack_gathered_inverses(gathered);
    std::vector<double> w[3], bias[3];
    for (int k = 0; k < 3; k++) {
        w[k].assign(12, 0.25);
        bias[k].assign(3, -0.5);
        double *wp[] = {w[k].data()}, *bp[] = {bias[k].data()};
        all[k]->step(wp, bp);
    }
    CHECK(w[1] == w[2] && bias[1] == bias[2]);
    double worst = 0;
    for (std::size_t i = 0; i < 12; i++) worst = std::max(worst, std::fabs(w[1][i] - w[0][i]) / std::fabs(w[0][i]));
    CHECK(worst < 1e-12);
}

static void test_distributed() {
    auto desc = kfac::dense_desc();
    desc.in_features = 4;
    desc.out_features = 3;
    desc.has_bias = 1;
    kfac::optimizer ref(KFAC_FLOAT64), r0(KFAC_FLOAT64), r1(KFAC_FLOAT64);
    kfac::optimizer *all[] = {&ref, &r0, &r1};
    for (auto *o : all) o->layer_add_dense(desc);
    r0.distributed_set_world(0, 2);
    r1.distributed_set_world(1, 2);
    CHECK(r1.distributed_get_world() == std::make_pair(int32_t(1), int32_t(2)));
    CHECK(r0.distributed_get_owner(0, 0, 0, 0) == r1.distributed_get_owner(0, 0, 0, 0));
    std::vector<double> x(5 * 4), g(5 * 3);
    for (std::size_t i = 0; i < x.size(); i++) x[i] = std::sin(1.0 + double(i));
    for (std::size_t i = 0; i < g.size(); i++) g[i] = std::cos(2.0 + double(i));
    ref.layer_record_inputs(0, x.data(), 5);
    ref.layer_record_output_grads(0, g.data(), 5);
    r0.layer_record_inputs(0, x.data(), 2);
    r0.layer_record_output_grads(0, g.data(), 2);
    r1.layer_record_inputs(0, x.data() + 8, 3);
    r1.layer_record_output_grads(0, g.data() + 6, 3);
    kfac::optimizer *ranks[] = {&r0, &r1};
    for (int32_t what : {int32_t(KFAC_DISTRIBUTED_STATISTICS), int32_t(KFAC_DISTRIBUTED_INVERSES)}) {
        CHECK(r0.distributed_get_due(what));
        const auto n = static_cast<std::size_t>(r0.distributed_get_count(what));
        std::vector<double> a(n), b(n), sum(n);
        if (what == KFAC_DISTRIBUTED_STATISTICS) { r0.distributed_pack_statistics(a); r1.distributed_pack_statistics(b); }
        else { r0.distributed_pack_inverses(a); r1.distributed_pack_inverses(b); }
        for (std::size_t i = 0; i < n; i++) sum[i] = a[i] + b[i];
        for (auto *o : ranks) {
            if (what == KFAC_DISTRIBUTED_STATISTICS) o->distributed_unpack_statistics(sum);
            else o->distributed_unpack_inverses(sum);
        }
    }
    std::vector<double> w[3], bias[3];
    for (int k = 0; k < 3; k++) {
        w[k].assign(12, 0.25);
        bias[k].assign(3, -0.5);
        double *wp[] = {w[k].data()}, *bp[] = {bias[k].data()};
        all[k]->step(wp, bp);
    }
    CHECK(w[1] == w[2] && bias[1] == bias[2]);
    double worst = 0;
    for (std::size_t i = 0; i < 12; i++) worst = std::max(worst, std::fabs(w[1][i] - w[0][i]) / std::fabs(w[0][i]));
    CHECK(worst < 1e-12);
    // The adaptive mode's model sums: a one-example solve on both ranks gives the same α.
    std::vector<double> z = {0.1, -0.2, 0.3}, jd = {0.5, 0.25, -0.5}, sums0(5), sums1(5), total(5);
    const double *products[] = {jd.data()};
    r0.distributed_pack_model_sums(z.data(), products, nullptr, 1, 3, KFAC_DIST_CATEGORICAL, sums0);
    const double *none[] = {nullptr};  // rank 1 has no examples this step: zeros
    r1.distributed_pack_model_sums(nullptr, none, nullptr, 0, 3, KFAC_DIST_CATEGORICAL, sums1);
    for (std::size_t i = 0; i < 5; i++) total[i] = sums0[i] + sums1[i];
    CHECK(total[3] == 1.0);
    const auto s0 = r0.distributed_solve_model_sums(total), s1 = r1.distributed_solve_model_sums(total);
    CHECK(s0.alpha == s1.alpha && s0.mu == 0.0);
    expect_error([&] { r0.distributed_solve_model_sums(total); }, KFAC_ERROR_NO_STEP, "kfac_distributed_solve_model_sums");
    std::vector<double> short_buffer(3);
    expect_error([&] { r0.distributed_pack_statistics(short_buffer); }, KFAC_ERROR_INVALID_SIZE,
                 "kfac_distributed_pack_statistics_f64");
}

static void test_tridiagonal() {
    // Two scalar layers without bias, linked: A_{0,1} = mean(x0·x1), G_{0,1} = mean(g0·g1).
    kfac::optimizer opt(KFAC_FLOAT64);
    kfac_dense_desc desc = kfac::dense_desc();
    desc.in_features = 1;
    desc.out_features = 1;
    opt.layer_add_dense(desc);
    opt.layer_add_dense(desc);
    opt.param_set_double(KFAC_PARAM_DAMPING, 0.1);
    expect_error([&] { opt.layer_link(0, 2); }, KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_link");
    opt.layer_link(0, 1);
    const double x0[2] = {1, 2}, x1[2] = {3, -1}, g0[2] = {0.5, 1}, g1[2] = {2, 1};
    opt.layer_record_inputs(0, x0, 2);
    opt.layer_record_inputs(1, x1, 2);
    opt.layer_record_output_grads(1, g1, 2);
    opt.layer_record_output_grads(0, g0, 2);
    opt.update_factors();
    double a = 0, g = 0;
    opt.layer_get_cross_factors(0, &a, &g);
    CHECK(a == 0.5 && g == 1.0);
    opt.update_inverses();
    double w0 = 1, w1 = 2;
    expect_error([&] { opt.layer_precondition<double>(0, &w0, nullptr); }, KFAC_ERROR_UNSUPPORTED,
                 "kfac_layer_precondition_f64");
    double *ws[2] = {&w0, &w1};
    opt.curvature_multiply(1, ws);
    opt.curvature_multiply(-1, ws);
    CHECK(std::fabs(w0 - 1) < 1e-12 && std::fabs(w1 - 2) < 1e-12);
    std::printf("tridiagonal: cross factors %.2f %.2f, F̂ then F̂⁻¹ round trip\n", a, g);
}

int main() {
    CHECK(kfac::version_number() == KFAC_VERSION_NUMBER);
    CHECK(std::strcmp(kfac::version_string(), KFAC_VERSION_STRING) == 0);
    test_errors();
    test_ownership();
    test_parameter_table();
    test_training_steps();
    test_gauss_newton();
    test_distributed();
    test_distributed_synchronize();
    test_distributed_gathered();
    test_tridiagonal();
    std::printf("kfac.hpp: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
