/*
 * kfac.hpp — a header-only C++17 face of kfac.h. It adds no behaviour: every function calls the
 * C function of the same name once, in the same order of sections as kfac.h, and the C header
 * remains the reference for what each does, its units, its errors and its ownership rules.
 *
 * What the wrapper changes is only the form:
 *   - kfac::optimizer owns a kfac_optimizer handle (RAII, move-only) and has one method per
 *     kfac_optimizer_* / kfac_param_* / kfac_layer_* / kfac_adaptive_* / kfac_state_* (and, with
 *     KFAC_EXPERIMENTAL_API, kfac_candidates_* / kfac_curvature_* / kfac_gn_* / kfac_cg_* /
 *     kfac_distributed_*) function,
 *     named after it without
 *     kfac_layer_link / kfac_layer_get_cross_factors_*) function, named after it without
 *     "kfac_" and without "optimizer_": kfac_layer_add_dense(opt, …) is opt.layer_add_dense(…),
 *     kfac_optimizer_step_f32(opt, …) is opt.step(…);
 *   - the _f32 / _f64 pairs are one overloaded name, chosen by the buffer's element type;
 *   - a failed call (status != KFAC_OK) throws kfac::error carrying the status, the C function's
 *     name and kfac_optimizer_last_error; results delivered through out-parameters are returned;
 *   - arrays of per-layer buffers are kfac::span<T* const> (n_layers is their size; an empty bias
 *     span is the C NULL); row buffers stay pointer + rows, as in C.
 * Enums, the structs (kfac_dense_desc, kfac_conv2d_desc, kfac_layer_info, kfac_param_info) and
 * the KFAC_* constants are the C ones; kfac::dense_desc() etc. return a zeroed struct with
 * struct_size set. Link with libkfac (CMake: find_package(kfac CONFIG) and kfac::kfac;
 * pkg-config: kfac).
 */
#ifndef KFAC_HPP
#define KFAC_HPP

#include "kfac.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kfac {

/* ---------------------------------------------------------------------------------------------
 * Buffers and errors
 * ------------------------------------------------------------------------------------------- */

/** A borrowed pointer + size (std::span's role, for C++17). Built from a pointer and a size, a
 *  C array, a container with data() and size() (std::vector, std::array), or a braced list for
 *  the duration of one call. */
template <class T>
class span {
public:
    constexpr span() noexcept = default;
    constexpr span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <std::size_t N>
    constexpr span(T (&array)[N]) noexcept : data_(array), size_(N) {}
    template <class Container,
              class = std::enable_if_t<std::is_convertible_v<decltype(std::declval<Container &>().data()), T *>>>
    constexpr span(Container &container) noexcept : data_(container.data()), size_(container.size()) {}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winit-list-lifetime" /* a braced list lives for the call: meant */
#endif
    template <class U = T, class = std::enable_if_t<std::is_const_v<U>>>
    constexpr span(std::initializer_list<std::remove_const_t<U>> list) noexcept
        : data_(list.begin()), size_(list.size()) {}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

    constexpr T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T &operator[](std::size_t i) const noexcept { return data_[i]; }

private:
    T *data_ = nullptr;
    std::size_t size_ = 0;
};

/** A failed libkfac call: status() is the kfac_status, function() the C function's name,
 *  message() kfac_optimizer_last_error (or kfac_status_string for calls without a handle);
 *  what() is "function: message (STATUS_STRING, status)". */
class error : public std::runtime_error {
public:
    error(int status, const char *function, const std::string &message)
        : std::runtime_error(std::string(function) + ": " + message + " (" + kfac_status_string(status) + ", " +
                             std::to_string(status) + ")"),
          status_(status), function_(function), message_(message) {}

    int status() const noexcept { return status_; }
    const char *function() const noexcept { return function_; }
    const std::string &message() const noexcept { return message_; }

private:
    int status_;
    const char *function_;
    std::string message_;
};

namespace detail {

inline void check(int status, const char *function, const kfac_optimizer *opt = nullptr) {
    if (status == KFAC_OK) return;
    const char *message = opt ? kfac_optimizer_last_error(opt) : "";
    throw error(status, function, (message && *message) ? message : kfac_status_string(status));
}

/** n_layers of a per-layer call: the weights' count; a bias span must be empty or as long. */
template <class T>
inline int32_t layer_count(span<T *const> weights, span<T *const> biases, const char *function) {
    if (!biases.empty() && biases.size() != weights.size())
        throw error(KFAC_ERROR_INVALID_SIZE, function, "the bias span and the weight span differ in length");
    return static_cast<int32_t>(weights.size());
}

template <class T>
inline T *const *or_null(span<T *const> buffers) noexcept {
    return buffers.empty() ? nullptr : buffers.data();
}

template <class T>
constexpr void require_real() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "libkfac buffers are float or double");
}

}  // namespace detail

/* ---------------------------------------------------------------------------------------------
 * Version and compatibility, status codes
 * ------------------------------------------------------------------------------------------- */

inline unsigned version_number() noexcept { return kfac_version_number(); }
inline const char *version_string() noexcept { return kfac_version_string(); }
inline const char *status_string(int status) noexcept { return kfac_status_string(status); }

/* ---------------------------------------------------------------------------------------------
 * Growable structs, zeroed with struct_size set
 * ------------------------------------------------------------------------------------------- */

template <class Struct>
inline Struct zeroed_with_size() noexcept {
    Struct value{};
    value.struct_size = sizeof(Struct);
    return value;
}
inline kfac_param_info param_info() noexcept { return zeroed_with_size<kfac_param_info>(); }
inline kfac_dense_desc dense_desc() noexcept { return zeroed_with_size<kfac_dense_desc>(); }
inline kfac_conv2d_desc conv2d_desc() noexcept { return zeroed_with_size<kfac_conv2d_desc>(); }
inline kfac_layer_info layer_info() noexcept { return zeroed_with_size<kfac_layer_info>(); }

/* ---------------------------------------------------------------------------------------------
 * Parameters (the table; no handle)
 * ------------------------------------------------------------------------------------------- */

/** kfac_param_get_info. */
inline kfac_param_info param_get_info(int32_t param) {
    kfac_param_info info = param_info();
    detail::check(kfac_param_get_info(param, &info), "kfac_param_get_info");
    return info;
}

/** kfac_param_list: every parameter number, ascending. */
inline std::vector<int32_t> param_list() {
    int32_t count = 0;
    detail::check(kfac_param_list(nullptr, 0, &count), "kfac_param_list");
    std::vector<int32_t> params(static_cast<std::size_t>(count));
    detail::check(kfac_param_list(params.data(), count, &count), "kfac_param_list");
    params.resize(static_cast<std::size_t>(count));
    return params;
}

/* ---------------------------------------------------------------------------------------------
 * Target samplers (no handle)
 * ------------------------------------------------------------------------------------------- */

/** kfac_sample_targets_f32 / _f64. */
template <class T>
inline void sample_targets(const T *outputs, int64_t rows, int64_t output_dim, int32_t distribution, uint64_t seed,
                           T *targets) {
    detail::require_real<T>();
    if constexpr (std::is_same_v<T, float>)
        detail::check(kfac_sample_targets_f32(outputs, rows, output_dim, distribution, seed, targets),
                      "kfac_sample_targets_f32");
    else
        detail::check(kfac_sample_targets_f64(outputs, rows, output_dim, distribution, seed, targets),
                      "kfac_sample_targets_f64");
}

/** kfac_sample_output_grads_f32 / _f64. */
template <class T>
inline void sample_output_grads(const T *outputs, int64_t rows, int64_t output_dim, int32_t distribution, uint64_t seed,
                                T *grads) {
    detail::require_real<T>();
    if constexpr (std::is_same_v<T, float>)
        detail::check(kfac_sample_output_grads_f32(outputs, rows, output_dim, distribution, seed, grads),
                      "kfac_sample_output_grads_f32");
    else
        detail::check(kfac_sample_output_grads_f64(outputs, rows, output_dim, distribution, seed, grads),
                      "kfac_sample_output_grads_f64");
}

/** The result of kfac_adaptive_solve_step_size_* / kfac_candidates_solve_step_size_*. */
struct step_size {
    double alpha = 0;
    double mu = 0;
    double predicted_change = 0;
    int32_t chosen = 0;  /* candidates only */
};

#if defined(KFAC_EXPERIMENTAL_API)
/* ---------------------------------------------------------------------------------------------
 * Experimental: Gauss-Newton products, the output-space helpers (no handle)
 * ------------------------------------------------------------------------------------------- */

/** kfac_gn_output_hessian_multiply_f32 / _f64: products = B·vectors per row. */
template <class T>
inline void gn_output_hessian_multiply(const T *outputs, const T *vectors, int64_t rows, int64_t output_dim,
                                       int32_t distribution, T *products) {
    detail::require_real<T>();
    if constexpr (std::is_same_v<T, float>)
        detail::check(kfac_gn_output_hessian_multiply_f32(outputs, vectors, rows, output_dim, distribution, products),
                      "kfac_gn_output_hessian_multiply_f32");
    else
        detail::check(kfac_gn_output_hessian_multiply_f64(outputs, vectors, rows, output_dim, distribution, products),
                      "kfac_gn_output_hessian_multiply_f64");
}

/** kfac_gn_output_hessian_sqrt_f32 / _f64: columns [output_dim][rows][output_dim]. */
template <class T>
inline void gn_output_hessian_sqrt(const T *outputs, int64_t rows, int64_t output_dim, int32_t distribution,
                                   T *columns) {
    detail::require_real<T>();
    if constexpr (std::is_same_v<T, float>)
        detail::check(kfac_gn_output_hessian_sqrt_f32(outputs, rows, output_dim, distribution, columns),
                      "kfac_gn_output_hessian_sqrt_f32");
    else
        detail::check(kfac_gn_output_hessian_sqrt_f64(outputs, rows, output_dim, distribution, columns),
                      "kfac_gn_output_hessian_sqrt_f64");
}

/** What kfac_gn_columns_get_info reports. */
struct gn_columns_info {
    int64_t examples = 0;
    int32_t k = 0;
    int64_t values = 0;
};
#endif /* KFAC_EXPERIMENTAL_API */

/* ---------------------------------------------------------------------------------------------
 * Handles: kfac::optimizer
 * ------------------------------------------------------------------------------------------- */

class optimizer {
public:
    /** kfac_optimizer_create(dtype): KFAC_FLOAT32 or KFAC_FLOAT64. */
    explicit optimizer(int32_t dtype) {
        detail::check(kfac_optimizer_create(dtype, &handle_), "kfac_optimizer_create");
    }
    /** Takes ownership of a handle from kfac_optimizer_create (or NULL). */
    static optimizer adopt(kfac_optimizer *handle) noexcept { return optimizer(handle); }

    optimizer(const optimizer &) = delete;
    optimizer &operator=(const optimizer &) = delete;
    optimizer(optimizer &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    optimizer &operator=(optimizer &&other) noexcept {
        if (this != &other) kfac_optimizer_free(std::exchange(handle_, std::exchange(other.handle_, nullptr)));
        return *this;
    }
    /** kfac_optimizer_free. */
    ~optimizer() { kfac_optimizer_free(handle_); }

    kfac_optimizer *get() const noexcept { return handle_; }
    /** Gives up ownership: the caller frees the handle. */
    kfac_optimizer *release() noexcept { return std::exchange(handle_, nullptr); }

    /** kfac_optimizer_last_error. */
    const char *last_error() const noexcept { return kfac_optimizer_last_error(handle_); }
    /** kfac_optimizer_get_dtype. */
    int32_t get_dtype() const {
        int32_t dtype = 0;
        check(kfac_optimizer_get_dtype(handle_, &dtype), "kfac_optimizer_get_dtype");
        return dtype;
    }

    /* ---- Parameters ---- */

    /** kfac_param_set_double. */
    void param_set_double(int32_t param, double value) {
        check(kfac_param_set_double(handle_, param, value), "kfac_param_set_double");
    }
    /** kfac_param_get_double. */
    double param_get_double(int32_t param) const {
        double value = 0;
        check(kfac_param_get_double(handle_, param, &value), "kfac_param_get_double");
        return value;
    }
    /** kfac_param_set_int. */
    void param_set_int(int32_t param, int64_t value) {
        check(kfac_param_set_int(handle_, param, value), "kfac_param_set_int");
    }
    /** kfac_param_get_int. */
    int64_t param_get_int(int32_t param) const {
        int64_t value = 0;
        check(kfac_param_get_int(handle_, param, &value), "kfac_param_get_int");
        return value;
    }

    /* ---- Layers ---- */

    /** kfac_layer_add_dense: the new layer's index. */
    int32_t layer_add_dense(const kfac_dense_desc &desc) {
        int32_t layer = -1;
        check(kfac_layer_add_dense(handle_, &desc, &layer), "kfac_layer_add_dense");
        return layer;
    }
    /** kfac_layer_add_conv2d: the new layer's index. */
    int32_t layer_add_conv2d(const kfac_conv2d_desc &desc) {
        int32_t layer = -1;
        check(kfac_layer_add_conv2d(handle_, &desc, &layer), "kfac_layer_add_conv2d");
        return layer;
    }
    /** kfac_layer_count. */
    int32_t layer_count() const {
        int32_t count = 0;
        check(kfac_layer_count(handle_, &count), "kfac_layer_count");
        return count;
    }
    /** kfac_layer_get_info (struct_size = sizeof(kfac_layer_info)). */
    kfac_layer_info layer_get_info(int32_t layer) const {
        kfac_layer_info info = kfac::layer_info();
        check(kfac_layer_get_info(handle_, layer, &info), "kfac_layer_get_info");
        return info;
    }

    /* ---- Statistics ---- */

    /** kfac_optimizer_wants_statistics. */
    bool wants_statistics() const {
        int32_t wanted = 0;
        check(kfac_optimizer_wants_statistics(handle_, &wanted), "kfac_optimizer_wants_statistics");
        return wanted != 0;
    }
    /** kfac_layer_record_inputs_f32 / _f64. */
    template <class T>
    void layer_record_inputs(int32_t layer, const T *inputs, int64_t rows) {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_record_inputs_f32(handle_, layer, inputs, rows), "kfac_layer_record_inputs_f32");
        else
            check(kfac_layer_record_inputs_f64(handle_, layer, inputs, rows), "kfac_layer_record_inputs_f64");
    }
    /** kfac_layer_record_output_grads_f32 / _f64. */
    template <class T>
    void layer_record_output_grads(int32_t layer, const T *output_grads, int64_t rows) {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_record_output_grads_f32(handle_, layer, output_grads, rows),
                  "kfac_layer_record_output_grads_f32");
        else
            check(kfac_layer_record_output_grads_f64(handle_, layer, output_grads, rows),
                  "kfac_layer_record_output_grads_f64");
    }
    /** kfac_optimizer_update_factors. */
    void update_factors() { check(kfac_optimizer_update_factors(handle_), "kfac_optimizer_update_factors"); }
    /** kfac_optimizer_update_inverses. */
    void update_inverses() { check(kfac_optimizer_update_inverses(handle_), "kfac_optimizer_update_inverses"); }
    /** kfac_optimizer_discard_statistics: drops the pending statistics (the way out of a fold or
     *  inversion that keeps failing). */
    void discard_statistics() {
        check(kfac_optimizer_discard_statistics(handle_), "kfac_optimizer_discard_statistics");
    }
    /** kfac_layer_get_factors_f32 / _f64 (either output may be nullptr). */
    template <class T>
    void layer_get_factors(int32_t layer, int32_t group, T *a_out, T *g_out) const {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_get_factors_f32(handle_, layer, group, a_out, g_out), "kfac_layer_get_factors_f32");
        else
            check(kfac_layer_get_factors_f64(handle_, layer, group, a_out, g_out), "kfac_layer_get_factors_f64");
    }

    /* ---- Preconditioning ---- */

    /** kfac_optimizer_step_f32: n_layers = weight_grads.size(); empty bias_grads = NULL. */
    void step(span<float *const> weight_grads, span<float *const> bias_grads = {}) {
        const int32_t n = detail::layer_count(weight_grads, bias_grads, "kfac_optimizer_step_f32");
        check(kfac_optimizer_step_f32(handle_, weight_grads.data(), detail::or_null(bias_grads), n),
              "kfac_optimizer_step_f32");
    }
    /** kfac_optimizer_step_f64. */
    void step(span<double *const> weight_grads, span<double *const> bias_grads = {}) {
        const int32_t n = detail::layer_count(weight_grads, bias_grads, "kfac_optimizer_step_f64");
        check(kfac_optimizer_step_f64(handle_, weight_grads.data(), detail::or_null(bias_grads), n),
              "kfac_optimizer_step_f64");
    }
    /** kfac_layer_precondition_f32 / _f64 (bias_grad nullptr exactly for a layer without bias). */
    template <class T>
    void layer_precondition(int32_t layer, T *weight_grad, T *bias_grad) {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_precondition_f32(handle_, layer, weight_grad, bias_grad), "kfac_layer_precondition_f32");
        else
            check(kfac_layer_precondition_f64(handle_, layer, weight_grad, bias_grad), "kfac_layer_precondition_f64");
    }
    /** kfac_optimizer_get_step_count. */
    int64_t get_step_count() const {
        int64_t count = 0;
        check(kfac_optimizer_get_step_count(handle_, &count), "kfac_optimizer_get_step_count");
        return count;
    }
    /** kfac_optimizer_get_kl_scale (throws KFAC_ERROR_NO_STEP before the first step). */
    double get_kl_scale() const {
        double scale = 0;
        check(kfac_optimizer_get_kl_scale(handle_, &scale), "kfac_optimizer_get_kl_scale");
        return scale;
    }

    /* ---- Adaptive mode ---- */

    /** kfac_adaptive_solve_step_size_f32 / _f64 (previous_products may be nullptr). */
    template <class T>
    step_size adaptive_solve_step_size(const T *outputs, const T *direction_products, const T *previous_products,
                                       int64_t rows, int64_t output_dim, int32_t distribution) {
        detail::require_real<T>();
        step_size r;
        if constexpr (std::is_same_v<T, float>)
            check(kfac_adaptive_solve_step_size_f32(handle_, outputs, direction_products, previous_products, rows,
                                                    output_dim, distribution, &r.alpha, &r.mu, &r.predicted_change),
                  "kfac_adaptive_solve_step_size_f32");
        else
            check(kfac_adaptive_solve_step_size_f64(handle_, outputs, direction_products, previous_products, rows,
                                                    output_dim, distribution, &r.alpha, &r.mu, &r.predicted_change),
                  "kfac_adaptive_solve_step_size_f64");
        return r;
    }
    /** kfac_adaptive_get_update_f32. */
    void adaptive_get_update(span<float *const> weight_updates, span<float *const> bias_updates = {}) {
        const int32_t n = detail::layer_count(weight_updates, bias_updates, "kfac_adaptive_get_update_f32");
        check(kfac_adaptive_get_update_f32(handle_, weight_updates.data(), detail::or_null(bias_updates), n),
              "kfac_adaptive_get_update_f32");
    }
    /** kfac_adaptive_get_update_f64. */
    void adaptive_get_update(span<double *const> weight_updates, span<double *const> bias_updates = {}) {
        const int32_t n = detail::layer_count(weight_updates, bias_updates, "kfac_adaptive_get_update_f64");
        check(kfac_adaptive_get_update_f64(handle_, weight_updates.data(), detail::or_null(bias_updates), n),
              "kfac_adaptive_get_update_f64");
    }
    /** kfac_adaptive_report_loss_change: ρ. */
    double adaptive_report_loss_change(double loss_before, double loss_after) {
        double rho = 0;
        check(kfac_adaptive_report_loss_change(handle_, loss_before, loss_after, &rho),
              "kfac_adaptive_report_loss_change");
        return rho;
    }
    /** kfac_adaptive_get_reduction_ratio (throws KFAC_ERROR_NO_STEP before the first report). */
    double adaptive_get_reduction_ratio() const {
        double rho = 0;
        check(kfac_adaptive_get_reduction_ratio(handle_, &rho), "kfac_adaptive_get_reduction_ratio");
        return rho;
    }

    /* ---- State ---- */

    /** kfac_state_get_size. */
    std::size_t state_get_size() const {
        std::size_t size = 0;
        check(kfac_state_get_size(handle_, &size), "kfac_state_get_size");
        return size;
    }
    /** kfac_state_save into buffer[0 .. capacity): the bytes written. */
    std::size_t state_save(void *buffer, std::size_t capacity) const {
        std::size_t written = 0;
        check(kfac_state_save(handle_, buffer, capacity, &written), "kfac_state_save");
        return written;
    }
    /** kfac_state_load. */
    void state_load(const void *buffer, std::size_t size) {
        check(kfac_state_load(handle_, buffer, size), "kfac_state_load");
    }
    /** kfac_state_save_file. */
    void state_save_file(const char *path) const { check(kfac_state_save_file(handle_, path), "kfac_state_save_file"); }
    /** kfac_state_load_file. */
    void state_load_file(const char *path) { check(kfac_state_load_file(handle_, path), "kfac_state_load_file"); }

#if defined(KFAC_EXPERIMENTAL_API)
    /* ---- Experimental: loss reports on λ's steps only ---- */

    /** kfac_adaptive_get_report_needed: whether the next report adjusts λ. */
    bool adaptive_get_report_needed() const {
        int32_t needed = 0;
        check(kfac_adaptive_get_report_needed(handle_, &needed), "kfac_adaptive_get_report_needed");
        return needed != 0;
    }
    /** kfac_adaptive_skip_loss_report. */
    void adaptive_skip_loss_report() { check(kfac_adaptive_skip_loss_report(handle_), "kfac_adaptive_skip_loss_report"); }

    /* ---- Experimental: candidates for the factor damping γ ---- */

    /** kfac_candidates_get_count. */
    int32_t candidates_get_count() const {
        int32_t count = 0;
        check(kfac_candidates_get_count(handle_, &count), "kfac_candidates_get_count");
        return count;
    }
    /** kfac_candidates_get_directions_f32: the candidate's γ. */
    double candidates_get_directions(int32_t candidate, span<float *const> weight_dirs,
                                     span<float *const> bias_dirs = {}) {
        double gamma = 0;
        const int32_t n = detail::layer_count(weight_dirs, bias_dirs, "kfac_candidates_get_directions_f32");
        check(kfac_candidates_get_directions_f32(handle_, candidate, weight_dirs.data(), detail::or_null(bias_dirs),
                                                 n, &gamma),
              "kfac_candidates_get_directions_f32");
        return gamma;
    }
    /** kfac_candidates_get_directions_f64: the candidate's γ. */
    double candidates_get_directions(int32_t candidate, span<double *const> weight_dirs,
                                     span<double *const> bias_dirs = {}) {
        double gamma = 0;
        const int32_t n = detail::layer_count(weight_dirs, bias_dirs, "kfac_candidates_get_directions_f64");
        check(kfac_candidates_get_directions_f64(handle_, candidate, weight_dirs.data(), detail::or_null(bias_dirs),
                                                 n, &gamma),
              "kfac_candidates_get_directions_f64");
        return gamma;
    }
    /** kfac_candidates_solve_step_size_f32 (n_candidates = direction_products.size()). */
    step_size candidates_solve_step_size(const float *outputs, span<const float *const> direction_products,
                                         const float *previous_products, int64_t rows, int64_t output_dim,
                                         int32_t distribution) {
        step_size r;
        check(kfac_candidates_solve_step_size_f32(handle_, outputs, direction_products.data(),
                                                  static_cast<int32_t>(direction_products.size()), previous_products,
                                                  rows, output_dim, distribution, &r.chosen, &r.alpha, &r.mu,
                                                  &r.predicted_change),
              "kfac_candidates_solve_step_size_f32");
        return r;
    }
    /** kfac_candidates_solve_step_size_f64. */
    step_size candidates_solve_step_size(const double *outputs, span<const double *const> direction_products,
                                         const double *previous_products, int64_t rows, int64_t output_dim,
                                         int32_t distribution) {
        step_size r;
        check(kfac_candidates_solve_step_size_f64(handle_, outputs, direction_products.data(),
                                                  static_cast<int32_t>(direction_products.size()), previous_products,
                                                  rows, output_dim, distribution, &r.chosen, &r.alpha, &r.mu,
                                                  &r.predicted_change),
              "kfac_candidates_solve_step_size_f64");
        return r;
    }

    /* ---- Experimental: products with the damped curvature ---- */

    /** kfac_curvature_multiply_f32 (power +1 or −1). */
    void curvature_multiply(int32_t power, span<float *const> weights, span<float *const> biases = {}) {
        const int32_t n = detail::layer_count(weights, biases, "kfac_curvature_multiply_f32");
        check(kfac_curvature_multiply_f32(handle_, power, weights.data(), detail::or_null(biases), n),
              "kfac_curvature_multiply_f32");
    }
    /** kfac_curvature_multiply_f64. */
    void curvature_multiply(int32_t power, span<double *const> weights, span<double *const> biases = {}) {
        const int32_t n = detail::layer_count(weights, biases, "kfac_curvature_multiply_f64");
        check(kfac_curvature_multiply_f64(handle_, power, weights.data(), detail::or_null(biases), n),
              "kfac_curvature_multiply_f64");
    }

    /* ---- Experimental: block-tridiagonal links ---- */

    /** kfac_layer_link (upper = lower + 1; before any statistics). */
    void layer_link(int32_t lower, int32_t upper) { check(kfac_layer_link(handle_, lower, upper), "kfac_layer_link"); }
    /** kfac_layer_get_cross_factors_f32 / _f64: A_{l,l+1} [a_dim(l)][a_dim(l+1)] and G_{l,l+1}
     *  [out(l)][out(l+1)] of the link from `lower` (either output may be nullptr). */
    template <class T>
    void layer_get_cross_factors(int32_t lower, T *a_cross, T *g_cross) const {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_get_cross_factors_f32(handle_, lower, a_cross, g_cross), "kfac_layer_get_cross_factors_f32");
        else
            check(kfac_layer_get_cross_factors_f64(handle_, lower, a_cross, g_cross), "kfac_layer_get_cross_factors_f64");
    }

    /* ---- Experimental: Gauss-Newton products ---- */

    /** kfac_layer_record_output_grad_columns_f32 / _f64 (uses: KFAC_COLUMNS_* bits). */
    void layer_record_output_grad_columns(int32_t layer, const float *inputs, const float *columns, int64_t rows,
                                          int32_t k, int32_t uses) {
        check(kfac_layer_record_output_grad_columns_f32(handle_, layer, inputs, columns, rows, k, uses),
              "kfac_layer_record_output_grad_columns_f32");
    }
    void layer_record_output_grad_columns(int32_t layer, const double *inputs, const double *columns, int64_t rows,
                                          int32_t k, int32_t uses) {
        check(kfac_layer_record_output_grad_columns_f64(handle_, layer, inputs, columns, rows, k, uses),
              "kfac_layer_record_output_grad_columns_f64");
    }
    /** kfac_gn_columns_multiply_f32 / _f64 (n_layers = vector_w.size()). */
    void gn_columns_multiply(span<const float *const> vector_w, span<const float *const> vector_b,
                             span<float *const> product_w, span<float *const> product_b) {
        check(kfac_gn_columns_multiply_f32(handle_, vector_w.data(), or_null(vector_b), product_w.data(),
                                           detail::or_null(product_b), static_cast<int32_t>(vector_w.size())),
              "kfac_gn_columns_multiply_f32");
    }
    void gn_columns_multiply(span<const double *const> vector_w, span<const double *const> vector_b,
                             span<double *const> product_w, span<double *const> product_b) {
        check(kfac_gn_columns_multiply_f64(handle_, vector_w.data(), or_null(vector_b), product_w.data(),
                                           detail::or_null(product_b), static_cast<int32_t>(vector_w.size())),
              "kfac_gn_columns_multiply_f64");
    }
    /** kfac_gn_columns_get_info. */
    gn_columns_info gn_columns_get_info() const {
        gn_columns_info info;
        check(kfac_gn_columns_get_info(handle_, &info.examples, &info.k, &info.values), "kfac_gn_columns_get_info");
        return info;
    }
    /** kfac_gn_columns_clear. */
    void gn_columns_clear() { check(kfac_gn_columns_clear(handle_), "kfac_gn_columns_clear"); }
    /** kfac_gn_chain_define (n = layers.size(); activations must be as long). */
    void gn_chain_define(span<const int32_t> layers, span<const int32_t> activations, int32_t distribution) {
        if (layers.size() != activations.size())
            throw error(KFAC_ERROR_INVALID_SIZE, "kfac_gn_chain_define", "layers and activations differ in length");
        check(kfac_gn_chain_define(handle_, layers.data(), activations.data(), static_cast<int32_t>(layers.size()),
                                   distribution),
              "kfac_gn_chain_define");
    }
    /** kfac_gn_chain_forward_f32 / _f64 (chain order; empty biases / derivatives spans are NULL). */
    void gn_chain_forward(span<const float *const> weights, span<const float *const> biases,
                          span<const float *const> inputs, span<const float *const> derivatives, int64_t rows,
                          float *outputs) {
        check(kfac_gn_chain_forward_f32(handle_, weights.data(), or_null(biases), inputs.data(), or_null(derivatives),
                                        rows, outputs),
              "kfac_gn_chain_forward_f32");
    }
    void gn_chain_forward(span<const double *const> weights, span<const double *const> biases,
                          span<const double *const> inputs, span<const double *const> derivatives, int64_t rows,
                          double *outputs) {
        check(kfac_gn_chain_forward_f64(handle_, weights.data(), or_null(biases), inputs.data(), or_null(derivatives),
                                        rows, outputs),
              "kfac_gn_chain_forward_f64");
    }
    /** kfac_gn_chain_record_columns (uses: KFAC_COLUMNS_* bits). */
    void gn_chain_record_columns(int32_t uses) {
        check(kfac_gn_chain_record_columns(handle_, uses), "kfac_gn_chain_record_columns");
    }
    /** kfac_gn_chain_record_kfra_f32 / _f64 (variant: KFAC_KFRA_*; output_grads [rows][output_dim] for
     *  KFAC_KFRA_HESSIAN, a typed nullptr for KFAC_KFRA_GGN picks the precision). */
    void gn_chain_record_kfra(int32_t variant, bool record_inputs, const float *output_grads) {
        check(kfac_gn_chain_record_kfra_f32(handle_, variant, record_inputs ? 1 : 0, output_grads),
              "kfac_gn_chain_record_kfra_f32");
    }
    void gn_chain_record_kfra(int32_t variant, bool record_inputs, const double *output_grads) {
        check(kfac_gn_chain_record_kfra_f64(handle_, variant, record_inputs ? 1 : 0, output_grads),
              "kfac_gn_chain_record_kfra_f64");
    }
    /** kfac_gn_chain_multiply_f32 / _f64 (n_layers = vector_w.size()). */
    void gn_chain_multiply(span<const float *const> vector_w, span<const float *const> vector_b,
                           span<float *const> product_w, span<float *const> product_b) {
        check(kfac_gn_chain_multiply_f32(handle_, vector_w.data(), or_null(vector_b), product_w.data(),
                                         detail::or_null(product_b), static_cast<int32_t>(vector_w.size())),
              "kfac_gn_chain_multiply_f32");
    }
    void gn_chain_multiply(span<const double *const> vector_w, span<const double *const> vector_b,
                           span<double *const> product_w, span<double *const> product_b) {
        check(kfac_gn_chain_multiply_f64(handle_, vector_w.data(), or_null(vector_b), product_w.data(),
                                         detail::or_null(product_b), static_cast<int32_t>(vector_w.size())),
              "kfac_gn_chain_multiply_f64");
    }

    /* ---- Experimental: conjugate gradient and Newton-CG (kfac.h's "Conjugate gradient") ---- */

    /** kfac_cg_begin_f32 (desc may be nullptr; the diag spans only for DIAGONAL): the request. */
    int32_t cg_begin(const kfac_cg_desc *desc, span<const float *const> grad_w, span<const float *const> grad_b = {},
                     span<const float *const> diag_w = {}, span<const float *const> diag_b = {}) {
        const int32_t n = detail::layer_count(grad_w, grad_b, "kfac_cg_begin_f32");
        int32_t request = 0;
        check(kfac_cg_begin_f32(handle_, desc, grad_w.data(), detail::or_null(grad_b), detail::or_null(diag_w),
                                detail::or_null(diag_b), n, &request), "kfac_cg_begin_f32");
        return request;
    }
    /** kfac_cg_begin_f64. */
    int32_t cg_begin(const kfac_cg_desc *desc, span<const double *const> grad_w, span<const double *const> grad_b = {},
                     span<const double *const> diag_w = {}, span<const double *const> diag_b = {}) {
        const int32_t n = detail::layer_count(grad_w, grad_b, "kfac_cg_begin_f64");
        int32_t request = 0;
        check(kfac_cg_begin_f64(handle_, desc, grad_w.data(), detail::or_null(grad_b), detail::or_null(diag_w),
                                detail::or_null(diag_b), n, &request), "kfac_cg_begin_f64");
        return request;
    }
    /** kfac_cg_get_vector_f32. */
    void cg_get_vector(span<float *const> vector_w, span<float *const> vector_b = {}) {
        const int32_t n = detail::layer_count(vector_w, vector_b, "kfac_cg_get_vector_f32");
        check(kfac_cg_get_vector_f32(handle_, vector_w.data(), detail::or_null(vector_b), n), "kfac_cg_get_vector_f32");
    }
    /** kfac_cg_get_vector_f64. */
    void cg_get_vector(span<double *const> vector_w, span<double *const> vector_b = {}) {
        const int32_t n = detail::layer_count(vector_w, vector_b, "kfac_cg_get_vector_f64");
        check(kfac_cg_get_vector_f64(handle_, vector_w.data(), detail::or_null(vector_b), n), "kfac_cg_get_vector_f64");
    }
    /** kfac_cg_supply_product_f32: the request. */
    int32_t cg_supply_product(span<const float *const> product_w, span<const float *const> product_b = {}) {
        const int32_t n = detail::layer_count(product_w, product_b, "kfac_cg_supply_product_f32");
        int32_t request = 0;
        check(kfac_cg_supply_product_f32(handle_, product_w.data(), detail::or_null(product_b), n, &request),
              "kfac_cg_supply_product_f32");
        return request;
    }
    /** kfac_cg_supply_product_f64: the request. */
    int32_t cg_supply_product(span<const double *const> product_w, span<const double *const> product_b = {}) {
        const int32_t n = detail::layer_count(product_w, product_b, "kfac_cg_supply_product_f64");
        int32_t request = 0;
        check(kfac_cg_supply_product_f64(handle_, product_w.data(), detail::or_null(product_b), n, &request),
              "kfac_cg_supply_product_f64");
        return request;
    }
    /** kfac_cg_finish_f32: the result. */
    kfac_cg_result cg_finish(span<float *const> step_w, span<float *const> step_b = {}) {
        const int32_t n = detail::layer_count(step_w, step_b, "kfac_cg_finish_f32");
        kfac_cg_result r = zeroed_with_size<kfac_cg_result>();
        check(kfac_cg_finish_f32(handle_, step_w.data(), detail::or_null(step_b), n, &r), "kfac_cg_finish_f32");
        return r;
    }
    /** kfac_cg_finish_f64: the result. */
    kfac_cg_result cg_finish(span<double *const> step_w, span<double *const> step_b = {}) {
        const int32_t n = detail::layer_count(step_w, step_b, "kfac_cg_finish_f64");
        kfac_cg_result r = zeroed_with_size<kfac_cg_result>();
        check(kfac_cg_finish_f64(handle_, step_w.data(), detail::or_null(step_b), n, &r), "kfac_cg_finish_f64");
        return r;
    }
    /** kfac_cg_report_loss_change: ρ. */
    double cg_report_loss_change(double step_scale, double loss_before, double loss_after) {
        double rho = 0;
        check(kfac_cg_report_loss_change(handle_, step_scale, loss_before, loss_after, &rho), "kfac_cg_report_loss_change");
        return rho;
    }
    /** kfac_cg_solve_f32 (product must not throw: it is called from C). */
    kfac_cg_result cg_solve(const kfac_cg_desc *desc, span<const float *const> grad_w, span<const float *const> grad_b,
                            kfac_cg_product_fn_f32 product, void *user, span<float *const> step_w,
                            span<float *const> step_b = {}) {
        const int32_t n = detail::layer_count(grad_w, grad_b, "kfac_cg_solve_f32");
        kfac_cg_result r = zeroed_with_size<kfac_cg_result>();
        check(kfac_cg_solve_f32(handle_, desc, grad_w.data(), detail::or_null(grad_b), nullptr, nullptr, product, user,
                                step_w.data(), detail::or_null(step_b), n, &r), "kfac_cg_solve_f32");
        return r;
    }
    /** kfac_cg_solve_f64 (product must not throw: it is called from C). */
    kfac_cg_result cg_solve(const kfac_cg_desc *desc, span<const double *const> grad_w, span<const double *const> grad_b,
                            kfac_cg_product_fn_f64 product, void *user, span<double *const> step_w,
                            span<double *const> step_b = {}) {
        const int32_t n = detail::layer_count(grad_w, grad_b, "kfac_cg_solve_f64");
        kfac_cg_result r = zeroed_with_size<kfac_cg_result>();
        check(kfac_cg_solve_f64(handle_, desc, grad_w.data(), detail::or_null(grad_b), nullptr, nullptr, product, user,
                                step_w.data(), detail::or_null(step_b), n, &r), "kfac_cg_solve_f64");
        return r;
    }

    /* ---- Experimental: EKFAC ---- */

    /** kfac_layer_record_examples_f32 / _f64: paired inputs and output gradients of the same rows. */
    template <class T>
    void layer_record_examples(int32_t layer, const T *inputs, const T *output_grads, int64_t rows,
                               int64_t rows_per_example = 1) {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_record_examples_f32(handle_, layer, inputs, output_grads, rows, rows_per_example),
                  "kfac_layer_record_examples_f32");
        else
            check(kfac_layer_record_examples_f64(handle_, layer, inputs, output_grads, rows, rows_per_example),
                  "kfac_layer_record_examples_f64");
    }
    /** kfac_layer_get_ekfac_scaling_f32 / _f64: S of one group, [g_dim][a_dim]. */
    template <class T>
    void layer_get_ekfac_scaling(int32_t layer, int32_t group, T *scaling) const {
        detail::require_real<T>();
        if constexpr (std::is_same_v<T, float>)
            check(kfac_layer_get_ekfac_scaling_f32(handle_, layer, group, scaling), "kfac_layer_get_ekfac_scaling_f32");
        else
            check(kfac_layer_get_ekfac_scaling_f64(handle_, layer, group, scaling), "kfac_layer_get_ekfac_scaling_f64");
    }

    /* ---- Experimental: distributed runs (the caller's engine does the SUM-allreduce) ---- */

    /** kfac_distributed_set_world. */
    void distributed_set_world(int32_t rank, int32_t size) {
        check(kfac_distributed_set_world(handle_, rank, size), "kfac_distributed_set_world");
    }
    /** kfac_distributed_get_world: {rank, size}. */
    std::pair<int32_t, int32_t> distributed_get_world() const {
        int32_t rank = 0, size = 1;
        check(kfac_distributed_get_world(handle_, &rank, &size), "kfac_distributed_get_world");
        return {rank, size};
    }
    /** kfac_distributed_get_count (what: KFAC_DISTRIBUTED_STATISTICS or _INVERSES). */
    int64_t distributed_get_count(int32_t what) {
        int64_t count = 0;
        check(kfac_distributed_get_count(handle_, what, &count), "kfac_distributed_get_count");
        return count;
    }
    /** kfac_distributed_get_due. */
    bool distributed_get_due(int32_t what) const {
        int32_t due = 0;
        check(kfac_distributed_get_due(handle_, what, &due), "kfac_distributed_get_due");
        return due != 0;
    }
    /** kfac_distributed_get_owner (side 0 = input factor, 1 = output factor). */
    int32_t distributed_get_owner(int32_t layer, int32_t group, int32_t side, int32_t block) const {
        int32_t rank = 0;
        check(kfac_distributed_get_owner(handle_, layer, group, side, block, &rank), "kfac_distributed_get_owner");
        return rank;
    }
    /** kfac_distributed_pack_statistics_f32 / _f64 (count = buffer.size()). */
    void distributed_pack_statistics(span<float> buffer) {
        check(kfac_distributed_pack_statistics_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_statistics_f32");
    }
    void distributed_pack_statistics(span<double> buffer) {
        check(kfac_distributed_pack_statistics_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_statistics_f64");
    }
    /** kfac_distributed_unpack_statistics_f32 / _f64. */
    void distributed_unpack_statistics(span<const float> buffer) {
        check(kfac_distributed_unpack_statistics_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_statistics_f32");
    }
    void distributed_unpack_statistics(span<const double> buffer) {
        check(kfac_distributed_unpack_statistics_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_statistics_f64");
    }
    /** kfac_distributed_pack_inverses_f32 / _f64 (on error the buffer holds NaN). */
    void distributed_pack_inverses(span<float> buffer) {
        check(kfac_distributed_pack_inverses_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_inverses_f32");
    }
    void distributed_pack_inverses(span<double> buffer) {
        check(kfac_distributed_pack_inverses_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_inverses_f64");
    }
    /** kfac_distributed_unpack_inverses_f32 / _f64. */
    void distributed_unpack_inverses(span<const float> buffer) {
        check(kfac_distributed_unpack_inverses_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_inverses_f32");
    }
    void distributed_unpack_inverses(span<const double> buffer) {
        check(kfac_distributed_unpack_inverses_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_inverses_f64");
    }
    /** kfac_distributed_pack_scalings_f32 / _f64 (EKFAC; on error the buffer holds NaN). */
    void distributed_pack_scalings(span<float> buffer) {
        check(kfac_distributed_pack_scalings_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_scalings_f32");
    }
    void distributed_pack_scalings(span<double> buffer) {
        check(kfac_distributed_pack_scalings_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_scalings_f64");
    }
    /** kfac_distributed_unpack_scalings_f32 / _f64 (EKFAC). */
    void distributed_unpack_scalings(span<const float> buffer) {
        check(kfac_distributed_unpack_scalings_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_scalings_f32");
    }
    void distributed_unpack_scalings(span<const double> buffer) {
        check(kfac_distributed_unpack_scalings_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_scalings_f64");
    }
    /** kfac_distributed_pack_model_sums_f32 / _f64 (n_candidates = direction_products.size(),
     *  n_sums = sums.size() = 3·n_candidates + 2). */
    void distributed_pack_model_sums(const float *outputs, span<const float *const> direction_products,
                                     const float *previous_products, int64_t rows, int64_t output_dim,
                                     int32_t distribution, span<double> sums) {
        check(kfac_distributed_pack_model_sums_f32(handle_, outputs, direction_products.data(),
                                                   static_cast<int32_t>(direction_products.size()), previous_products,
                                                   rows, output_dim, distribution, sums.data(),
                                                   static_cast<int64_t>(sums.size())),
              "kfac_distributed_pack_model_sums_f32");
    }
    void distributed_pack_model_sums(const double *outputs, span<const double *const> direction_products,
                                     const double *previous_products, int64_t rows, int64_t output_dim,
                                     int32_t distribution, span<double> sums) {
        check(kfac_distributed_pack_model_sums_f64(handle_, outputs, direction_products.data(),
                                                   static_cast<int32_t>(direction_products.size()), previous_products,
                                                   rows, output_dim, distribution, sums.data(),
                                                   static_cast<int64_t>(sums.size())),
              "kfac_distributed_pack_model_sums_f64");
    }
    /** kfac_distributed_solve_model_sums. */
    step_size distributed_solve_model_sums(span<const double> sums) {
        step_size r;
        check(kfac_distributed_solve_model_sums(handle_, sums.data(), static_cast<int64_t>(sums.size()), &r.chosen,
                                                &r.alpha, &r.mu, &r.predicted_change),
              "kfac_distributed_solve_model_sums");
        return r;
    }
    /** kfac_distributed_get_inverse_layout: per rank counts (and displacements, their prefix
     *  sums) of the gathered inverse exchange, for the world size. */
    void distributed_get_inverse_layout(span<int64_t> counts, span<int64_t> displacements) {
        if (!displacements.empty() && displacements.size() != counts.size())
            throw error(KFAC_ERROR_INVALID_SIZE, "kfac_distributed_get_inverse_layout",
                        "displacements must be empty or as long as counts");
        check(kfac_distributed_get_inverse_layout(handle_, counts.data(),
                                                  displacements.empty() ? nullptr : displacements.data(),
                                                  static_cast<int32_t>(counts.size())),
              "kfac_distributed_get_inverse_layout");
    }
    /** kfac_distributed_pack_owned_inverses_f32 / _f64 (count = buffer.size() = counts[rank]). */
    void distributed_pack_owned_inverses(span<float> buffer) {
        check(kfac_distributed_pack_owned_inverses_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_owned_inverses_f32");
    }
    void distributed_pack_owned_inverses(span<double> buffer) {
        check(kfac_distributed_pack_owned_inverses_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_pack_owned_inverses_f64");
    }
    /** kfac_distributed_unpack_gathered_inverses_f32 / _f64 (every rank's segment, rank order). */
    void distributed_unpack_gathered_inverses(span<const float> buffer) {
        check(kfac_distributed_unpack_gathered_inverses_f32(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_gathered_inverses_f32");
    }
    void distributed_unpack_gathered_inverses(span<const double> buffer) {
        check(kfac_distributed_unpack_gathered_inverses_f64(handle_, buffer.data(), static_cast<int64_t>(buffer.size())),
              "kfac_distributed_unpack_gathered_inverses_f64");
    }
    /** kfac_distributed_synchronize: the step's exchanges through the caller's collectives (a
     *  non-zero return from the collective throws kfac::error with KFAC_ERROR_CALLBACK). */
    void distributed_synchronize(const kfac_collectives &collectives) {
        check(kfac_distributed_synchronize(handle_, &collectives), "kfac_distributed_synchronize");
    }
#endif /* KFAC_EXPERIMENTAL_API */

private:
    explicit optimizer(kfac_optimizer *handle) noexcept : handle_(handle) {}
    void check(int status, const char *function) const { detail::check(status, function, handle_); }
    template <class T>
    static const T *const *or_null(span<const T *const> buffers) noexcept {
        return buffers.empty() ? nullptr : buffers.data();
    }

    kfac_optimizer *handle_ = nullptr;
};

}  // namespace kfac

#endif /* KFAC_HPP */
