/*
 * kfac.h — the C interface of libkfac, the curvature step of second-order training.
 *
 * This header is the contract and the reference documentation of the library. Everything a
 * binding (Python ctypes, Swift, C++) may call is declared here; nothing else is exported.
 *
 * ---------------------------------------------------------------------------------------------
 * Overview
 * ---------------------------------------------------------------------------------------------
 * A trainer runs its own forward and backward passes. For every layer it registers, it hands the
 * library raw row-major buffers:
 *   - the layer's inputs ("activations"), during or after the forward pass;
 *   - the gradients of the loss at the layer's outputs, during or after the backward pass;
 *   - at the end of the step, the gradient of the layer's parameters.
 * The library keeps Kronecker-factored curvature statistics (K-FAC, Martens & Grosse 2015),
 * inverts them on a schedule and overwrites the parameter gradients with preconditioned update
 * directions. The trainer then applies them with its learning rate (plain SGD, or its own
 * momentum): `W -= learning_rate * direction`.
 *
 * A typical step:
 *
 *     kfac_optimizer *opt;
 *     kfac_optimizer_create(KFAC_FLOAT32, &opt);
 *     kfac_dense_desc d0 = {sizeof d0, .in_features = 784, .out_features = 256, .has_bias = 1};
 *     kfac_dense_desc d1 = {sizeof d1, .in_features = 256, .out_features = 10, .has_bias = 1};
 *     int32_t l0, l1, wanted;
 *     kfac_layer_add_dense(opt, &d0, &l0);
 *     kfac_layer_add_dense(opt, &d1, &l1);
 *     for (;;) {
 *         ... forward: x -> layer l0 -> h -> layer l1 -> logits ...
 *         kfac_optimizer_wants_statistics(opt, &wanted);
 *         if (wanted) {
 *             kfac_layer_record_inputs_f32(opt, l0, x, batch);
 *             kfac_layer_record_inputs_f32(opt, l1, h, batch);
 *         }
 *         ... backward: dlogits, dh, weight and bias gradients ...
 *         if (wanted) {
 *             kfac_layer_record_output_grads_f32(opt, l1, dlogits, batch);
 *             kfac_layer_record_output_grads_f32(opt, l0, dh_pre, batch);
 *         }
 *         float *w_grads[2] = {dW0, dW1}, *b_grads[2] = {db0, db1};
 *         if (kfac_optimizer_step_f32(opt, w_grads, b_grads, 2) != KFAC_OK)
 *             fprintf(stderr, "%s\n", kfac_optimizer_last_error(opt));
 *         ... W -= lr * dW, b -= lr * db ...
 *     }
 *     kfac_optimizer_free(opt);
 *
 * ---------------------------------------------------------------------------------------------
 * Conventions (dense layers)
 * ---------------------------------------------------------------------------------------------
 * A dense layer computes s = W a + b. W is stored [out][in] row-major (PyTorch's
 * `Linear.weight`), b is [out]. With a bias the layer's parameter matrix is Θ = [W | b], the bias
 * being the last column, and the input is extended to ā = [a; 1].
 *
 * Inputs are passed as `rows` row-major rows of `in` values; output gradients as `rows` rows of
 * `out` values. A batch of N examples passes N rows; a sequence batch of N sequences of T tokens
 * passes N·T rows (the layer is shared across tokens).
 *
 * Gradients. The library expects g_n = ∂ℓ_n/∂s_n, the gradient of the n-th term of a SUMMED
 * loss L = Σ_n ℓ_n. Callers that differentiate a mean loss (PyTorch's default `reduction="mean"`)
 * set KFAC_PARAM_LOSS_REDUCTION to KFAC_REDUCTION_MEAN and the library multiplies each recorded
 * output gradient by the `rows` of that call; callers whose loss is multiplied by a loss scale
 * (mixed precision) set KFAC_PARAM_OUTPUT_GRAD_SCALE to that scale and the library divides by it.
 * These two parameters act on recorded output gradients only, never on parameter gradients.
 *
 * Factors. For one factor update, with the rows of all record calls since the previous update:
 *     A = (1/N_a) Σ_n ā_n ā_nᵀ        (dimension in + has_bias)
 *     G = (1/N_g) Σ_n g_n g_nᵀ        (dimension out)
 * The curvature block of the layer is A ⊗ G acting on vec(Θ) (column-major vec), i.e. the map
 * V ↦ G V A on [out][in(+1)] matrices. Running factors are exponential moving averages:
 *     A ← β A + (1 − β) A_batch,   β = KFAC_PARAM_FACTOR_DECAY;
 * the first update of a layer initialises A = A_batch (same for G).
 *
 * Inverse strategies (KFAC_PARAM_INVERSE_STRATEGY), λ = KFAC_PARAM_DAMPING:
 *   KFAC_INVERSE_CHOLESKY — factored Tikhonov damping (Martens & Grosse 2015, §6.3):
 *       π = sqrt((tr A / dim A) / (tr G / dim G))   (π = 1 if KFAC_PARAM_PI_DAMPING is 0, or
 *                                                     if a trace is 0, e.g. all-zero gradients)
 *       U = (G + (√λ/π) I)⁻¹ V (A + π√λ I)⁻¹,
 *     the two damped inverses formed by Cholesky factorisation (LAPACK potrf/potri). λ and π
 *     are baked into the inverses when they are computed: a new λ takes effect at the next
 *     inverse update.
 *   KFAC_INVERSE_EIGEN — exact damping through eigendecompositions (LAPACK syevd):
 *       A = Q_A diag(d_A) Q_Aᵀ,  G = Q_G diag(d_G) Q_Gᵀ,
 *       U = Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ  =  (A ⊗ G + λ I)⁻¹ vec(V).
 *     Negative eigenvalues from rounding are clamped to 0. λ is applied when preconditioning,
 *     so a new λ takes effect at the next step.
 *   KFAC_INVERSE_EKFAC (experimental, see "EKFAC") — the eigen strategy's bases with a scaling S
 *     re-estimated from per-example gradients in place of d_G d_Aᵀ:
 *       U = Q_G [(Q_Gᵀ V Q_A) ⊘ (S + λ)] Q_Aᵀ.
 *
 * KL clipping (KFAC_PARAM_KL_CLIP = κ > 0, η = KFAC_PARAM_LEARNING_RATE): after preconditioning
 * every layer, all directions are multiplied by
 *       ν = min(1, sqrt(κ / (η² Σ_layers |⟨U_l, V_l⟩|)))
 * where V_l is the layer's gradient (bias included) and ⟨·,·⟩ the Frobenius inner product.
 * η is used for nothing else: the library returns directions, the caller scales by its own
 * learning rate.
 *
 * Schedule. The optimizer has a step counter k (0 at creation, +1 per successful
 * kfac_optimizer_step_*). In kfac_optimizer_step_*, in this order:
 *   1. if KFAC_PARAM_FACTOR_UPDATE_PERIOD = Tf > 0 and k mod Tf = 0, the statistics recorded
 *      since the previous factor update are folded into the running factors;
 *   2. if KFAC_PARAM_INVERSE_UPDATE_PERIOD = Ti > 0 and k mod Ti = 0, the inverses of all
 *      layers are recomputed from the factors just folded (in parallel across layers); with
 *      Ti > 0, a layer that has no inverses for the current strategy is inverted at any step
 *      (KFAC_PARAM_INVERSE_SPREAD spreads these inversions over the period's steps;
 *      KFAC_PARAM_ASYNC_INVERSION hands them to a background thread and commits them later);
 *   3. every layer's gradient is preconditioned, then KL-clipped, and written back.
 * A period of 0 means "only when asked": kfac_optimizer_update_factors and
 * kfac_optimizer_update_inverses do steps 1 and 2 on demand. Statistics recorded on steps that are
 * not factor-update steps are kept and folded at the next factor update.
 * kfac_optimizer_wants_statistics tells whether recording is useful now.
 *
 * ---------------------------------------------------------------------------------------------
 * Conventions (convolutions, channel grouping)
 * ---------------------------------------------------------------------------------------------
 * A 2-D convolution is described by kfac_conv2d_desc and follows PyTorch's Conv2d exactly:
 * weight [C_out][C_in/groups][kh][kw] row-major (for either activation layout), bias [C_out],
 * output size H_out = (H + 2·padding − dilation·(kh − 1) − 1) / stride + 1 (same for W). Inputs
 * are [N][C_in][H][W] (KFAC_LAYOUT_NCHW) or [N][H][W][C_in] (KFAC_LAYOUT_NHWC); output gradients
 * [N][C_out][H_out][W_out] or [N][H_out][W_out][C_out]. For convolutions `rows` means examples N.
 * A 1-D convolution over length L is the case kernel_h = 1, input_h = 1 (input [N][C][L] is then
 * exactly [N][C][1][L]).
 *
 * Each convolution group g (PyTorch's `groups`, including depthwise) is an independent block:
 * the layer's curvature is ⊕_g Ω_g ⊗ Γ_g acting on vec([W_g | b_g]), W_g the rows of the weight
 * of g's output channels flattened to [C_out/groups][(C_in/groups)·kh·kw], b_g their biases.
 * With ā_{n,t} the receptive-field patch at output position t (entries ordered like the
 * flattened weight, zeros where the kernel reaches into the padding, then 1 for the bias),
 * g_{n,t} the output gradient there and |T| = H_out·W_out (KFC, Grosse & Martens 2016):
 *     Ω_g = (1/N) Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ,      Γ_g = (1/(N·|T|)) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ.
 * (So a 1×1 convolution has Ω = |T|·A and Γ = G of the dense layer applied at every position.)
 * Patches are formed inside the library for chunks of examples of at most 2^23 values (or one
 * example if larger) and reduced by BLAS syrk, so memory stays bounded whatever N is.
 *
 * KFAC_CONV_SUA (spatially uncorrelated activations, Laurent et al. 2018, §2.1) replaces Ω_g by
 * C_g ⊗ I_{kh·kw} in the weight's [c][i][j] order plus a 1×1 bias block |T|, where C_g is the
 * mean over the kh·kw kernel offsets of Ω_g's same-offset diagonal blocks:
 *     C_g = (1/(N·kh·kw)) Σ_n Σ_pixels m(pixel) x x ᵀ,
 * m(pixel) the number of (output position, kernel offset) pairs that read the pixel. This is
 * exactly "Ω with cross-offset blocks removed and diagonal blocks replaced by their mean", also
 * at the borders (padding contributes zeros), with the bias's cross terms dropped. C_g costs
 * O(C³) to invert instead of O((C·kh·kw)³), and no patch matrix is formed.
 *
 * Channel grouping (Laurent et al. 2018, §2.2): input_group_size s > 0 restricts Ω (or A) to
 * its block diagonal over groups of s consecutive input channels (dense: features; a conv
 * channel group covers its channels' kh·kw coordinates; within a convolution group, channels
 * are counted from that group's first), the bias coordinate becoming its own 1×1 block;
 * output_group_size does the same for Γ (or G) over output channels. The last group may be smaller.
 * Each block is inverted on its own, all blocks of all layers as one parallel batch; a size of 0,
 * or one not smaller than the channel count, means no grouping.
 *
 * kfac_layer_get_factors_* returns Ω_g and Γ_g as full matrices in the weight's order, zeros off
 * the blocks (for SUA, the expanded C_g ⊗ I with the bias block).
 *
 * ---------------------------------------------------------------------------------------------
 * Precision
 * ---------------------------------------------------------------------------------------------
 * The precision of a handle is chosen at creation (KFAC_FLOAT32 or KFAC_FLOAT64). Factors,
 * inverses, eigen decompositions and pending statistics are all kept in that precision; all
 * arithmetic runs in it. Buffer functions come in `_f32` and `_f64` forms; calling the form that
 * does not match the handle's precision returns KFAC_ERROR_DTYPE_MISMATCH. The library never
 * narrows or widens a caller's buffer silently. Scalar parameters are doubles in the API and are
 * rounded to the handle's precision where they enter arithmetic.
 *
 * ---------------------------------------------------------------------------------------------
 * Errors, ownership, threading
 * ---------------------------------------------------------------------------------------------
 * Every function that can fail returns an `int` status: KFAC_OK (0) or a negative kfac_status,
 * and delivers its results through out-parameters, which it writes only on success. Five
 * functions cannot fail and return a value instead: kfac_version_number, kfac_version_string,
 * kfac_status_string, kfac_optimizer_last_error and kfac_optimizer_free (void).
 * A failed call leaves the handle exactly as it was before the call (factors, inverses, pending
 * statistics, counters, parameters), and leaves caller buffers it would have written untouched.
 * kfac_optimizer_last_error(handle) then describes the failure. No input makes the library abort,
 * trap or exit.
 *
 * Buffers are owned by the caller and only borrowed for the duration of a call; the library
 * copies whatever it keeps. Buffers must not alias each other unless stated.
 *
 * A handle may be used by one thread at a time (calls on it must not overlap); distinct handles
 * are independent and may be used concurrently from different threads. To invert the factors of
 * different layers in parallel, a handle starts up to KFAC_PARAM_NUM_THREADS − 1 worker threads
 * the first time it needs them; they sleep between calls and are joined by kfac_optimizer_free.
 * With KFAC_PARAM_ASYNC_INVERSION a handle also has one background thread that inverts between
 * calls (on library-owned snapshots only); it too is joined by kfac_optimizer_free.
 * They are used only while OpenBLAS is single-threaded (see KFAC_PARAM_NUM_THREADS); the library
 * never changes OpenBLAS's process-wide thread setting.
 *
 * ---------------------------------------------------------------------------------------------
 * Names and sections
 * ---------------------------------------------------------------------------------------------
 * Every function is named kfac_<object>_<verb>[_f32|_f64]; the object is the section it belongs
 * to: kfac_version_*, kfac_status_*, kfac_optimizer_* (the handle, its schedule and step),
 * kfac_param_* (the parameter table), kfac_layer_* (registration, statistics, per-layer
 * preconditioning), kfac_adaptive_* (the adaptive mode), kfac_sample_* (samplers), kfac_state_*
 * (checkpoints), and in the experimental section kfac_candidates_*, kfac_curvature_*, kfac_gn_*
 * (Gauss-Newton products), kfac_cg_* (conjugate gradient and Newton-CG) and EKFAC's per-layer
 * kfac_layer_record_examples_* and kfac_layer_get_ekfac_scaling_*, and kfac_distributed_* (distributed runs). A
 * family of methods adds one section (and one object name) to this header. Enum-typed arguments
 * are int32_t; sizes and row counts int64_t; byte sizes size_t.
 */
#ifndef KFAC_H
#define KFAC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------
 * API macros
 *
 * KFAC_API marks every declaration of the library (default visibility; dllimport on Windows
 * unless KFAC_BUILDING_LIBRARY). Declarations inside `#if defined(KFAC_EXPERIMENTAL_API)` (the
 * last section of this header) are exported by every build of the library, but may change or
 * disappear in any minor release: define KFAC_EXPERIMENTAL_API before including kfac.h to use
 * them, and accept that. Each experimental function says since when it exists.
 * ------------------------------------------------------------------------------------------- */

#if defined(_WIN32) && !defined(KFAC_BUILDING_LIBRARY)
#  define KFAC_API __declspec(dllimport)
#elif defined(_WIN32)
#  define KFAC_API __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#  define KFAC_API __attribute__((visibility("default")))
#else
#  define KFAC_API
#endif

/* ---------------------------------------------------------------------------------------------
 * Version and compatibility
 *
 * The version is written here and nowhere else: the build, the library's kfac_version_* and the
 * bindings read these macros.
 *
 * Compatibility policy. While the major version is 0, a minor release (0.1 → 0.2) may change the
 * ABI and the API — renames, new parameter numbers, new struct layouts — and lists every change
 * in CHANGES.md; a patch release (0.2.0 → 0.2.1) keeps both. The shared object's SONAME is
 * libkfac.so.0.MINOR while the major version is 0, so a program linked against 0.1 never loads a
 * 0.2 library by accident; from 1.0 on it will be libkfac.so.MAJOR and the ABI will change only
 * with the major version (functions, enum values and struct fields are then only added; growable
 * structs carry struct_size). The experimental section is outside this promise at any version.
 * State images carry their own format version (see "State").
 * ------------------------------------------------------------------------------------------- */

#define KFAC_VERSION_MAJOR 0
#define KFAC_VERSION_MINOR 2
#define KFAC_VERSION_PATCH 0
#define KFAC_VERSION_STRING "0.2.0"
/** MAJOR*10000 + MINOR*100 + PATCH. */
#define KFAC_VERSION_NUMBER (KFAC_VERSION_MAJOR * 10000 + KFAC_VERSION_MINOR * 100 + KFAC_VERSION_PATCH)

/** The version of the library actually loaded, as KFAC_VERSION_NUMBER. Compare with the macro
 *  to detect a header/library mismatch. Cannot fail. */
KFAC_API unsigned kfac_version_number(void);

/** The loaded library's version as a static string, e.g. "0.2.0". Never NULL; cannot fail. */
KFAC_API const char *kfac_version_string(void);

/* ---------------------------------------------------------------------------------------------
 * Status codes. The values are pinned and will not change; new codes may be added in the bands.
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_status {
    KFAC_OK = 0,

    /* -1 … -9: arguments */
    KFAC_ERROR_NULL_POINTER = -1,           /* a required pointer argument is NULL */
    KFAC_ERROR_INVALID_ARGUMENT = -2,       /* an enum or flag argument has no defined meaning */
    KFAC_ERROR_UNKNOWN_PARAMETER = -3,      /* kfac_param value not defined */
    KFAC_ERROR_PARAMETER_TYPE = -4,         /* int setter/getter used for a double parameter or vice versa */
    KFAC_ERROR_PARAMETER_RANGE = -5,        /* value outside the parameter's documented bounds */

    /* -10 … -19: shapes and sizes */
    KFAC_ERROR_INVALID_SIZE = -10,          /* a size or count is zero, negative or inconsistent */
    KFAC_ERROR_SIZE_OVERFLOW = -11,         /* sizes whose products overflow or exceed memory limits */
    KFAC_ERROR_UNKNOWN_LAYER = -12,         /* layer id not registered on this handle */
    KFAC_ERROR_DTYPE_MISMATCH = -13,        /* _f32 call on a float64 handle or vice versa */

    /* -20 … -29: call order and misuse */
    KFAC_ERROR_NO_STATISTICS = -20,         /* a layer has no factors yet (record, then update factors) */
    KFAC_ERROR_NO_INVERSES = -21,           /* preconditioning before the inverses were computed */
    KFAC_ERROR_LAYERS_FROZEN = -22,         /* layers cannot be added after statistics were recorded */
    KFAC_ERROR_NO_STEP = -23,               /* adaptive mode: solve after a step, report after a solve */
    KFAC_ERROR_NO_SOLVE = -24,              /* conjugate gradient: no solve in the state the call needs */
    KFAC_ERROR_NO_COLUMNS = -25,            /* Gauss-Newton product without kept columns or chain forward pass */

    /* -30 … -39: numerical */
    KFAC_ERROR_NON_FINITE = -30,            /* NaN or Inf in an input buffer or a resulting factor */
    KFAC_ERROR_NOT_POSITIVE_DEFINITE = -31, /* a damped factor failed Cholesky factorisation */
    KFAC_ERROR_EIGEN_FAILED = -32,          /* the eigensolver did not converge */

    /* -40 … -49: resources */
    KFAC_ERROR_OUT_OF_MEMORY = -40,

    /* -50 … -59: unsupported */
    KFAC_ERROR_UNSUPPORTED = -50,

    /* -60 … -69: state images and files */
    KFAC_ERROR_IO = -60,                    /* a file could not be opened, written, synced or renamed */
    KFAC_ERROR_BUFFER_TOO_SMALL = -61,      /* the caller's buffer is smaller than kfac_state_get_size */
    KFAC_ERROR_CORRUPT_STATE = -62,         /* bad magic, truncated image or checksum mismatch */
    KFAC_ERROR_STATE_VERSION = -63,         /* image written by an incompatible format version */
    KFAC_ERROR_STATE_MISMATCH = -64,        /* image's precision or layers differ from the handle's */

    /* -70 … -79: caller code */
    KFAC_ERROR_CALLBACK = -70,              /* a caller-supplied function returned non-zero */

    KFAC_ERROR_INTERNAL = -99               /* a bug in the library; please report it */
} kfac_status;

/** A static, never-NULL English description of a status code (also for unknown codes). */
KFAC_API const char *kfac_status_string(int status);

/* ---------------------------------------------------------------------------------------------
 * Handles
 * ------------------------------------------------------------------------------------------- */

typedef struct kfac_optimizer kfac_optimizer;

typedef enum kfac_dtype {
    KFAC_FLOAT32 = 1,
    KFAC_FLOAT64 = 2
} kfac_dtype;

/** Creates an optimizer whose buffers and state are in precision `dtype`, with default
 *  parameters and no layers. On success *out receives the handle and KFAC_OK is returned; on
 *  failure *out is set to NULL (when out is not NULL).
 *  Errors: NULL_POINTER (out), INVALID_ARGUMENT (dtype), OUT_OF_MEMORY. */
KFAC_API int kfac_optimizer_create(int32_t dtype, kfac_optimizer **out);

/** Releases a handle and everything it owns, joining its worker threads. NULL is accepted and
 *  ignored. Cannot fail. */
KFAC_API void kfac_optimizer_free(kfac_optimizer *opt);

/** A message about the last failed call on `opt`, or "" if the last call succeeded. The string
 *  is owned by the handle and valid until the next call on it. For opt == NULL, a static
 *  message. Never NULL; cannot fail. */
KFAC_API const char *kfac_optimizer_last_error(const kfac_optimizer *opt);

/** The precision the handle was created with (KFAC_FLOAT32 or KFAC_FLOAT64), in *dtype.
 *  Errors: NULL_POINTER. */
KFAC_API int kfac_optimizer_get_dtype(const kfac_optimizer *opt, int32_t *dtype);

/* ---------------------------------------------------------------------------------------------
 * Parameters. Each parameter has one type (double or int64), bounds, a default, a family and a
 * moment it takes effect — one row of a table inside the library, which kfac_param_get_info
 * returns and which validation, the state image and the bindings all read. Setting a value out of
 * bounds (or NaN/Inf) fails with KFAC_ERROR_PARAMETER_RANGE and changes nothing. Parameters may
 * be changed between any two calls (to schedule them).
 *
 * Numbers are banded by family and pinned within a release: 1–99 core K-FAC, 100–199 reserved
 * (curvature sources: KFLR, KFRA), 200–299 adaptive mode, 300–399 Gauss-Newton and CG, 400–499
 * EKFAC, 500–599 distributed, 600–699 block-tridiagonal, 1000 and up experimental. A number's
 * type comes from the table, not from its band.
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_param {
    /* ---- core (1–99) ---- */
    /* double, [0, ∞), default 0.1. η of the KL clip; used for nothing else (0: ν = 1). */
    KFAC_PARAM_LEARNING_RATE = 1,
    /* double, (0, ∞), default 1e-3. λ, see "Inverse strategies" (eigen: from the next step;
     * Cholesky: baked into the inverses at the next inverse update). */
    KFAC_PARAM_DAMPING = 2,
    /* double, [0, 1), default 0.95. β of the factors' moving average. */
    KFAC_PARAM_FACTOR_DECAY = 3,
    /* double, [0, ∞), default 1e-3. κ of the KL clip; 0 disables clipping. */
    KFAC_PARAM_KL_CLIP = 4,
    /* double, (0, ∞), default 1. Recorded output gradients are divided by it. */
    KFAC_PARAM_OUTPUT_GRAD_SCALE = 5,
    /* int, [0, 2^31 − 1], default 1. Tf: fold statistics every Tf steps; 0 = only
     * kfac_optimizer_update_factors. */
    KFAC_PARAM_FACTOR_UPDATE_PERIOD = 6,
    /* int, [0, 2^31 − 1], default 10. Ti: recompute inverses every Ti steps; 0 = only
     * kfac_optimizer_update_inverses. */
    KFAC_PARAM_INVERSE_UPDATE_PERIOD = 7,
    /* int, kfac_inverse_strategy, default KFAC_INVERSE_EIGEN. Changing it discards the current
     * inverses: they are recomputed at the next step (or kfac_optimizer_update_inverses). */
    KFAC_PARAM_INVERSE_STRATEGY = 8,
    /* int, 0 or 1, default 1. Use π in factored damping (Cholesky strategy only). */
    KFAC_PARAM_PI_DAMPING = 9,
    /* int, kfac_reduction, default KFAC_REDUCTION_SUM. How the caller's loss was reduced. */
    KFAC_PARAM_LOSS_REDUCTION = 10,
    /* int, [0, 256], default 0 = the number of online CPUs. Threads the library uses to
     * compute the inverses of different layers in parallel (1 = sequential). Parallel inversion
     * is used only while OpenBLAS runs single-threaded (OPENBLAS_NUM_THREADS=1 or
     * openblas_set_num_threads(1)); otherwise every inversion uses OpenBLAS's own threads. */
    KFAC_PARAM_NUM_THREADS = 11,
    /* int, 0 or 1, default 0 = off. Spread the inversions of a period over its steps (with
     * Ti = KFAC_PARAM_INVERSE_UPDATE_PERIOD > 1): each block (a layer, or one convolution group)
     * gets a phase s in [0, min(Ti, blocks)) and is re-inverted at the steps with k mod Ti = s,
     * from the factors as folded by that step, instead of every block at k mod Ti = 0. Phases
     * are fixed by the blocks' shapes and Ti alone: longest processing time first (blocks in
     * decreasing Σ d³ over their factors' diagonal blocks, ties by layer order, each to the
     * phase with the least work so far), so no step inverts more than about 1/Ti of the work
     * unless one block alone is more. Staleness: as without spreading, a block's inverse is at
     * most Ti − 1 steps (one period) old, but the blocks' inverses come from different steps'
     * factors. A block without an inverse for the strategy is still inverted at any step; with
     * the Cholesky strategy each block bakes in the λ (or γ) and π of its own inversion step,
     * and a γ step (KFAC_PARAM_FACTOR_DAMPING_PERIOD) inverts every block as before. A step
     * that fails changes no inverse; kfac_optimizer_update_inverses inverts every block. */
    KFAC_PARAM_INVERSE_SPREAD = 12,
    /* int, kfac_async_inversion, default KFAC_ASYNC_INVERSION_OFF. Invert in the background:
     * with Ti = KFAC_PARAM_INVERSE_UPDATE_PERIOD > 0, a due step (k mod Ti = 0) preconditions
     * with the inverses it already has, copies the factors it just folded into snapshot buffers
     * the handle owns, and hands their inversion to one library thread (using up to
     * KFAC_PARAM_NUM_THREADS − 1 threads, at least one: one core is left to the caller's own
     * step), which runs while the caller does its forward and backward passes. A later step commits the result:
     *   KFAC_ASYNC_INVERSION_DETERMINISTIC: exactly the next due step, which first waits for it.
     *     Step k then uses the inverses of the factors of step Ti·(⌊k/Ti⌋ − 1) for k >= 2·Ti and
     *     of step 0 before (step 0 inverts in the step: no block has an inverse yet), i.e. a
     *     synchronous run lagging one period; directions are a pure function of the inputs.
     *   KFAC_ASYNC_INVERSION_NEWEST: the first step that finds the work finished (without
     *     waiting), at the latest the next due step, which waits for it: a step uses the newest
     *     inverses that are complete, which depends on timing.
     * Staleness: a step's inverses come from factors at most one period older than those the
     * synchronous schedule would use (at most 2·Ti − 1 steps old). A block without an inverse for
     * the strategy, and a block whose background inversion failed, is inverted in the step (from
     * that step's factors) as without this parameter; a failed background inversion is not
     * reported otherwise. With the Cholesky strategy the inverses bake in the λ (or γ) and π of
     * their launch step. Threads: the background work touches only its snapshots and the staging
     * inverses of its blocks, never the caller's buffers or what the step records and folds; the
     * caller must still not call into the same handle concurrently. Parameter changes while work
     * is pending: a new inverse strategy discards it at the next step (which inverts every block
     * itself); setting this parameter to OFF or Ti to 0 makes the next step wait for it and commit
     * it; other parameters apply from the next launch. kfac_optimizer_update_inverses waits for and
     * discards pending work (even when it fails), and so does a successful state load; a state
     * image holds the committed inverses only (pending work is not saved, so an image does not
     * depend on timing, and a run resumed from it has no work pending: its next due step
     * launches and the one after commits). kfac_optimizer_free waits for the work and joins the
     * thread. Unsupported (KFAC_ERROR_UNSUPPORTED at the step, nothing changed) together with
     * KFAC_INVERSE_EKFAC (its scaling is re-estimated in the step, in the bases it inverts),
     * KFAC_PARAM_INVERSE_SPREAD (both move inversions off the due step: choose one),
     * KFAC_PARAM_FACTOR_DAMPING_PERIOD > 0 (a γ step inverts every block for each candidate),
     * block-tridiagonal links and distributed runs (world size > 1; their inverse exchange
     * returns KFAC_ERROR_UNSUPPORTED). After warm-up (the first launch allocates the snapshots
     * and starts the thread) a step still allocates nothing. */
    KFAC_PARAM_ASYNC_INVERSION = 13,

    /* ---- adaptive mode (200–299), see "Adaptive mode" ---- */
    /* int, [0, 2^31 − 1], default 0 = off. T₁ of the Levenberg–Marquardt adjustment: every T₁
     * reported loss changes, λ is multiplied by ω₁^T₁ if ρ > 3/4 and divided by it if ρ < 1/4. */
    KFAC_PARAM_LM_INTERVAL = 200,
    /* double, (0, 1), default 0.95. ω₁ of the Levenberg–Marquardt adjustment. */
    KFAC_PARAM_LM_DECAY = 201,
    /* double, [0, ∞), default 0. γ: when > 0, the damping of the factor inverses (and of the
     * eigen strategy's divisor) instead of λ, so that the Levenberg–Marquardt adjustment of λ
     * only changes the quadratic model (Martens & Grosse 2015, §6.6). 0 = use λ for both. */
    KFAC_PARAM_FACTOR_DAMPING = 202,
    /* int, [0, 2^31 − 1], default 0 = off. T₂: every T₂ steps (at k ≡ 0 mod T₂) the step also
     * prepares directions for the factor dampings γ·ω₂ and γ/ω₂, and the experimental
     * kfac_candidates_solve_step_size_* keeps the γ whose update lowers the quadratic model most
     * (Martens & Grosse 2015, §6.6). With γ = 0 the candidates start from λ. */
    KFAC_PARAM_FACTOR_DAMPING_PERIOD = 203,
    /* double, (0, 1), default 0.95. ω₂'s base: the factor-damping candidates of a γ step are
     * γ, γ·ω₂ and γ/ω₂ with ω₂ = base^T₂ (M&G's √(19/20)^T₂ on their γ, which is the square
     * root of this library's γ). */
    KFAC_PARAM_FACTOR_DAMPING_DECAY = 204,
    /* Safeguards of the adaptive mode. Without them, M&G's settings (λ0 = γ0 = 150, T₁ = 5,
     * T₂ = T₃ = 20) let λ fall by ω₁^T₁ at every adjustment while ρ ≈ 1 (α and μ come from the
     * exact-Fisher model, so ρ stays near 1 once λ no longer matters to it): λ reached 6.5e-12
     * in 600 steps, where it takes some 500 steps to recover. And γ, re-chosen by the model
     * value, drifted away from λ with nothing to bring it back: up to 10^4–10^11 (α growing as
     * γ, the directions shrinking as 1/γ) while λ fell, 10^5–10^7 times λ (issue 14;
     * benchmarks/training/README.md, findings). */
    /* double, [0, ∞), default 1e-4 (0.2: 1e-8). λ_min: the Levenberg–Marquardt adjustment
     * never decreases λ below it (a λ set below it is not raised). Keeps λ within reach (from
     * 1e-4 back to 1 takes about 180 steps at ω₁ = 0.95, T₁ = 5) and bounds the step where the
     * model does not: with cross-entropy on mostly well-classified batches ρ ≥ 2(1 − 1/e) ≈ 1.26
     * > 3/4 at every λ, so λ falls to the floor whatever it is (from 150: step 460), and there
     * the exact-Fisher model bounds nothing along directions those examples' outputs barely
     * feel. At 1e-8 (kfac-jax's and TF K-FAC's min_damping) one hard batch then gave updates
     * 50–300× the usual and diverged runs — 3 of 5 MNIST-1D CNN seeds non-finite within 1000
     * steps, a digits-autoencoder seed from 15 to 908; at 1e-4 none of those runs blew up, the
     * MNIST-1D MLP reached L* on every seed, and the MNIST-5k autoencoder's runs were unchanged
     * (issue 14; benchmarks/training/README.md, "Adaptive mode on MNIST-1D"). λ is in the units
     * of the Fisher of the loss as recorded (a mean over examples): for a summed loss or a
     * large output_grad_scale, scale it likewise. It also floors the Newton-CG solver's λ
     * (kfac_cg_report_loss_change). 0 = no floor. */
    KFAC_PARAM_DAMPING_MIN = 205,
    /* double, [1, ∞), default 10. r: the re-choice of γ (KFAC_PARAM_FACTOR_DAMPING_PERIOD)
     * keeps γ within a factor r of λ: a γ step first brings γ into [λ/r, λ·r] (the step uses,
     * and keeps, that value) and drops a candidate γ·ω₂ or γ/ω₂ outside it (as a failed one,
     * see "Re-choosing γ"). M&G start from γ = λ (γ0 = √(λ0 + η) in their notation); the band
     * lets γ follow λ as the Levenberg–Marquardt rule moves it, with room for about two
     * re-choices either way at ω₂ = 0.95^20. The default was chosen with M&G's values on four
     * of the convergence benchmark's settings (r = 10 against 100, 1000 and no band: lowest
     * loss, and the loss targets soonest, on each; see CHANGES.md). Steps that are not γ
     * steps, and a γ set by the caller between them, are not changed; 1e300 turns the band
     * off. */
    KFAC_PARAM_FACTOR_DAMPING_RATIO = 206,

    /* ---- EKFAC (400–499), see "EKFAC" in the experimental section ---- */
    /* double, [0, 1), default 0.95. β_S of the moving average of EKFAC's scaling S between
     * eigenbasis refreshes (the factors' default; the EKFAC authors use 0.75). */
    KFAC_PARAM_EKFAC_DECAY = 400,
    /* int, kfac_ekfac_mode, default KFAC_EKFAC_PER_EXAMPLE (0). How kfac_layer_record_examples_*
     * forms per-example gradients: 0 exact (an example's rows or positions summed), 1 per row. */
    KFAC_PARAM_EKFAC_MODE = 401,

    /* ---- distributed (500–599), see "Distributed (experimental)" ---- */
    /* int, kfac_distributed_reduce, default KFAC_DISTRIBUTED_REDUCE_EAGER. Since 0.2. When a
     * distributed run reduces its statistics; it has no effect in a single process. */
    KFAC_PARAM_DISTRIBUTED_REDUCE = 500
} kfac_param;

typedef enum kfac_inverse_strategy {
    KFAC_INVERSE_CHOLESKY = 0,
    KFAC_INVERSE_EIGEN = 1,
    KFAC_INVERSE_EKFAC = 2    /* experimental, see "EKFAC" */
} kfac_inverse_strategy;

/* Values of KFAC_PARAM_ASYNC_INVERSION. */
typedef enum kfac_async_inversion {
    KFAC_ASYNC_INVERSION_OFF = 0,            /* every inversion runs in its due step */
    KFAC_ASYNC_INVERSION_NEWEST = 1,         /* commit background work as soon as it is complete */
    KFAC_ASYNC_INVERSION_DETERMINISTIC = 2   /* commit it at the next due step (reproducible) */
} kfac_async_inversion;

typedef enum kfac_reduction {
    KFAC_REDUCTION_SUM = 0,   /* output gradients are those of Σ_n ℓ_n */
    KFAC_REDUCTION_MEAN = 1   /* output gradients are those of (1/rows) Σ_n ℓ_n; scaled by rows */
} kfac_reduction;

typedef enum kfac_param_type {
    KFAC_PARAM_TYPE_DOUBLE = 1,   /* kfac_param_set_double / kfac_param_get_double */
    KFAC_PARAM_TYPE_INT = 2       /* kfac_param_set_int / kfac_param_get_int */
} kfac_param_type;

typedef enum kfac_family {
    KFAC_FAMILY_CORE = 0,
    KFAC_FAMILY_ADAPTIVE = 2,
    KFAC_FAMILY_GAUSS_NEWTON = 3,
    KFAC_FAMILY_EKFAC = 4,
    KFAC_FAMILY_DISTRIBUTED = 5
} kfac_family;

typedef enum kfac_param_effect {
    KFAC_EFFECT_IMMEDIATE = 0,       /* by the next call that uses it */
    KFAC_EFFECT_NEXT_STEP = 1,       /* at the next kfac_optimizer_step_* */
    KFAC_EFFECT_NEXT_INVERSION = 2,  /* at the next inverse update (baked into the inverses) */
    KFAC_EFFECT_NEXT_RECORD = 3      /* by the next record call (it scales what is recorded) */
} kfac_param_effect;

/** What the library knows about a parameter. Growable: set struct_size = sizeof(kfac_param_info)
 *  before the call; the library fills only the whole fields that fit and sets struct_size to
 *  the bytes it filled. */
typedef struct kfac_param_info {
    size_t struct_size;
    const char *name;          /* static lower_snake_case name, e.g. "damping" (the Python name) */
    int32_t type;              /* kfac_param_type */
    int32_t family;            /* kfac_family */
    double lower;              /* bounds; -HUGE_VAL / HUGE_VAL = unbounded on that side (values */
    double upper;              /*   must be finite all the same); int bounds are exact */
    int32_t lower_inclusive;   /* 1 if `lower` itself is allowed */
    int32_t upper_inclusive;   /* 1 if `upper` itself is allowed */
    double default_value;      /* the value of a new handle (exact for int parameters) */
    int32_t effect;            /* kfac_param_effect */
    int32_t reserved;          /* 0 */
} kfac_param_info;

/** Fills *info for `param` from the library's table. No handle: the table is static.
 *  Errors (returned only): NULL_POINTER, UNKNOWN_PARAMETER, INVALID_SIZE (struct_size smaller
 *  than the first two fields). Thread-safe. */
KFAC_API int kfac_param_get_info(int32_t param, kfac_param_info *info);

/** The numbers of every parameter this library knows, ascending: *count receives how many there
 *  are, and params[0 .. min(count, capacity)) the numbers (params may be NULL to ask the count).
 *  No handle. Errors (returned only): NULL_POINTER (count), INVALID_SIZE (capacity < 0).
 *  Thread-safe. */
KFAC_API int kfac_param_list(int32_t *params, int32_t capacity, int32_t *count);

/** Sets a double parameter. Errors: NULL_POINTER, UNKNOWN_PARAMETER, PARAMETER_TYPE (an int
 *  parameter), PARAMETER_RANGE (out of bounds, NaN or Inf). */
KFAC_API int kfac_param_set_double(kfac_optimizer *opt, int32_t param, double value);
/** Reads a double parameter into *value. Errors: NULL_POINTER, UNKNOWN_PARAMETER, PARAMETER_TYPE. */
KFAC_API int kfac_param_get_double(const kfac_optimizer *opt, int32_t param, double *value);
/** Sets an int parameter. Errors: NULL_POINTER, UNKNOWN_PARAMETER, PARAMETER_TYPE (a double
 *  parameter), PARAMETER_RANGE. */
KFAC_API int kfac_param_set_int(kfac_optimizer *opt, int32_t param, int64_t value);
/** Reads an int parameter into *value. Errors: NULL_POINTER, UNKNOWN_PARAMETER, PARAMETER_TYPE. */
KFAC_API int kfac_param_get_int(const kfac_optimizer *opt, int32_t param, int64_t *value);

/* ---------------------------------------------------------------------------------------------
 * Layers. Layers are numbered 0, 1, 2, … in the order they are added. All layers must be added
 * before the first statistics are recorded.
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_layer_kind {
    KFAC_LAYER_DENSE = 1,
    KFAC_LAYER_CONV2D = 2
} kfac_layer_kind;

/** A dense layer s = W a (+ b) with W of shape [out_features][in_features]. Growable: set
 *  struct_size = sizeof(kfac_dense_desc); fields past an older caller's struct_size read as 0.
 *  Zero-initialise it. */
typedef struct kfac_dense_desc {
    size_t struct_size;
    int64_t in_features;
    int64_t out_features;
    int32_t has_bias;                 /* 0 or 1 */
    int32_t reserved;                 /* must be 0 */
    int64_t input_group_size;         /* input features per block of A (the bias its own block);
                                         0 = no grouping (see "Conventions (convolutions, channel
                                         grouping)") */
    int64_t output_group_size;        /* output features per block of G; 0 = no grouping */
} kfac_dense_desc;

/** Registers a dense layer. *layer_id receives the new layer's index. The running factors and
 *  the gradient buffers are allocated now: (in+1)² + out² + 3·out·(in+1) values. Pending
 *  statistics (the recorded rows, at most as many as the factor's dimension, then a d×d sum),
 *  staging copies for atomic inversion steps, and the inverses are allocated on first use: in
 *  all up to about five times the factors' size.
 *  Errors: NULL_POINTER, INVALID_SIZE (struct_size smaller than the fields up to reserved,
 *  features < 1, a negative group size), SIZE_OVERFLOW (a factor dimension above 46340 or more
 *  than 2^31 − 1 parameters), INVALID_ARGUMENT (has_bias not 0/1, reserved not 0),
 *  LAYERS_FROZEN, OUT_OF_MEMORY. */
KFAC_API int kfac_layer_add_dense(kfac_optimizer *opt, const kfac_dense_desc *desc, int32_t *layer_id);

typedef enum kfac_layout {
    KFAC_LAYOUT_NCHW = 0,   /* channels first (PyTorch) */
    KFAC_LAYOUT_NHWC = 1    /* channels last (TensorFlow, JAX) */
} kfac_layout;

typedef enum kfac_conv_approximation {
    KFAC_CONV_KFC = 0,      /* full patch second moment */
    KFAC_CONV_SUA = 1       /* spatially uncorrelated activations */
} kfac_conv_approximation;

/** A 2-D convolution, as PyTorch's Conv2d plus the fixed input size. Growable: set struct_size
 *  = sizeof(kfac_conv2d_desc); fields past an older caller's struct_size read as 0. Zero-initialise
 *  it: a stride, dilation or groups of 0 is read as 1. */
typedef struct kfac_conv2d_desc {
    size_t struct_size;
    int64_t in_channels;
    int64_t out_channels;
    int64_t kernel_h, kernel_w;
    int64_t stride_h, stride_w;       /* 0 = 1 */
    int64_t padding_h, padding_w;     /* zeros added on both sides */
    int64_t dilation_h, dilation_w;   /* 0 = 1 */
    int64_t groups;                   /* 0 = 1; must divide in_channels and out_channels */
    int64_t input_h, input_w;         /* the input's spatial size, fixed for the layer */
    int32_t has_bias;                 /* 0 or 1 */
    int32_t layout;                   /* kfac_layout */
    int32_t approximation;            /* kfac_conv_approximation */
    int32_t reserved;                 /* must be 0 */
    int64_t input_group_size;         /* input channels per block of Ω, 0 = no grouping */
    int64_t output_group_size;        /* output channels per block of Γ, 0 = no grouping */
} kfac_conv2d_desc;

/** Registers a 2-D (or 1-D, as 1×L) convolution. *layer_id receives the new layer's index. Each
 *  convolution group allocates its factors and gradient buffers as a dense layer of
 *  (C_in/groups)·kh·kw inputs and C_out/groups outputs would (SUA and grouping store only the
 *  blocks), plus a patch buffer of at most 2^23 values on first use.
 *  Errors: NULL_POINTER, INVALID_SIZE (struct_size too small, a size < 1 or negative padding,
 *  groups not dividing the channels, a kernel larger than the padded input), INVALID_ARGUMENT
 *  (has_bias, layout, approximation or reserved out of range), SIZE_OVERFLOW, LAYERS_FROZEN,
 *  OUT_OF_MEMORY. */
KFAC_API int kfac_layer_add_conv2d(kfac_optimizer *opt, const kfac_conv2d_desc *desc, int32_t *layer_id);

/** The number of registered layers, in *count. Errors: NULL_POINTER. */
KFAC_API int kfac_layer_count(const kfac_optimizer *opt, int32_t *count);

/** Describes a registered layer. Growable: set struct_size = sizeof(kfac_layer_info) before
 *  the call; the library fills only the whole fields that fit in struct_size (an older, smaller
 *  struct) and sets struct_size to the number of bytes it filled. */
typedef struct kfac_layer_info {
    size_t struct_size;
    int32_t kind;            /* kfac_layer_kind */
    int32_t has_bias;        /* 0 or 1 */
    int64_t in_features;     /* dense: in; convolution: in_channels */
    int64_t out_features;    /* dense: out; convolution: out_channels */
    int64_t a_dim;           /* dimension of one group's input-side factor (dense: in + has_bias;
                                convolution: (C_in/groups)·kh·kw + has_bias) */
    int64_t g_dim;           /* dimension of one group's output-side factor (out / groups) */
    int32_t has_factors;     /* 1 once every group's running factors exist */
    int32_t has_inverses;    /* 1 once inverses (or eigendecompositions) exist for them */
    int64_t groups;          /* independent Kronecker blocks: convolution groups, 1 for dense */
} kfac_layer_info;

/** Fills *info for layer `layer`. Errors: NULL_POINTER, UNKNOWN_LAYER, INVALID_SIZE
 *  (struct_size smaller than the first two fields, struct_size and kind). */
KFAC_API int kfac_layer_get_info(const kfac_optimizer *opt, int32_t layer, kfac_layer_info *info);

/* ---------------------------------------------------------------------------------------------
 * Statistics. Record calls add rows to the layer's pending statistics; they are folded into
 * the running factors at the next factor update. Several calls per step are allowed (e.g. for
 * micro-batches); each side is averaged over all rows recorded for it.
 * Buffers are checked before anything is added: NaN/Inf, or values so large that the pending
 * second-moment sums — those already pending plus this call's — could overflow the handle's
 * precision, give KFAC_ERROR_NON_FINITE; more than 2^53 pending rows give SIZE_OVERFLOW.
 * Pending statistics that every fold or inversion refuses (e.g. NOT_POSITIVE_DEFINITE at every
 * step from factors that are numerically singular) are dropped with
 * kfac_optimizer_discard_statistics.
 * ------------------------------------------------------------------------------------------- */

/** *wanted receives 1 if statistics recorded now would be folded at the next
 *  kfac_optimizer_step_* call (the current step is a factor-update step), else 0. With a
 *  factor-update period of 0 it is 1 (the caller decides when to call
 *  kfac_optimizer_update_factors). Errors: NULL_POINTER. */
KFAC_API int kfac_optimizer_wants_statistics(const kfac_optimizer *opt, int32_t *wanted);

/** Adds `rows` layer inputs to layer `layer`'s input statistics: for a dense layer row-major
 *  [rows][in_features] (the bias 1 is appended by the library); for a convolution `rows`
 *  examples [rows][C_in][H][W] or [rows][H][W][C_in] as its layout says.
 *  Errors: NULL_POINTER, UNKNOWN_LAYER, INVALID_SIZE (rows < 1), SIZE_OVERFLOW,
 *  DTYPE_MISMATCH, NON_FINITE. */
KFAC_API int kfac_layer_record_inputs_f32(kfac_optimizer *opt, int32_t layer, const float *inputs, int64_t rows);
KFAC_API int kfac_layer_record_inputs_f64(kfac_optimizer *opt, int32_t layer, const double *inputs, int64_t rows);

/** Adds `rows` output gradients to layer `layer`'s gradient statistics — dense [rows][out_features],
 *  convolution [rows][C_out][H_out][W_out] or channels-last — after the reduction and scale
 *  parameters are applied (see "Gradients"; for a convolution KFAC_REDUCTION_MEAN multiplies by
 *  the examples, rows).
 *  Errors: as kfac_layer_record_inputs_*. */
KFAC_API int kfac_layer_record_output_grads_f32(kfac_optimizer *opt, int32_t layer, const float *output_grads,
                                                int64_t rows);
KFAC_API int kfac_layer_record_output_grads_f64(kfac_optimizer *opt, int32_t layer, const double *output_grads,
                                                int64_t rows);

/** Folds all pending statistics into the running factors now (step 1 of the schedule,
 *  regardless of the period). Layers with nothing pending keep their factors.
 *  Errors: NULL_POINTER, NON_FINITE (a resulting factor; nothing is folded), OUT_OF_MEMORY. */
KFAC_API int kfac_optimizer_update_factors(kfac_optimizer *opt);

/** Since 0.2 (issue 15). Drops every layer's pending statistics (recorded since the last factor
 *  update; EKFAC's kept per-example gradients and the block-tridiagonal links' pending cross rows
 *  included); running factors, inverses, counters and parameters are kept. The way out of pending
 *  statistics that make every step, kfac_optimizer_update_factors or kfac_optimizer_update_inverses
 *  fail (e.g. link rows that do not pair). Errors: NULL_POINTER. */
KFAC_API int kfac_optimizer_discard_statistics(kfac_optimizer *opt);

/** Recomputes the inverses of every layer that has factors now, in parallel across layers.
 *  Errors: NULL_POINTER, NO_STATISTICS (no layer has factors), NOT_POSITIVE_DEFINITE,
 *  EIGEN_FAILED, OUT_OF_MEMORY. On error no layer's inverse changes.
 *  Numerical faults (issue 15): a block whose eigendecomposition fails (or is not finite) is
 *  decomposed again in double precision with LAPACK's QR driver (syev); only if that fails too
 *  does the update (or the step) fail with EIGEN_FAILED, which leaves the last good inverses,
 *  the factors and the pending statistics as they were. All-zero or rank-deficient statistics
 *  are inverted with the damping alone; NaN/Inf never enter (NON_FINITE at the record call); a
 *  fold or inversion that keeps failing (NOT_POSITIVE_DEFINITE, EIGEN_FAILED) is left by
 *  kfac_optimizer_discard_statistics or a larger damping. */
KFAC_API int kfac_optimizer_update_inverses(kfac_optimizer *opt);

/** Copies group `group` (0 ≤ group < groups; 0 for a dense layer) of a layer's running factors:
 *  Ω_g (or A) into a_out ([a_dim][a_dim] row-major) and Γ_g (or G) into g_out ([g_dim][g_dim]),
 *  full symmetric matrices in the weight's order with zeros off the blocks of a grouped or SUA
 *  factor. Either pointer may be NULL to skip it.
 *  Errors: NULL_POINTER (opt), UNKNOWN_LAYER, INVALID_ARGUMENT (group out of range),
 *  DTYPE_MISMATCH, NO_STATISTICS. */
KFAC_API int kfac_layer_get_factors_f32(const kfac_optimizer *opt, int32_t layer, int32_t group, float *a_out,
                                        float *g_out);
KFAC_API int kfac_layer_get_factors_f64(const kfac_optimizer *opt, int32_t layer, int32_t group, double *a_out,
                                        double *g_out);

/* ---------------------------------------------------------------------------------------------
 * Preconditioning
 * ------------------------------------------------------------------------------------------- */

/** One optimizer step over all layers: schedule steps 1–3 (see "Schedule"), then k += 1.
 *  weight_grads[l] points to layer l's weight gradient ([out][in] row-major for a dense layer,
 *  [C_out][C_in/groups][kh][kw] for a convolution); bias_grads[l] to its
 *  bias gradient [out]. bias_grads[l] must be NULL exactly for the layers without bias; bias_grads
 *  itself may be NULL only when no layer has a bias (else KFAC_ERROR_NULL_POINTER). Both are read,
 *  then overwritten with the KL-clipped preconditioned direction.
 *  n_layers must equal kfac_layer_count.
 *  Errors: NULL_POINTER, INVALID_SIZE (n_layers), INVALID_ARGUMENT (a bias buffer for a layer
 *  without bias), DTYPE_MISMATCH, NON_FINITE (a gradient, pending statistics or the result),
 *  NO_STATISTICS, NO_INVERSES (inverse period 0 and never computed), NOT_POSITIVE_DEFINITE,
 *  EIGEN_FAILED, OUT_OF_MEMORY. On error, no gradient is written, the step counter does not
 *  advance, and factors and inverses are as before the call. */
KFAC_API int kfac_optimizer_step_f32(kfac_optimizer *opt, float *const *weight_grads, float *const *bias_grads,
                                     int32_t n_layers);
KFAC_API int kfac_optimizer_step_f64(kfac_optimizer *opt, double *const *weight_grads, double *const *bias_grads,
                                     int32_t n_layers);

/** Preconditions one layer's gradient in place with the current inverses: no schedule, no KL
 *  clip, no change to the handle. bias_grad must be NULL exactly when the layer has no bias.
 *  Errors: NULL_POINTER, UNKNOWN_LAYER, DTYPE_MISMATCH, NON_FINITE, NO_STATISTICS,
 *  NO_INVERSES, INVALID_ARGUMENT (bias_grad given for a layer without bias), UNSUPPORTED (a
 *  block-tridiagonally linked layer, see "Block-tridiagonal" in the experimental section). */
KFAC_API int kfac_layer_precondition_f32(kfac_optimizer *opt, int32_t layer, float *weight_grad, float *bias_grad);
KFAC_API int kfac_layer_precondition_f64(kfac_optimizer *opt, int32_t layer, double *weight_grad,
                                         double *bias_grad);

/** The step counter k (>= 0), in *count. Errors: NULL_POINTER. */
KFAC_API int kfac_optimizer_get_step_count(const kfac_optimizer *opt, int64_t *count);

/** The ν of the last successful kfac_optimizer_step_* call (1 if clipping was off or not
 *  needed), in *scale. Errors: NULL_POINTER, NO_STEP (no successful step yet; *scale untouched). */
KFAC_API int kfac_optimizer_get_kl_scale(const kfac_optimizer *opt, double *scale);

/* ---------------------------------------------------------------------------------------------
 * Adaptive mode (Martens & Grosse 2015, §6–7): the step size α and momentum μ from the quadratic
 * model of the loss, and Levenberg–Marquardt adjustment of λ from the reduction ratio ρ.
 *
 * After kfac_optimizer_step_* wrote directions D (set KFAC_PARAM_KL_CLIP to 0 here: α replaces the
 * clip), the caller runs a forward-mode (R-op) pass to get, per example, the derivative of the
 * network's outputs along D (J·D) and along its previous update δ₀ (J·δ₀), and calls
 * kfac_adaptive_solve_step_size_*. With F the exact Fisher of the mean loss over the batch (from
 * the output distribution below) the library minimises
 *     M(δ) = ½ δᵀ (F + λ I) δ + ∇hᵀ δ   over   δ = −α·D + μ·δ₀
 * (a 2×2 system; α alone without δ₀) and returns α, μ and M(δ). The caller applies
 * θ ← θ − α·D + μ·δ₀ (δ₀: its previous applied update; the library keeps its own copy to form the
 * model), evaluates the mean loss, and calls kfac_adaptive_report_loss_change with the losses
 * before and after: ρ = (h(θ + δ) − h(θ)) / M(δ), which adjusts λ every KFAC_PARAM_LM_INTERVAL
 * reports. Set KFAC_PARAM_FACTOR_DAMPING (γ) to keep the factor inverses' damping apart from λ. The
 * directions and inner products of the last successful step are kept for the solve: a failed
 * step or kfac_layer_precondition_* in between does not change them.
 * The gradients given to kfac_optimizer_step_* must be those of the mean loss h over the batch.
 *
 * Re-choosing γ (M&G §6.6; the candidate calls are in the experimental section at the end of
 * this header): with KFAC_PARAM_FACTOR_DAMPING_PERIOD T₂ > 0, every T₂-th step also
 * prepares the directions D_k for the dampings γ·ω₂ and γ/ω₂ (candidates 1, 2; candidate 0 is γ,
 * written as usual). The caller computes J·D_k for each (kfac_candidates_get_count,
 * kfac_candidates_get_directions_*), calls kfac_candidates_solve_step_size_*, which keeps the γ
 * whose update has the lowest M(δ), and applies the update with kfac_adaptive_get_update_*. One
 * loop serves every step, since a step that is not a γ step has one candidate:
 *     kfac_optimizer_step_f32(opt, dW, db, L);
 *     kfac_candidates_get_count(opt, &n);
 *     for (k = 0; k < n; k++) { kfac_candidates_get_directions_f32(opt, k, dk_W, dk_b, L, NULL);
 *                               jvp(dk_W, dk_b, jd[k]); }
 *     kfac_candidates_solve_step_size_f32(opt, logits, jd, n, jd_prev, rows, dim,
 *                                         KFAC_DIST_CATEGORICAL, &k, &alpha, &mu, &m);
 *     kfac_adaptive_get_update_f32(opt, upd_W, upd_b, L);   then θ += δ, evaluate, report the loss.
 * The cost of a γ step: two more preconditionings with the eigen strategy (its damping is
 * applied when preconditioning); with the Cholesky strategy a γ step is always an inverse step —
 * every factor is inverted from the current factors for each of the three γ, candidate 0's
 * inverses are committed by the step and the kept candidate's become the current ones at the
 * solve (make T₂ a multiple of the inverse period to share the work). A candidate whose γ is 0
 * or not finite (decay^T₂ underflows) or outside [λ/r, λ·r] (KFAC_PARAM_FACTOR_DAMPING_RATIO),
 * whose factor is not positive definite or whose directions are not finite is dropped, and the
 * later ones move down an index: kfac_candidates_get_directions_* reports each candidate's γ.
 * The plain kfac_adaptive_solve_step_size_* on a γ step solves for candidate 0 only and keeps γ.
 * Candidates are not saved in states.
 *
 * Output distributions (outputs: one row of output_dim values per example):
 *   KFAC_DIST_CATEGORICAL — logits of a softmax (cross-entropy); Fisher diag(p) − p pᵀ;
 *   KFAC_DIST_BERNOULLI   — logits of independent sigmoids (binary cross-entropy); diag(p(1 − p));
 *   KFAC_DIST_GAUSSIAN    — means of unit-variance Gaussians (squared error ½‖y − μ‖²); I.
 *
 * Which Fisher the factors estimate depends on the output gradients recorded: the gradients of the
 * loss at the data's targets give the empirical Fisher; kfac_sample_output_grads_* gives the
 * gradients at targets sampled from the model (back-propagated by the caller like any output
 * gradient), whose statistics estimate the true Fisher.
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_distribution {
    KFAC_DIST_CATEGORICAL = 0,
    KFAC_DIST_BERNOULLI = 1,
    KFAC_DIST_GAUSSIAN = 2
} kfac_distribution;

/** Chooses α (and μ) for the directions of the last kfac_optimizer_step_* call (see "Adaptive mode").
 *  outputs, direction_products and previous_products are [rows][output_dim] row-major;
 *  previous_products may be NULL (then μ = 0; also μ = 0 before the first solve). *alpha and *mu
 *  receive the coefficients; *predicted_change (may be NULL) receives M(δ) (negative).
 *  Errors: NULL_POINTER, INVALID_SIZE, SIZE_OVERFLOW, INVALID_ARGUMENT (distribution),
 *  DTYPE_MISMATCH, NON_FINITE (inputs, or a degenerate model), NO_STEP (no step since the last
 *  solve), OUT_OF_MEMORY. On error nothing changes. */
KFAC_API int kfac_adaptive_solve_step_size_f32(kfac_optimizer *opt, const float *outputs, const float *direction_products,
                                               const float *previous_products, int64_t rows, int64_t output_dim,
                                               int32_t distribution, double *alpha, double *mu, double *predicted_change);
KFAC_API int kfac_adaptive_solve_step_size_f64(kfac_optimizer *opt, const double *outputs, const double *direction_products,
                                               const double *previous_products, int64_t rows, int64_t output_dim,
                                               int32_t distribution, double *alpha, double *mu, double *predicted_change);

/** Writes the update δ = −α·D + μ·δ₀ of the last solve (kept as the next δ₀; a later step does
 *  not change it) into the buffers (layout, bias rules and n_layers of kfac_optimizer_step_*):
 *  the caller applies θ ← θ + δ. Errors: NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT,
 *  DTYPE_MISMATCH, NO_STEP (no solve yet). Changes nothing in the handle. */
KFAC_API int kfac_adaptive_get_update_f32(kfac_optimizer *opt, float *const *weight_updates, float *const *bias_updates,
                                          int32_t n_layers);
KFAC_API int kfac_adaptive_get_update_f64(kfac_optimizer *opt, double *const *weight_updates, double *const *bias_updates,
                                          int32_t n_layers);

/** Reports the mean loss before and after applying the last solved update: *rho (may be NULL)
 *  receives ρ = (after − before) / M(δ) (NaN if M(δ) was not negative); every
 *  KFAC_PARAM_LM_INTERVAL reports λ is adjusted. loss_after may be +Inf (a divergent step: ρ is
 *  −Inf and λ grows). Errors: NULL_POINTER (opt), NON_FINITE (NaN, a non-finite loss_before or
 *  −Inf), NO_STEP (no solve since the last report). */
KFAC_API int kfac_adaptive_report_loss_change(kfac_optimizer *opt, double loss_before, double loss_after, double *rho);

/** ρ of the last kfac_adaptive_report_loss_change, in *rho (NaN if that report's M(δ) was not
 *  negative). Errors: NULL_POINTER, NO_STEP (no report yet; *rho untouched). */
KFAC_API int kfac_adaptive_get_reduction_ratio(const kfac_optimizer *opt, double *rho);

/** Samples targets from the model's predictive distribution at `outputs` ([rows][output_dim]):
 *  one-hot rows (categorical), 0/1 values (bernoulli), μ + N(0, 1) (gaussian), into targets (same
 *  shape). Reproducible: each draw depends only on (seed, row, coordinate). No handle: errors are
 *  returned only. Errors: NULL_POINTER, INVALID_SIZE, SIZE_OVERFLOW, INVALID_ARGUMENT
 *  (distribution), NON_FINITE (outputs). */
KFAC_API int kfac_sample_targets_f32(const float *outputs, int64_t rows, int64_t output_dim, int32_t distribution,
                                     uint64_t seed, float *targets);
KFAC_API int kfac_sample_targets_f64(const double *outputs, int64_t rows, int64_t output_dim, int32_t distribution,
                                     uint64_t seed, double *targets);

/** The gradient of the summed loss with respect to the outputs at targets sampled as
 *  kfac_sample_targets_* does with the same seed (p − y, or μ − y), into grads
 *  ([rows][output_dim]): the output gradients whose statistics estimate the true Fisher.
 *  Errors: as kfac_sample_targets_*. */
KFAC_API int kfac_sample_output_grads_f32(const float *outputs, int64_t rows, int64_t output_dim, int32_t distribution,
                                          uint64_t seed, float *grads);
KFAC_API int kfac_sample_output_grads_f64(const double *outputs, int64_t rows, int64_t output_dim, int32_t distribution,
                                          uint64_t seed, double *grads);

/* ---------------------------------------------------------------------------------------------
 * State: save and restore everything (parameters, counters, running factors, pending
 * statistics (paired rows too), inverses, the adaptive mode's previous update, pending prediction
 * and counters), so that a resumed run produces bit-identical directions. Directions awaiting
 * kfac_adaptive_solve_step_size_* are not saved: after loading, the next solve needs a new step.
 *
 * Image format (version 5 since 0.2; Sources/KFAC/State/StateImage.swift has the layout):
 * magic "KFACSTAT", format version, precision, size; then one section per owner — the
 * parameters (as (id, value) pairs), the optimizer's counters, the estimator's layer
 * descriptions, factors and inverses (each inverse representation writing its own part: EKFAC's
 * holds its bases and S), the adaptive mode's state, EKFAC's pending per-example gradients (with
 * that strategy only) — then a 64-bit checksum of everything before it. Little-endian. Loading
 * checks magic, size, checksum, version, precision and that the layers match the handle's (same
 * count, kinds and sizes); parameters in the image replace the handle's (a parameter the image
 * does not have takes its default; one this library does not know gives STATE_VERSION). Images
 * of 0.1 (format 4) are refused with STATE_VERSION.
 *
 * Integrity (issue 15). The checksum is checked before the version, so accidental corruption
 * is CORRUPT_STATE: every single flipped bit (the version field's included) and every
 * truncation is detected; larger random damage escapes with probability about 2^-64. It is an
 * unkeyed hash whose rule is public: it protects against accidental corruption, not against a
 * deliberate edit. Against those, loading validates every field as the API could have
 * produced it — counters in [0, 2^62] (a step count 0 exactly when there is no KL scale),
 * flags 0 or 1, row counts within the layers' buffers (and 2^53), factors and pending sums
 * finite with non-negative diagonals and within the record calls' overflow margin, inverses
 * finite (Cholesky: symmetric with a positive diagonal; eigen and EKFAC: entries of the
 * eigenvectors at most 1, eigenvalues and S non-negative), only for blocks with factors, EKFAC's
 * pending per-example gradients, the adaptive prediction and previous update finite — and
 * refuses anything else with CORRUPT_STATE. So no image makes a later call trap or fail
 * forever; an image can still carry valid but unwanted values (e.g. another run's factors).
 * ------------------------------------------------------------------------------------------- */

/** Number of bytes kfac_state_save needs now, in *size. Errors: NULL_POINTER. */
KFAC_API int kfac_state_get_size(const kfac_optimizer *opt, size_t *size);

/** Writes the state image into buffer[0 .. capacity). *written receives the image size.
 *  Errors: NULL_POINTER, INVALID_SIZE (capacity > INT64_MAX), BUFFER_TOO_SMALL (nothing
 *  written). */
KFAC_API int kfac_state_save(const kfac_optimizer *opt, void *buffer, size_t capacity, size_t *written);

/** Replaces the handle's state with the image in buffer[0 .. size).
 *  Errors: NULL_POINTER, INVALID_SIZE (size > INT64_MAX), CORRUPT_STATE, STATE_VERSION,
 *  STATE_MISMATCH, OUT_OF_MEMORY. On error the handle is unchanged. */
KFAC_API int kfac_state_load(kfac_optimizer *opt, const void *buffer, size_t size);

/** Writes the state image to `path` atomically: into a new temporary file
 *  `<path>.kfac-tmp-<pid>-<random hex>` created exclusively in the same directory (never
 *  through an existing file or link; concurrent saves, also to one path, use distinct files),
 *  flushed to disk, renamed over `path`, then the directory flushed. Paths are bytes, passed to
 *  the system unchanged (no encoding is assumed). On failure `path` is unchanged and the
 *  temporary file removed; a process killed mid-save leaves `path` unchanged but may leave its
 *  temporary file, which the library never reuses and the caller may delete.
 *  Errors: NULL_POINTER, IO (path unchanged), OUT_OF_MEMORY. */
KFAC_API int kfac_state_save_file(const kfac_optimizer *opt, const char *path);

/** Loads a state image from `path` (bytes, as for saving). Only a regular file is read (a FIFO,
 *  device or directory is IO, without blocking); a file larger than any image of the handle's
 *  layers can be is refused after reading only its header and parameter section (CORRUPT_STATE
 *  if that is not an image header, STATE_VERSION for another format, else STATE_MISMATCH) —
 *  unless the image's strategy is EKFAC or the handle has block-tridiagonal links, whose pending
 *  rows the layers do not bound: then the image's own row counts are read (the sections before
 *  them, at most the layers' bound, and the counts alone) and a file of another size is
 *  CORRUPT_STATE without being read whole; the file is read in bounded pieces.
 *  Errors: NULL_POINTER, IO, OUT_OF_MEMORY, and those of kfac_state_load. */
KFAC_API int kfac_state_load_file(kfac_optimizer *opt, const char *path);

/* =============================================================================================
 * Experimental. Exported by every build, but may change or disappear in any minor release;
 * define KFAC_EXPERIMENTAL_API before including this header to use it.
 * ============================================================================================= */
#if defined(KFAC_EXPERIMENTAL_API)

/* ---------------------------------------------------------------------------------------------
 * Loss reports on λ's steps only (see "Adaptive mode"). Since 0.2.
 *
 * λ moves only on every KFAC_PARAM_LM_INTERVAL-th report, and only that report's ρ is used
 * (Martens & Grosse §6.5 compute ρ only every T₁ steps). A caller can save the forward pass that
 * evaluates the loss after the update on the other steps:
 *     kfac_adaptive_get_report_needed(opt, &needed);
 *     if (needed) { evaluate h(θ + δ); kfac_adaptive_report_loss_change(opt, h_before, h_after, &rho); }
 *     else kfac_adaptive_skip_loss_report(opt);
 * The trajectory is the same as reporting every step (λ sees the same ρ). What is lost is the
 * per-step ρ and the caller's own check that h(θ + δ) is finite on skipped steps (a divergent
 * update then shows in the next step's gradients, which kfac_optimizer_step_* refuses as
 * NON_FINITE). With KFAC_PARAM_LM_INTERVAL 0 no report is needed.
 * ------------------------------------------------------------------------------------------- */

/** Since 0.2. Whether the next kfac_adaptive_report_loss_change adjusts λ: *needed receives 1
 *  when KFAC_PARAM_LM_INTERVAL is T > 0 and the next report is a T-th one (reports and skips
 *  both count), else 0. Errors: NULL_POINTER. Changes nothing in the handle. */
KFAC_API int kfac_adaptive_get_report_needed(const kfac_optimizer *opt, int32_t *needed);

/** Since 0.2. Ends the last solve without a loss report: it counts as a report for
 *  KFAC_PARAM_LM_INTERVAL, λ is unchanged and the reduction ratio becomes NaN
 *  (kfac_adaptive_get_reduction_ratio). Errors: NULL_POINTER, NO_STEP (no solve since the last
 *  report or skip; or the report is needed, kfac_adaptive_get_report_needed: that report must
 *  carry the losses). On error nothing changes. */
KFAC_API int kfac_adaptive_skip_loss_report(kfac_optimizer *opt);

/* ---------------------------------------------------------------------------------------------
 * Candidates for the factor damping γ (see "Adaptive mode", "Re-choosing γ").
 * ------------------------------------------------------------------------------------------- */

/** Since 0.1 (as kfac_candidate_count). The number of direction candidates the last successful
 *  kfac_optimizer_step_* prepared, in *count: 1, or on a γ step (KFAC_PARAM_FACTOR_DAMPING_PERIOD)
 *  up to 3 — one per factor damping γ, γ·ω₂, γ/ω₂ whose directions were finite (candidate 0, the
 *  current γ, always; it is what kfac_optimizer_step_* wrote). 0 once the step was solved, or
 *  before the first step. Errors: NULL_POINTER. */
KFAC_API int kfac_candidates_get_count(const kfac_optimizer *opt, int32_t *count);

/** Since 0.1 (as kfac_candidate_directions_*). Writes the directions of candidate `candidate`
 *  of the last step into the buffers (the layout, bias rules and n_layers of kfac_optimizer_step_*; candidate 0 is what kfac_optimizer_step_*
 *  wrote), KL-clipped with that candidate's own ν. *factor_damping (may be NULL) receives the
 *  candidate's γ. The caller needs them for its forward-mode products J·D_k. Errors: NULL_POINTER,
 *  INVALID_SIZE (n_layers), INVALID_ARGUMENT (candidate out of range, a bias buffer for a layer
 *  without bias),
 *  DTYPE_MISMATCH, NO_STEP (no step awaiting a solve). Changes nothing in the handle. */
KFAC_API int kfac_candidates_get_directions_f32(kfac_optimizer *opt, int32_t candidate, float *const *weight_dirs,
                                                float *const *bias_dirs, int32_t n_layers, double *factor_damping);
KFAC_API int kfac_candidates_get_directions_f64(kfac_optimizer *opt, int32_t candidate, double *const *weight_dirs,
                                                double *const *bias_dirs, int32_t n_layers, double *factor_damping);

/** Since 0.1 (as kfac_solve_step_size_candidates_*). kfac_adaptive_solve_step_size_* over all
 *  candidates of the last step: direction_products[k] is J·D_k for candidate k
 *  ([rows][output_dim]), n_candidates must equal kfac_candidates_get_count. For each candidate
 *  the library chooses α_k (and μ_k) as kfac_adaptive_solve_step_size_* does, and keeps the one
 *  with the lowest M(δ_k): *chosen receives its index, *alpha, *mu, *predicted_change its values.
 *  On a γ step the chosen candidate's γ becomes KFAC_PARAM_FACTOR_DAMPING (with the Cholesky
 *  strategy its inverses become the current ones). The update is then δ = −α·D_chosen + μ·δ₀:
 *  apply it with kfac_adaptive_get_update_* (or from the candidate's directions). With one
 *  candidate this is kfac_adaptive_solve_step_size_*. Errors: those of
 *  kfac_adaptive_solve_step_size_*, and INVALID_ARGUMENT (n_candidates), NULL_POINTER (a NULL
 *  product). On error nothing changes. */
KFAC_API int kfac_candidates_solve_step_size_f32(kfac_optimizer *opt, const float *outputs,
                                                 const float *const *direction_products, int32_t n_candidates,
                                                 const float *previous_products, int64_t rows, int64_t output_dim,
                                                 int32_t distribution, int32_t *chosen, double *alpha, double *mu,
                                                 double *predicted_change);
KFAC_API int kfac_candidates_solve_step_size_f64(kfac_optimizer *opt, const double *outputs,
                                                 const double *const *direction_products, int32_t n_candidates,
                                                 const double *previous_products, int64_t rows, int64_t output_dim,
                                                 int32_t distribution, int32_t *chosen, double *alpha, double *mu,
                                                 double *predicted_change);

/* ---------------------------------------------------------------------------------------------
 * Products with the damped curvature.
 * ------------------------------------------------------------------------------------------- */

/** Since 0.2. Multiplies every layer's gradient-shaped buffers in place by the damped curvature
 *  block the current inverse strategy inverts, at power `power`: +1 (the forward product, e.g.
 *  for conjugate gradient or tests) or −1 (the preconditioning kfac_optimizer_step_* applies,
 *  without schedule or KL clip). The damped block is, with λ the inverse damping
 *  (KFAC_PARAM_FACTOR_DAMPING if > 0, else KFAC_PARAM_DAMPING):
 *     KFAC_INVERSE_EIGEN:    A ⊗ G + λ I
 *     KFAC_INVERSE_CHOLESKY: (A + π√λ I) ⊗ (G + √λ/π I)   (π as in "Inverse strategies")
 *     KFAC_INVERSE_EKFAC:    Ũ diag(vec S + λ) Ũᵀ, Ũ = Q_A ⊗ Q_G   (see "EKFAC"; both powers
 *                            use the current inverses, so +1 too gives NO_INVERSES without them)
 *  for every group of every layer (block-diagonal over groups and layers); linked layers use the
 *  block-tridiagonal F̂ or F̂⁻¹ instead (see "Block-tridiagonal"). Power +1 uses the
 *  running factors, power −1 the current inverses (so after a change of λ with the Cholesky
 *  strategy, +1 and −1 disagree until the next inverse update). The buffers have the layout,
 *  bias rules and n_layers of kfac_optimizer_step_*. Changes nothing in the handle.
 *  Errors: NULL_POINTER, INVALID_SIZE (n_layers), INVALID_ARGUMENT (power, a bias buffer for a
 *  layer without bias), DTYPE_MISMATCH, NON_FINITE (an input or the result; buffers untouched),
 *  NO_STATISTICS (a layer has no factors yet, whatever the power; checked first), NO_INVERSES
 *  (−1 when a layer has factors but no inverses for the current strategy). */
KFAC_API int kfac_curvature_multiply_f32(kfac_optimizer *opt, int32_t power, float *const *weights,
                                         float *const *biases, int32_t n_layers);
KFAC_API int kfac_curvature_multiply_f64(kfac_optimizer *opt, int32_t power, double *const *weights,
                                         double *const *biases, int32_t n_layers);

/* ---------------------------------------------------------------------------------------------
 * Gauss-Newton products (experimental). Since 0.2.
 *
 * The exact Gauss-Newton (GGN) matrix-vector product of the mean loss h = (1/N) Σ_n ℓ_n,
 *     G v = (1/N) Σ_n J_nᵀ B_n J_n v,      J_n = ∂z_n/∂θ,  B_n = ∂²ℓ_n/∂z_n²,
 * over the registered layers, in the two settings of Lin et al.'s seed (simpleNN):
 *   - stored Jacobian columns (backward setting): the caller back-propagates the K columns of
 *     S_n (S_n S_nᵀ = B_n, kfac_gn_output_hessian_sqrt_*) through its network once per curvature
 *     batch and records them per layer with the layer's inputs
 *     (kfac_layer_record_output_grad_columns_*); every product is then a few gemms per layer
 *     (kfac_gn_columns_multiply_*). Works for any graph whose registered layers' outputs the
 *     caller's backward pass reaches (residual connections included).
 *   - the R operator (forward + backward setting) on a sequential chain of registered dense and
 *     conv2d layers with elementwise activations (kfac_gn_chain_*): the library runs the
 *     forward-mode and reverse passes itself (convolutions over the patches it forms, and their
 *     transpose, col2im) from copies of the weights, inputs and φ′ taken at
 *     kfac_gn_chain_forward_*.
 *     kfac_gn_chain_record_columns has the chain back-propagate S's columns itself and record
 *     them as the caller would (KFLR output factors, kept columns) — no autodiff needed;
 *     kfac_gn_chain_record_kfra_* gives KFRA's output factors of a dense chain instead.
 * Pooling, normalisation and residual connections are not chain layers: such networks use columns.
 * B is the output Hessian of the distribution (see "Adaptive mode", Output distributions):
 *     categorical  B = diag(p) − p pᵀ (p = softmax(z)),   S = diag(√p) − p √pᵀ  (rank dim − 1)
 *     bernoulli    B = diag(p(1 − p)) (p = σ(z)),        S = diag(√(p(1 − p)))
 *     gaussian     B = I (½‖y − z‖²),                    S = I
 * S has K = output_dim columns for every distribution. Vectors and products are parameter-shaped:
 * the buffers of kfac_optimizer_step_* (weight [out][in] or the conv weight, bias [out]) in
 * arrays of n_layers = the registered layer count. A product covers the layers that have kept
 * columns (all of them give the full G; some, that principal block) or that are in the chain;
 * the entries of the other layers are not read or written and may be NULL (so may the bias
 * arrays when no covered layer has a bias). Products may be written over their vectors (the same
 * pointers). They are G without damping or L2; they change nothing in the handle and may be
 * called any number of times; nothing is written when they fail.
 * Threading and state: the handle calls follow the handle rule (one thread at a time); the
 * output-space helpers have no handle and are thread-safe. Kept columns and the chain (its
 * definition and forward pass) live beside the K-FAC state and are not part of state images;
 * kfac_state_load leaves them as they are. After the first call, products allocate nothing.
 *
 * Loss conventions. Columns are those of the SUMMED loss: S of kfac_gn_output_hessian_sqrt_*
 * back-propagated. KFAC_PARAM_LOSS_REDUCTION does not apply to them; a caller whose square roots
 * come from a mean-reduced loss (B/N per example) has S/√N and must multiply its columns by √N,
 * not N. A caller that back-propagates them through a loss-scaled graph sets
 * KFAC_PARAM_OUTPUT_GRAD_SCALE and the library divides the columns by it (linearly). The
 * product is then that of the mean loss (the 1/N above; N = the examples kept). A loss that is
 * a multiple c of these (PyTorch's MSELoss is 2·(½‖·‖²)) has c·G.
 * ------------------------------------------------------------------------------------------- */

/** What a column recording is used for (bits of `uses`). */
typedef enum kfac_columns_use {
    KFAC_COLUMNS_FACTOR = 1,    /* add to the layer's pending output factor (KFLR, MC Fisher) */
    KFAC_COLUMNS_PRODUCT = 2    /* keep inputs and columns for kfac_gn_columns_multiply_* */
} kfac_columns_use;

/** Elementwise activations of a chain. */
typedef enum kfac_activation {
    KFAC_ACTIVATION_IDENTITY = 0,
    KFAC_ACTIVATION_RELU = 1,       /* φ′ = 1 if s > 0, else 0 */
    KFAC_ACTIVATION_TANH = 2,
    KFAC_ACTIVATION_LOGISTIC = 3,
    KFAC_ACTIVATION_CUSTOM = 4      /* φ′ (and the next layer's inputs) given at every forward */
} kfac_activation;

/** Since 0.2. u = B q for every row: outputs z, vectors q and products u are [rows][output_dim]
 *  row-major (products may be vectors). No handle: errors are returned only. Errors:
 *  NULL_POINTER, INVALID_SIZE, SIZE_OVERFLOW, INVALID_ARGUMENT (distribution), NON_FINITE
 *  (outputs or vectors). Thread-safe. */
KFAC_API int kfac_gn_output_hessian_multiply_f32(const float *outputs, const float *vectors, int64_t rows,
                                                 int64_t output_dim, int32_t distribution, float *products);
KFAC_API int kfac_gn_output_hessian_multiply_f64(const double *outputs, const double *vectors, int64_t rows,
                                                 int64_t output_dim, int32_t distribution, double *products);

/** Since 0.2. The K = output_dim columns of S_n (S_n S_nᵀ = B_n, the table above) for every row,
 *  into columns [K][rows][output_dim]: column k of example n is columns[(k·rows + n)·output_dim
 *  ...], so each block [k] is a batch of output gradients to back-propagate (one backward pass
 *  per k, or one vmapped pass). Errors: those of kfac_gn_output_hessian_multiply_*. Thread-safe. */
KFAC_API int kfac_gn_output_hessian_sqrt_f32(const float *outputs, int64_t rows, int64_t output_dim,
                                             int32_t distribution, float *columns);
KFAC_API int kfac_gn_output_hessian_sqrt_f64(const double *outputs, int64_t rows, int64_t output_dim,
                                             int32_t distribution, double *columns);

/** Since 0.2. Records the K back-propagated columns per example of layer `layer`:
 *  columns [k][rows][out…] (block j is a batch of output gradients: dense [rows][out], conv
 *  [rows][C_out][H_out][W_out] or channels-last; rows = examples, one row per example for a
 *  dense layer), C_{l,n} = J_{s_l,n}ᵀ S_n. `uses` is a bit set of kfac_columns_use:
 *   FACTOR  — the pending output factor gains, per example, Σ_k c cᵀ with the example counted
 *             once: G = (1/N) Σ_n Σ_k c_{n,k} c_{n,k}ᵀ (KFLR from the K columns of S; the
 *             Monte-Carlo Fisher with S sampled output gradients / √S as columns; a convolution
 *             with KFC's Γ = (1/(N|T|)) Σ_n Σ_t Σ_k c cᵀ). It is recorded as k·rows rows scaled
 *             by √k, so k = 1 is exactly kfac_layer_record_output_grads_* (without the MEAN
 *             reduction), and the output-side records of a layer between two factor updates
 *             should all use the same k. The input factor is recorded as usual
 *             (kfac_layer_record_inputs_*); `inputs` may be NULL.
 *   PRODUCT — the layer's inputs (as kfac_layer_record_inputs_* takes them; NOT added to A) and
 *             the columns are copied and kept for kfac_gn_columns_multiply_* until
 *             kfac_gn_columns_clear; successive calls append examples (micro-batches); every
 *             layer must keep the same k, and all layers the same examples in the same order.
 *  Memory of PRODUCT: N·(K·Σ_l o_l|T_l| + Σ_l i_l) values for N kept examples (o_l|T_l| the
 *  output values, i_l the input values of layer l per example): 1000 examples of a 784-100-10
 *  MLP at K = 10 keep 1000·(10·110 + 884) values, 7.9 MB in float32. The first call of a layer
 *  allocates exactly its rows; appending grows the layer's store geometrically (capacity at most
 *  twice the kept rows); the product's scratch is O(N·(K + max o_l)) for dense layers and one
 *  example's patches for convolutions. An allocation the system refuses gives OUT_OF_MEMORY with
 *  nothing kept. Recording marks the layers frozen. Kept columns are not part of state images.
 *  Errors: NULL_POINTER (columns; inputs with PRODUCT), UNKNOWN_LAYER, INVALID_ARGUMENT (uses
 *  not 1–3), INVALID_SIZE (rows or k < 1, k differing from the kept columns'), SIZE_OVERFLOW,
 *  DTYPE_MISMATCH, NON_FINITE, OUT_OF_MEMORY. On error nothing is recorded or kept. */
KFAC_API int kfac_layer_record_output_grad_columns_f32(kfac_optimizer *opt, int32_t layer, const float *inputs,
                                                       const float *columns, int64_t rows, int32_t k, int32_t uses);
KFAC_API int kfac_layer_record_output_grad_columns_f64(kfac_optimizer *opt, int32_t layer, const double *inputs,
                                                       const double *columns, int64_t rows, int32_t k, int32_t uses);

/** Since 0.2. product = G·vector from the kept columns:
 *      t_n = Σ_l Σ_t C_{l,n,t}ᵀ (V_l ā_{l,n,t}),   (G v)_l = (1/N) Σ_n Σ_t (C_{l,n,t} t_n) ā_{l,n,t}ᵀ
 *  (t over a convolution's output positions, ā its patches; dense: two gemms per layer plus
 *  O(N·K·out)). Cost against one gradient of the same batch (issue 9's target was ≤ 0.5× at
 *  K ≤ 10; it is not reachable with this product): with P_l = i_l·o_l, the product is
 *  4N·Σ_l P_l FLOPs (V ā for every row, then the outer-product sum back), a gradient is
 *  2N·(2P_0 + 3·Σ_{l>0} P_l) (forward, weight gradient, and the input gradient of every layer
 *  but the first), so the ratio's floor is 2ΣP / (2P_0 + 3Σ_{l>0}P_l): 0.83 for 784-512-512-10,
 *  0.78 for 784-1024-1024-10, → 2/3 for deep nets of equal layers, never below 1/2 whatever K.
 *  make bench's "gradient" is the same MLP's forward and backward with the same sgemm (not a
 *  framework's autograd), so the comparison is like for like; measured 0.70–0.82×, i.e. at the
 *  floor. Nothing of the product can be cached across CG iterations: both gemms involve v. Going
 *  below the floor needs another algorithm: the K·N × K·N Gram J Jᵀ over all layers costs
 *  2(KN)²·Σ_l(i_l + o_l) FLOPs once (about 54 products at N = 256, K = 10 on 784-512-512-10)
 *  and then 2(KN)² per product, but only for vectors kept as g + Jᵀw, which reverse-communication CG
 *  (vectors handed to the caller in parameter space) does not give.
 *  Errors: NULL_POINTER (a covered layer's buffer, or a bias buffer of a covered
 *  layer with bias), INVALID_SIZE (n_layers; layers keeping different numbers of examples),
 *  INVALID_ARGUMENT (a bias buffer for a covered layer without bias), DTYPE_MISMATCH,
 *  NON_FINITE (a vector, or the product), NO_COLUMNS (none kept), OUT_OF_MEMORY (scratch). */
KFAC_API int kfac_gn_columns_multiply_f32(kfac_optimizer *opt, const float *const *vector_w,
                                          const float *const *vector_b, float *const *product_w,
                                          float *const *product_b, int32_t n_layers);
KFAC_API int kfac_gn_columns_multiply_f64(kfac_optimizer *opt, const double *const *vector_w,
                                          const double *const *vector_b, double *const *product_w,
                                          double *const *product_b, int32_t n_layers);

/** Since 0.2. The kept columns: *examples (N of the first layer with columns, 0 if none), *k (0
 *  if none) and *values (inputs and columns stored, in the handle's precision); any pointer may
 *  be NULL. Errors: NULL_POINTER (opt). */
KFAC_API int kfac_gn_columns_get_info(const kfac_optimizer *opt, int64_t *examples, int32_t *k, int64_t *values);

/** Since 0.2. Drops every kept column and input and releases their memory (pending factor
 *  statistics are not affected). Errors: NULL_POINTER. */
KFAC_API int kfac_gn_columns_clear(kfac_optimizer *opt);

/** Since 0.2. Defines the chain of kfac_gn_chain_multiply_*: layers[0] → activations[0] →
 *  layers[1] → … → layers[n−1], registered dense or conv2d layers (distinct), each layer's output
 *  buffer being the next one's input buffer: the output values per example of each (dense: out;
 *  convolution: C_out·H_out·W_out in its layout, e.g. flattened into a dense layer as PyTorch's
 *  Flatten does for NCHW) equal the input values of the next (dense: in; convolution: C·H·W in its
 *  layout). activations[n−1] must be IDENTITY: the last layer's outputs, [rows][output_dim], are
 *  the network's z under `distribution` (kfac_distribution). Replaces a previous chain and drops
 *  its forward pass. Errors: NULL_POINTER, INVALID_SIZE (n < 1, sizes that do not chain),
 *  UNKNOWN_LAYER, INVALID_ARGUMENT (a repeated layer, an activation or distribution out of range, a last
 *  activation other than IDENTITY). On error the previous chain is kept. */
KFAC_API int kfac_gn_chain_define(kfac_optimizer *opt, const int32_t *layers, const int32_t *activations, int32_t n,
                                  int32_t distribution);

/** Since 0.2. The chain's forward pass on `rows` examples; the arrays have the chain's n
 *  entries in chain order. weights[i] (the layer's weight layout) and biases[i] [out] (NULL for a
 *  layer without bias; `biases` itself may be NULL if no chain layer has one) are copied, so every
 *  product until the next forward uses this θ. inputs[0] (rows examples of the first layer's
 *  input) is required; inputs[i] (i > 0)
 *  may be NULL to have a_i = φ_{i−1}(s_{i−1}) computed (named activations), or give the layer's
 *  inputs from the caller's own forward pass (required after a CUSTOM activation).
 *  derivatives[i] (rows × the layer's output values) is φ′_{i}(s_i) for a CUSTOM activation and ignored otherwise
 *  (`derivatives` itself may be NULL without CUSTOM). outputs (may be NULL) receives z
 *  [rows][out_{n−1}]. Memory: copies of W, b and the inputs, φ′ and z, plus two [rows][widest]
 *  scratch rows and, with convolutions, two of one example's patch matrices. Errors: NULL_POINTER, INVALID_SIZE (rows < 1), INVALID_ARGUMENT (a bias for a
 *  layer without), SIZE_OVERFLOW, DTYPE_MISMATCH, NON_FINITE, NO_COLUMNS (no chain defined),
 *  OUT_OF_MEMORY. On error the previous forward pass is kept. */
KFAC_API int kfac_gn_chain_forward_f32(kfac_optimizer *opt, const float *const *weights, const float *const *biases,
                                       const float *const *inputs, const float *const *derivatives, int64_t rows,
                                       float *outputs);
KFAC_API int kfac_gn_chain_forward_f64(kfac_optimizer *opt, const double *const *weights,
                                       const double *const *biases, const double *const *inputs,
                                       const double *const *derivatives, int64_t rows, double *outputs);

/** Since 0.2. The chain back-propagates the K = output_dim columns of S at the last forward
 *  pass's outputs itself (C_{n−1} = S, C_{i−1} = (layer_iᵀ C_i) ⊙ φ′_{i−1}: for a dense layer one
 *  gemm of K·rows rows, for a convolution col2im of Wᵀ C per example) and records them for every chain layer with its copied inputs, as
 *  kfac_layer_record_output_grad_columns_* does with `uses`: FACTOR gives every chain layer's
 *  KFLR output factor (record the input factors as usual), PRODUCT keeps them for
 *  kfac_gn_columns_multiply_* (the backward setting without the caller's backward passes).
 *  All chain layers or none: on error nothing is recorded or kept. Errors: NULL_POINTER,
 *  INVALID_ARGUMENT (uses), INVALID_SIZE (K differing from kept columns'), NON_FINITE,
 *  NO_COLUMNS (no chain forward pass), OUT_OF_MEMORY. */
KFAC_API int kfac_gn_chain_record_columns(kfac_optimizer *opt, int32_t uses);

/** KFRA's recursion (kfac_gn_chain_record_kfra_*). */
typedef enum kfac_kfra_variant {
    KFAC_KFRA_GGN = 0,       /* the Gauss-Newton recursion (default; Ḡ is PSD) */
    KFAC_KFRA_HESSIAN = 1    /* adds the D̄ term of the Hessian (needs output gradients; may be indefinite) */
} kfac_kfra_variant;

/** Since 0.2. KFRA (Botev, Ritter & Barber 2017) for a dense chain: from the last forward pass
 *  (its N = rows examples, copied weights W_i, φ′ and inputs), the batch-averaged pre-activation
 *  curvature of every chain layer, propagated backwards without per-example columns:
 *      Ḡ_{n−1} = (1/N) Σ_e B_e                                   (B the output Hessian, table above)
 *      Ḡ_{i−1} = (W_iᵀ Ḡ_i W_i) ⊙ (1/N) Σ_e φ′_{i−1,e} φ′_{i−1,e}ᵀ  [+ D̄_{i−1}]
 *      D̄_{i−1} = diag((1/N) Σ_e φ″_{i−1,e} ⊙ ∂ℓ_e/∂a_{i,e})         (KFAC_KFRA_HESSIAN only)
 *  (W_i without the bias column; ∂ℓ_e/∂a_i = W_iᵀ g_i with g back-propagated from output_grads
 *  through the chain, g_{i−1} = φ′_{i−1} ⊙ W_iᵀ g_i; φ″ from φ′ and the kept next inputs a_i:
 *  tanh −2 a φ′, logistic φ′ (1 − 2a), ReLU and identity 0, a_i being the caller's inputs[i] when
 *  given to the forward pass). Every chain layer's pending output
 *  factor gains Ḡ_i / s² weighted by N rows (s = KFAC_PARAM_OUTPUT_GRAD_SCALE, as for the
 *  chain's columns), so that a factor update with nothing else pending gives G = Ḡ / s²; mixing
 *  it with other output-side records of the same layer between two updates averages them by
 *  rows. KFAC_PARAM_LOSS_REDUCTION does not apply (B is that of the summed loss, Ḡ its mean).
 *  KFRA equals KFLR (kfac_gn_chain_record_columns with FACTOR) at N = 1, and at any N for a
 *  chain of identity activations with the gaussian distribution (constant B; there A ⊗ G is
 *  also the exact Hessian block of the mean loss in each layer's parameters); otherwise the
 *  mean of products is replaced by a product of means. record_inputs = 1 also adds the chain's
 *  kept inputs to every chain layer's input factor, as kfac_layer_record_inputs_* would (0: the
 *  caller records A as usual). output_grads [rows][output_dim] = ∂ℓ_e/∂z_e of the summed loss
 *  at the forward pass's outputs (without loss scale), required for HESSIAN, ignored for GGN
 *  (may be NULL). The HESSIAN factors may be indefinite: use them with enough damping.
 *  Dense only: a convolution in the chain gives UNSUPPORTED, because its recursion needs the
 *  dense [C·H·W]² pre-activation matrix of every convolution (BackPACK's conv KFRA does this,
 *  and sums the spatial blocks afterwards); convolutions get KFLR through columns. CUSTOM
 *  activations work with GGN (φ′ given) but not HESSIAN (φ″ unknown: UNSUPPORTED). A chain layer
 *  with a block-tridiagonal link gives UNSUPPORTED (KFRA has no cross statistics).
 *  In distributed runs each rank's Ḡ comes from its own examples; reducing the pending statistics
 *  averages the ranks' Ḡ by rows, which is not KFRA of the union batch (a mean of products).
 *  Cost: per layer two o·o·i gemms (independent of N) and one N·i² gemm, plus N·K·output_dim²
 *  for Ḡ_{n−1}; its O(output_dim·N·K + widest²) scratch is allocated by the first call on a
 *  chain (again only when N exceeds every earlier N, or at the first HESSIAN call) and kept with
 *  the chain, so later calls allocate nothing (the chain's forward pass still copies θ and the
 *  inputs into new buffers at every batch). Wide layers make it
 *  dearer than KFLR at small N (make bench: 784-1024-1024-10, N = 256).
 *  Pending statistics, KFRA's included, are part of state images. All chain layers or none: on
 *  error nothing is recorded. Errors: NULL_POINTER (output_grads for HESSIAN), INVALID_ARGUMENT
 *  (variant, record_inputs not 0/1), UNSUPPORTED (a convolution; HESSIAN with CUSTOM; a link),
 *  DTYPE_MISMATCH, NON_FINITE (output_grads; a factor or the inputs too large), NO_COLUMNS (no
 *  chain forward pass), OUT_OF_MEMORY. */
KFAC_API int kfac_gn_chain_record_kfra_f32(kfac_optimizer *opt, int32_t variant, int32_t record_inputs,
                                           const float *output_grads);
KFAC_API int kfac_gn_chain_record_kfra_f64(kfac_optimizer *opt, int32_t variant, int32_t record_inputs,
                                           const double *output_grads);

/** Since 0.2. product = G·vector over the chain's layers by the R operator, from the last
 *  forward pass:  ṙ_0 = 0, ṡ_i = W_i ṙ_i + V_i ā_i, ṙ_{i+1} = φ′_i ⊙ ṡ_i;  u_n = B_n ṡ_{n−1,n};
 *  δ = u, (G v)_i = (1/N) Σ_n δ_{i,n} ā_{i,n}ᵀ, δ ← φ′_{i−1} ⊙ (W_iᵀ δ) (for a convolution W
 *  and V act on patches, Σ runs over positions too, and W_iᵀ δ is col2im'd). About two forward
 *  and two backward gemms per layer. Buffers and errors as kfac_gn_columns_multiply_*, NO_COLUMNS
 *  meaning no chain forward pass. */
KFAC_API int kfac_gn_chain_multiply_f32(kfac_optimizer *opt, const float *const *vector_w, const float *const *vector_b,
                                        float *const *product_w, float *const *product_b, int32_t n_layers);
KFAC_API int kfac_gn_chain_multiply_f64(kfac_optimizer *opt, const double *const *vector_w,
                                        const double *const *vector_b, double *const *product_w,
                                        double *const *product_b, int32_t n_layers);

/* ---------------------------------------------------------------------------------------------
 * Conjugate gradient and Newton-CG (experimental; Martens 2010, simpleNN).
 *
 * Solves (G + (λ + η) I) s = −g for the step s of Newton-CG, G the caller's curvature (usually
 * the Gauss-Newton matrix of a curvature batch), g its gradient, λ = KFAC_PARAM_DAMPING (the
 * Levenberg–Marquardt damping) and η = kfac_cg_desc.l2. The solver works by reverse
 * communication: it never calls the caller. It hands out a vector v (kfac_cg_get_vector_*), the
 * caller computes G·v by any means (an R-op forward and backward pass, stored Jacobian columns,
 * torch.func jvp/vjp) and passes it back (kfac_cg_supply_product_*), until the solve stops:
 *
 *     int32_t request;
 *     kfac_cg_desc desc = {sizeof desc, .preconditioner = KFAC_CG_PRECONDITIONER_KFAC};
 *     kfac_cg_begin_f32(opt, &desc, grad_w, grad_b, NULL, NULL, L, &request);
 *     while (request == KFAC_CG_NEED_PRODUCT) {
 *         kfac_cg_get_vector_f32(opt, v_w, v_b, L);
 *         gauss_newton_product(v_w, v_b, gv_w, gv_b);          // the caller's G·v, no λ, no η
 *         kfac_cg_supply_product_f32(opt, gv_w, gv_b, L, &request);
 *     }
 *     kfac_cg_result res = {sizeof res};
 *     kfac_cg_finish_f32(opt, s_w, s_b, L, &res);
 *     ... θ ← θ + α s (α = 1, or backtracked: halve while h(θ + αs) − h(θ) > 1e-4 · α · gᵀs) ...
 *     kfac_cg_report_loss_change(opt, α, h_before, h_after, &rho);   // adjusts λ
 *
 * Vectors have the layout, bias rules and n_layers of kfac_optimizer_step_* (weights [out][in] or
 * the convolution's weight shape, biases [out]; bias arrays NULL exactly for layers without a
 * bias). Subsampling is the caller's choice: the gradient on the whole batch, G on a fraction of
 * it (simpleNN: 5%), G being the mean of J_iᵀ B_i J_i over that fraction.
 *
 * The iteration (A = G + (λ + η) I, M the preconditioner, r = −g − A x):
 *     x₀ = 0, or decay · (the last finished solution) with warm_start; r₀ = −g − A x₀ (a warm
 *     start first asks for the product of x₀); y₀ = M⁻¹ r₀; p₀ = y₀; then per iteration i:
 *     α = rᵀy / pᵀAp, x += α p, r −= α A p, y = M⁻¹ r, β = r_newᵀ y_new / r_oldᵀ y_old, p = y + β p.
 *     φ(x) = ½ xᵀ A x + gᵀ x = ½ gᵀ x − ½ xᵀ r.
 * Preconditioners: NONE (M = I); KFAC (M⁻¹ = the current K-FAC inverses, as
 * kfac_curvature_multiply_* at power −1, any strategy — the layers need factors and inverses;
 * with KFAC_INVERSE_EKFAC this is EKFAC's M⁻¹ = (U_A⊗U_G) diag(S + λ)⁻¹ (U_A⊗U_G)ᵀ with its
 * current S, λ = KFAC_PARAM_FACTOR_DAMPING if set, else KFAC_PARAM_DAMPING; no other setting);
 * DIAGONAL (M = diag(d + λ + η)^exponent with d ≥ 0 given to begin, Martens 2010: d the sum of
 * the squared per-example gradients, exponent 0.75).
 * Stopping, checked at the start (i = 0) and after every iteration i, in this order:
 *     ‖r_i‖ = 0 → KFAC_CG_REASON_RESIDUAL;
 *     RESIDUAL rule (simpleNN): ‖r_i‖ ≤ ξ‖g‖, ξ = tolerance (default 0.1) → REASON_RESIDUAL;
 *     RELATIVE_PROGRESS rule (Martens 2010, §4.4): with k = max(10, ⌊i/10⌋), i > k, φ_i < 0 and
 *       (φ_i − φ_{i−k}) / φ_i < k·ε, ε = tolerance (default 5e-4) → REASON_RELATIVE_PROGRESS;
 *     i = max_iterations (default 250) → REASON_MAX_ITERATIONS.
 * A pᵀAp that is not positive stops before the update (REASON_NON_POSITIVE_CURVATURE; s is the
 * last iterate). Inner products are accumulated in double precision (also on float32 handles),
 * in a fixed order (RESIDUAL rule: per layer segment four interleaved partial sums, combined in
 * order; RELATIVE_PROGRESS: left to right over the layer layout), so a solve is reproducible bit
 * for bit. With the RESIDUAL rule φ is not evaluated per iteration (the rule does not need it;
 * the result's model values are computed from s at finish).
 * float32 handles: r is updated recursively (r −= α A p) and never recomputed from x. Measured
 * against the true residual −g − (G + λI)s of the returned s (n = 200, spectra 10⁻²…1 to
 * 10⁻⁶…1): at ξ ≥ 1e-2 the two agree within 1% (0.8% at the worst, κ = 10⁶), so a RESIDUAL
 * stop is genuine and no periodic refresh is done; at κ = 10⁴, ξ = 1e-4 the recursive residual
 * understates the true one by 59%: for tolerances that tight on ill-conditioned G use float64.
 * What float32 loses on such G is convergence, not the residual's honesty: at κ = 10⁴, ξ = 0.1,
 * 138 iterations against float64's 115; at κ = 10⁶ float32 had not reached ξ = 0.1 after 600
 * (float64: 536). A refresh (one extra product) would not restore the lost conjugacy.
 *
 * Newton-CG and Levenberg–Marquardt. The model of the step α·s excludes λ (Martens 2010,
 * simpleNN): m(α) = α gᵀs + ½ α² sᵀ(G + ηI)s, with sᵀ(G + ηI)s = sᵀ(−g − r) − λ‖s‖² from the
 * residual (no extra product). kfac_cg_report_loss_change computes ρ = (h_after − h_before) /
 * m(α) and applies the library's Levenberg–Marquardt rule to λ (KFAC_PARAM_LM_INTERVAL,
 * KFAC_PARAM_LM_DECAY, the floor KFAC_PARAM_DAMPING_MIN):
 * with KFAC_PARAM_LM_DECAY = 2/3 and KFAC_PARAM_LM_INTERVAL = 1, λ·3/2 if ρ < 1/4 and λ·2/3 if
 * ρ > 3/4 (simpleNN's schedule; simpleNN drops λ at ρ = 3/4 exactly too). Its reports are
 * counted apart from kfac_adaptive_report_loss_change's, and the two modes' models do not mix.
 * The caller's loss and gradient include η's term ½η‖θ‖² (the library adds nothing to g).
 *
 * State and errors. One solve per handle; a begin replaces an open solve. The solver keeps
 * nine parameter-sized vectors (eleven with DIAGONAL, one more once kfac_cg_solve_* was used),
 * allocated at begin; after a first solve of the same size, get_vector / supply_product / finish
 * allocate nothing. Every call is atomic:
 * on error the solve and the handle are as before. A product with NaN or Inf is refused with
 * KFAC_ERROR_NON_FINITE and may be supplied again. Calls out of order give KFAC_ERROR_NO_SOLVE.
 * Adding a layer during a solve makes the next solver call fail with INVALID_SIZE (begin
 * again). Solves are independent of kfac_optimizer_step_* and the adaptive mode, and are not
 * part of state images.
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_cg_preconditioner {
    KFAC_CG_PRECONDITIONER_NONE = 0,
    KFAC_CG_PRECONDITIONER_KFAC = 1,
    KFAC_CG_PRECONDITIONER_DIAGONAL = 2
} kfac_cg_preconditioner;

typedef enum kfac_cg_stop_rule {
    KFAC_CG_STOP_RESIDUAL = 0,
    KFAC_CG_STOP_RELATIVE_PROGRESS = 1
} kfac_cg_stop_rule;

typedef enum kfac_cg_request {
    KFAC_CG_NEED_PRODUCT = 1,   /* read the vector, supply G times it */
    KFAC_CG_DONE = 2            /* the solve has stopped: finish it */
} kfac_cg_request;

typedef enum kfac_cg_reason {
    KFAC_CG_REASON_RUNNING = 0,
    KFAC_CG_REASON_RESIDUAL = 1,
    KFAC_CG_REASON_RELATIVE_PROGRESS = 2,
    KFAC_CG_REASON_MAX_ITERATIONS = 3,
    KFAC_CG_REASON_NON_POSITIVE_CURVATURE = 4,
    KFAC_CG_REASON_CALLER = 5   /* finished by the caller before the solver stopped */
} kfac_cg_reason;

/** Since 0.2. The options of a solve. Growable: set struct_size = sizeof(kfac_cg_desc) (at least
 *  the first three fields); fields past an older caller's struct_size read as 0. Zero means
 *  the default everywhere. */
typedef struct kfac_cg_desc {
    size_t struct_size;
    int32_t max_iterations;      /* [0, 10^6], 0 = 250 */
    int32_t stop_rule;           /* kfac_cg_stop_rule */
    double tolerance;            /* ξ (RESIDUAL, in (0, 1)) or ε (RELATIVE_PROGRESS, > 0); 0 = 0.1 / 5e-4 */
    int32_t preconditioner;      /* kfac_cg_preconditioner */
    int32_t warm_start;          /* 0 or 1: x₀ = warm_start_decay · the last finished solution */
    double warm_start_decay;     /* (0, 1], 0 = 0.95 */
    double diagonal_exponent;    /* (0, 1], 0 = 0.75 (DIAGONAL only) */
    double l2;                   /* η >= 0, added to λ in the system and to G in the model */
} kfac_cg_desc;

/** Since 0.2. The outcome of a solve. Growable: set struct_size = sizeof(kfac_cg_result); the
 *  library fills the whole fields that fit and sets struct_size to the bytes filled. */
typedef struct kfac_cg_result {
    size_t struct_size;
    int32_t iterations;          /* CG iterations (a warm start's initial product not counted) */
    int32_t products;            /* products supplied (iterations, + 1 with a warm start) */
    int32_t reason;              /* kfac_cg_reason */
    int32_t reserved;            /* 0 */
    double grad_dot_step;        /* gᵀs */
    double step_curvature;       /* sᵀ(G + ηI)s */
    double damping_term;         /* λ‖s‖² */
    double model_value;          /* m(1) = gᵀs + ½ sᵀ(G + ηI)s: the model without λ */
    double quadratic_value;      /* φ(s) = m(1) + ½ λ‖s‖²: what CG minimised */
    double residual_norm;        /* ‖r‖ at s */
    double gradient_norm;        /* ‖g‖ */
    double damping;              /* λ of the solve */
} kfac_cg_result;

/** Since 0.2. Begins a solve (replacing an open one). desc may be NULL (all defaults). grad_* is
 *  g; diag_* is d, given exactly for KFAC_CG_PRECONDITIONER_DIAGONAL (else NULL). *request
 *  receives KFAC_CG_NEED_PRODUCT, or KFAC_CG_DONE when g = 0. λ is read now.
 *  Errors: NULL_POINTER, INVALID_SIZE (n_layers, desc->struct_size, no layers), INVALID_ARGUMENT
 *  (a desc field out of range, diag given without DIAGONAL, a negative d, a bias buffer for a
 *  layer without bias), DTYPE_MISMATCH, NON_FINITE (g or d), NO_STATISTICS / NO_INVERSES (KFAC
 *  preconditioner, as kfac_curvature_multiply_*), OUT_OF_MEMORY. */
KFAC_API int kfac_cg_begin_f32(kfac_optimizer *opt, const kfac_cg_desc *desc, const float *const *grad_w,
                               const float *const *grad_b, const float *const *diag_w, const float *const *diag_b,
                               int32_t n_layers, int32_t *request);
KFAC_API int kfac_cg_begin_f64(kfac_optimizer *opt, const kfac_cg_desc *desc, const double *const *grad_w,
                               const double *const *grad_b, const double *const *diag_w, const double *const *diag_b,
                               int32_t n_layers, int32_t *request);

/** Since 0.2. Writes the vector the solve asks G to multiply into vector_* (caller-owned, the
 *  step's layout). Changes nothing. Errors: NULL_POINTER, INVALID_SIZE, INVALID_ARGUMENT,
 *  DTYPE_MISMATCH, NO_SOLVE (no open solve, or it has stopped). */
KFAC_API int kfac_cg_get_vector_f32(kfac_optimizer *opt, float *const *vector_w, float *const *vector_b, int32_t n_layers);
KFAC_API int kfac_cg_get_vector_f64(kfac_optimizer *opt, double *const *vector_w, double *const *vector_b,
                                    int32_t n_layers);

/** Since 0.2. Supplies G·v for the vector of kfac_cg_get_vector_* (G without λ and η) and runs
 *  the iteration; *request receives KFAC_CG_NEED_PRODUCT or KFAC_CG_DONE. Errors: NULL_POINTER,
 *  INVALID_SIZE, INVALID_ARGUMENT, DTYPE_MISMATCH, NO_SOLVE, NON_FINITE (NaN or Inf in the
 *  product — supply it again — or a K-FAC-preconditioned residual that is not finite). On error
 *  the solve is unchanged. */
KFAC_API int kfac_cg_supply_product_f32(kfac_optimizer *opt, const float *const *product_w,
                                        const float *const *product_b, int32_t n_layers, int32_t *request);
KFAC_API int kfac_cg_supply_product_f64(kfac_optimizer *opt, const double *const *product_w,
                                        const double *const *product_b, int32_t n_layers, int32_t *request);

/** Since 0.2. Ends the solve: writes s into step_* and, if result is not NULL, fills *result. A
 *  solve that has not stopped ends with KFAC_CG_REASON_CALLER. s is kept for the next warm start
 *  and its model for kfac_cg_report_loss_change. Errors: NULL_POINTER, INVALID_SIZE (n_layers,
 *  result->struct_size), INVALID_ARGUMENT, DTYPE_MISMATCH, NO_SOLVE (no open solve, or a warm
 *  start's first product not yet supplied). */
KFAC_API int kfac_cg_finish_f32(kfac_optimizer *opt, float *const *step_w, float *const *step_b, int32_t n_layers,
                                kfac_cg_result *result);
KFAC_API int kfac_cg_finish_f64(kfac_optimizer *opt, double *const *step_w, double *const *step_b, int32_t n_layers,
                                kfac_cg_result *result);

/** Since 0.2. Reports the mean loss before and after θ ← θ + step_scale · s (s of the last
 *  finished solve; step_scale < 1 after a line search): *rho (may be NULL) receives
 *  ρ = (after − before) / m(step_scale) (NaN if the model is not negative), and λ is adjusted as
 *  described above. One report per finished solve. loss_after may be +Inf (ρ = −Inf, λ grows).
 *  Errors: NULL_POINTER (opt), INVALID_ARGUMENT (step_scale not finite and > 0), NON_FINITE (the
 *  losses), NO_SOLVE (no finished solve since the last report). */
KFAC_API int kfac_cg_report_loss_change(kfac_optimizer *opt, double step_scale, double loss_before, double loss_after,
                                        double *rho);

/** Since 0.2. A product function for kfac_cg_solve_*: writes G·vector into product (the step's
 *  layout; both arrays hold n_layers pointers, bias entries NULL for layers without bias) and
 *  returns 0, or non-zero to stop. */
typedef int (*kfac_cg_product_fn_f32)(void *user, const float *const *vector_w, const float *const *vector_b,
                                      float *const *product_w, float *const *product_b, int32_t n_layers);
typedef int (*kfac_cg_product_fn_f64)(void *user, const double *const *vector_w, const double *const *vector_b,
                                      double *const *product_w, double *const *product_b, int32_t n_layers);

/** Since 0.2. C convenience over the calls above: begin, call `product` for every requested
 *  vector, finish into step_* and *result (may be NULL). `product` runs on the calling thread,
 *  with buffers the library owns (valid during the call), and must not call into `opt`. If it
 *  returns non-zero, the solve stays open at its last iterate (kfac_cg_finish_* returns it) and
 *  the call fails with KFAC_ERROR_CALLBACK; a product with NaN or Inf fails with NON_FINITE, also
 *  leaving the solve open. Not for bindings that cannot guarantee both (Python uses the calls
 *  above). Errors: those of the four calls, CALLBACK. */
KFAC_API int kfac_cg_solve_f32(kfac_optimizer *opt, const kfac_cg_desc *desc, const float *const *grad_w,
                               const float *const *grad_b, const float *const *diag_w, const float *const *diag_b,
                               kfac_cg_product_fn_f32 product, void *user, float *const *step_w, float *const *step_b,
                               int32_t n_layers, kfac_cg_result *result);
KFAC_API int kfac_cg_solve_f64(kfac_optimizer *opt, const kfac_cg_desc *desc, const double *const *grad_w,
                               const double *const *grad_b, const double *const *diag_w, const double *const *diag_b,
                               kfac_cg_product_fn_f64 product, void *user, double *const *step_w,
                               double *const *step_b, int32_t n_layers, kfac_cg_result *result);

/* ---------------------------------------------------------------------------------------------
 * EKFAC (George, Laurent, Bouthillier, Ballas & Vincent 2018), Since 0.2.
 *
 * Strategy KFAC_INVERSE_EKFAC keeps, per group of every layer, the eigenbases Q_A, Q_G of the
 * factors exactly as KFAC_INVERSE_EIGEN computes them (at the same inverse updates) and a
 * scaling S of out × in(+1) values (a group's dimensions) that replaces d_G d_Aᵀ:
 *     U = Q_G [(Q_Gᵀ V Q_A) ⊘ (S + λ)] Q_Aᵀ  =  (Ũ diag(vec S) Ũᵀ + λ I)⁻¹ vec(V),  Ũ = Q_A ⊗ Q_G,
 * λ the eigen strategy's (KFAC_PARAM_FACTOR_DAMPING if > 0, else KFAC_PARAM_DAMPING), applied
 * when preconditioning (γ candidates and the adaptive mode work as with the eigen strategy).
 *
 * The statistic. S is the second moment of per-example gradients G_n (out × in(+1), the bias
 * column last) in the Kronecker eigenbasis, S = E[(Q_Gᵀ G_n Q_A)^∘2] (∘2: entrywise square);
 * for a fixed basis it is the diagonal of Ũᵀ F Ũ, F = E[vec G_n vec G_nᵀ] the empirical Fisher of
 * the per-example gradients, and so the best diagonal in that basis in Frobenius norm (never
 * farther from F than A ⊗ G computed from the same rows). Per-example gradients need inputs and
 * output gradients of the same rows: record them with kfac_layer_record_examples_* (instead of
 * kfac_layer_record_inputs_* and kfac_layer_record_output_grads_*). With the rows of all such
 * calls since S was last updated (output gradients scaled as "Gradients" says):
 *   dense, an example = T consecutive rows (T = rows_per_example; T = 1 for plain batches):
 *     G_n = Σ_t g_{n,t} ā_{n,t}ᵀ,      S_batch = (1/R) Σ_n (Q_Gᵀ G_n Q_A)^∘2,   R = N·T rows;
 *   convolution (KFC's |T| split, positions t of an example, ā the patch [c][i][j] then 1):
 *     G_n = Σ_t g_{n,t} ā_{n,t}ᵀ,      S_batch = (1/N) Σ_n (Q_Γᵀ G_n Q_Ω)^∘2     (SUA: Q_Ω of I ⊗ C);
 *   so that S_batch → d_G d_Aᵀ when an example's rows are uncorrelated.
 * KFAC_PARAM_EKFAC_MODE = KFAC_EKFAC_PER_ROW treats every row (position) as its own example:
 * the same formulas with G_n replaced by each g_t ā_tᵀ (cross terms dropped; one gemm per
 * update instead of one per example). With T = 1 (|T| = 1) the two modes are identical.
 *
 * Schedule (per group). Per-example gradients are kept (only while the strategy is
 * KFAC_INVERSE_EKFAC: changing it discards them) until used, in the precision of the handle and
 * in checkpoints:
 *   - when the eigenbases are recomputed (an inverse-update step, kfac_optimizer_update_inverses,
 *     or the first step), S = S_batch in the new bases if per-example gradients are pending,
 *     else S = d_G d_Aᵀ of the new factors (the authors' reset); the pending ones are used up;
 *   - at any other factor update with per-example gradients pending (a factor-update step, or
 *     kfac_optimizer_update_factors once bases exist): S ← β_S S + (1 − β_S) S_batch in the
 *     current bases, β_S = KFAC_PARAM_EKFAC_DECAY;
 *   - every factor update then discards what is pending (the bases follow the inverse period,
 *     S the factor-update period).
 * Without paired recording S stays d_G d_Aᵀ and EKFAC is the eigen strategy.
 *
 * Use. Set the strategy before recording (rows recorded under another strategy add to A and G
 * only), and call kfac_layer_record_examples_* for a layer instead of — not besides — the two
 * unpaired calls. The γ candidates ("Re-choosing γ") and the adaptive mode work as with the eigen
 * strategy (λ is applied when preconditioning, no re-inversion per candidate). Cost: pending
 * per-example gradients are kept as their rows (rows·(in + 1 + out) values; an example of T rows
 * as a matrix instead, out·(in+1) values, when T·(out² + (in+1)²) > out·(in+1)·(out + in + 1),
 * e.g. convolutions with many positions); each factor update then rotates them into the bases
 * (two block products per row or per matrix) and, for examples of several rows, forms each
 * example's rotated gradient (one out × T × (in+1) gemm). The per-row mode's single gemm is
 * cheaper for sequences, not for convolutions whose positions outnumber the channels.
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_ekfac_mode {
    KFAC_EKFAC_PER_EXAMPLE = 0,   /* exact: an example's rows summed before squaring */
    KFAC_EKFAC_PER_ROW = 1        /* every row or position an example of its own */
} kfac_ekfac_mode;

/** Since 0.2. Records `rows` rows of inputs and the output gradients of the same rows of layer
 *  `layer`, in the layouts (and with the reduction and scale) of kfac_layer_record_inputs_* and
 *  kfac_layer_record_output_grads_*: it adds exactly what those two calls add to A and G, and,
 *  while the strategy is KFAC_INVERSE_EKFAC, keeps the per-example gradients S is estimated
 *  from (see "EKFAC"). Dense layers: an example is `rows_per_example` consecutive rows (a
 *  sequence of T tokens; rows must be a multiple of it). Convolutions: an example is a row
 *  (its positions come from the geometry) and rows_per_example must be 1.
 *  Errors: those of kfac_layer_record_inputs_*, INVALID_SIZE (rows_per_example < 1 or not
 *  dividing rows; not 1 for a convolution), NON_FINITE (also when the per-example gradients'
 *  second moments could overflow). On error nothing is recorded. */
KFAC_API int kfac_layer_record_examples_f32(kfac_optimizer *opt, int32_t layer, const float *inputs,
                                            const float *output_grads, int64_t rows, int64_t rows_per_example);
KFAC_API int kfac_layer_record_examples_f64(kfac_optimizer *opt, int32_t layer, const double *inputs,
                                            const double *output_grads, int64_t rows, int64_t rows_per_example);

/** Since 0.2. Copies EKFAC's current scaling S of group `group` of layer `layer` into
 *  scaling[g_dim][a_dim] (row-major; kfac_layer_info's dimensions): S[i][j] belongs to the i-th
 *  eigenvector of G and the j-th of A, eigenvalues ascending (LAPACK syevd's order; block by
 *  block for grouped and SUA factors). Errors: NULL_POINTER, UNKNOWN_LAYER, INVALID_ARGUMENT
 *  (group), DTYPE_MISMATCH, NO_INVERSES (the layer has no EKFAC inverse: the strategy is another
 *  one, or no inverse update happened yet). Changes nothing in the handle. */
KFAC_API int kfac_layer_get_ekfac_scaling_f32(const kfac_optimizer *opt, int32_t layer, int32_t group, float *scaling);
KFAC_API int kfac_layer_get_ekfac_scaling_f64(const kfac_optimizer *opt, int32_t layer, int32_t group, double *scaling);

/* ---------------------------------------------------------------------------------------------
 * Distributed (experimental). Since 0.2.
 *
 * Data-parallel K-FAC over several processes (ranks) on the caller's own communication engine —
 * MPI, torch.distributed, anything with a SUM-allreduce. The library never communicates: it packs
 * what must be combined into caller buffers of the handle's precision and unpacks the
 * element-wise sum over all ranks. Every rank has a handle with the same layers and parameters,
 * records the statistics of its own local batch (a disjoint slice of the union batch, any size,
 * possibly empty), and passes the same gradient to kfac_optimizer_step_* — the gradient of the
 * mean loss over the union batch, which the caller averages as it would without K-FAC (the
 * library never reduces gradients). Per step, on every rank, in the same order:
 *     record statistics (kfac_optimizer_wants_statistics as usual);
 *     kfac_distributed_get_due(opt, KFAC_DISTRIBUTED_STATISTICS, &due);
 *     if (due) { kfac_distributed_pack_statistics_f64(opt, buf, n); allreduce_sum(buf, n);
 *                kfac_distributed_unpack_statistics_f64(opt, buf, n); }
 *     kfac_distributed_get_due(opt, KFAC_DISTRIBUTED_INVERSES, &due);
 *     if (due) { kfac_distributed_pack_inverses_f64(opt, ibuf, m); allreduce_sum(ibuf, m);
 *                kfac_distributed_unpack_inverses_f64(opt, ibuf, m); }
 *     kfac_distributed_get_due(opt, KFAC_DISTRIBUTED_SCALINGS, &due);     (EKFAC only)
 *     if (due) { kfac_distributed_pack_scalings_f64(opt, sbuf, s); allreduce_sum(sbuf, s);
 *                kfac_distributed_unpack_scalings_f64(opt, sbuf, s); }
 *     kfac_optimizer_step_f64(opt, grads_w, grads_b, n_layers);
 * n, m and s come from kfac_distributed_get_count; the due flags are the same on every rank.
 * kfac_distributed_synchronize does the exchanges in one call through a caller-supplied
 * SUM-allreduce (kfac_collectives), with buffers the handle keeps, for engines without a
 * companion library (NCCL, custom).
 *
 * Statistics. KFAC_DISTRIBUTED_REDUCE_EAGER (the default) packs the pending statistics as sums
 * Σ x xᵀ (each factor block's upper triangle, row-major) and a row count per factor: after the
 * allreduce every rank folds the union batch's statistics — exactly a single process's factors
 * on the union batch, for any local batch sizes (up to the order of floating-point sums). Due on
 * every factor-update step (with KFAC_PARAM_FACTOR_UPDATE_PERIOD 0, exchange before
 * kfac_optimizer_update_factors yourself). KFAC_DISTRIBUTED_REDUCE_LAZY (kfac-jax's lazy mode)
 * folds local statistics into local moving averages and, only before an inverse update (or a γ
 * step that inverts), packs each rank's moving average and sets every rank's factors to their
 * mean (statistics recorded since the last fold are in the pack only when that step folds;
 * otherwise they stay pending on their rank until their fold, weighted as in one process):
 * the union batch's factors when every rank records the same number of rows per fold, an
 * approximation otherwise; between those steps the ranks' factors differ (so do factor-based
 * queries: kfac_layer_get_factors_*, kfac_curvature_multiply_* with power 1), not their
 * inverses or directions. Row counts travel as values of the handle's precision: exact up to 2^24
 * rows per fold in float32, 2^53 in float64.
 *
 * Inverses. The inversion units — one block of one factor of one group (convolution groups and
 * channel groups are separate units, the bias coordinate its own) — are assigned to ranks by
 * longest processing time first: cost n³, largest first, ties in the fixed order (layer, group,
 * input before output factor, block), each to the least-loaded rank (the lowest on a tie).
 * kfac_distributed_pack_inverses_* computes the inverses the next step would compute, for the units
 * this rank owns, and writes every group's inverse with zeros in the units it does not own; after
 * the SUM-allreduce each value is its owner's exactly (x + 0 + … = x), so
 * kfac_distributed_unpack_inverses_* gives every rank bit-identical inverses, which the next step
 * commits instead of computing them. Every rank then ends the step with identical directions.
 * Without the exchange (a single process, or a step whose prepared inverses were invalidated by
 * a parameter, state or inverse change in between) the step computes every inverse itself. The
 * SUM route's inverse buffer holds every group's whole inverse representation (zero-padded: the
 * volume of a broadcast of all inverses on every rank). The allgatherv route
 * (kfac_distributed_get_inverse_layout, kfac_distributed_pack_owned_inverses_*,
 * kfac_distributed_unpack_gathered_inverses_*) sends each rank's own units only and gives the
 * same bits.
 *
 * Errors and rollback. A call that fails changes nothing in the handle. A failed
 * kfac_distributed_pack_inverses_* (a factor not positive definite on its owner, say) fills the
 * buffer with NaN: take part in the allreduce anyway, and kfac_distributed_unpack_inverses_* then
 * fails with NON_FINITE on every rank alike, leaving every handle as before the step. Unpack
 * checks that every value is finite and every count a whole number >= 0.
 *
 * The adaptive mode. kfac_adaptive_solve_step_size_* and kfac_candidates_solve_step_size_* form
 * their quadratic model from the rows they are given. In a distributed run each rank instead
 * packs the model's output-space sums over its own rows (kfac_distributed_pack_model_sums_*: per
 * candidate Σ uᵀFu, Σ uᵀFv, Σ vᵀFv with u = J·D_k, v = J·δ₀; then the rows; then a flag), the
 * caller SUM-allreduces the 3·n_candidates + 2 doubles, and kfac_distributed_solve_model_sums
 * solves from them on every rank: the union batch's α, μ and M(δ), bit-identical everywhere (the
 * directions' inner products are already identical). Report the union batch's mean losses to
 * kfac_adaptive_report_loss_change on every rank.
 *
 * Gauss-Newton products (kfac_gn_*) are means over the examples a rank recorded: weight each
 * rank's product by its rows over the union's and SUM-allreduce the product buffers. Newton-CG
 * (kfac_cg_*) needs nothing more: begin every rank's solve with the union gradient, and before
 * each kfac_cg_supply_product_* SUM-allreduce the ranks' weighted shares of G·v; the solve's
 * state then stays identical on every rank (its K-FAC preconditioner uses the exchanged
 * inverses), and so does its step. Report the union batch's losses to kfac_cg_report_loss_change.
 *
 * Strategies: Cholesky, eigen and EKFAC. EKFAC (KFAC_INVERSE_EKFAC, record with
 * kfac_layer_record_examples_*) takes three exchanges, in this order: the statistics (the union's
 * factors), the inverses (the eigenbases Q_A, Q_G, computed by their owners as for the eigen
 * strategy; the pack carries S as zeros), then the scalings. S is a running mean of
 * (Q_Gᵀ G_n Q_A)^∘2 over examples n, so kfac_distributed_pack_scalings_* writes, per group whose S
 * the next step sets (new bases, or a fold between refreshes), this rank's sum over its own
 * pending examples in the bases that step uses (the exchanged ones when it inverts: unpack the
 * inverses first) and their count; after the SUM-allreduce kfac_distributed_unpack_scalings_*
 * hands the step the union's sums and count, and S becomes the union batch's (up to the order of
 * floating-point sums). KFAC_DISTRIBUTED_SCALINGS is due on EKFAC steps that invert or fold. The
 * factor update period must be ≥ 1 (kfac_optimizer_update_factors folds S from one rank's
 * examples: the pack, unpack and count calls return UNSUPPORTED with period 0).
 *
 * Block-tridiagonal links (kfac_layer_link). The cross factors A_{l,l+1}, G_{l,l+1} join the
 * statistics pack after the groups' factors, as full rectangular matrices: eager, the pending
 * sums Σ x_l x_{l+1}ᵀ of the paired rows and their count (every recorded row must be paired at the
 * pack: a layer's rows waiting for its partner's give INVALID_SIZE); lazy, the moving averages
 * and a 1/0 weight, as for the diagonal factors. Each linked layer's block-tridiagonal inverse
 * (its damped factors' inverses and, with a link up, Ψ, C, D and Σ_{l|l+1}⁻¹ of eq. 8) is one
 * inversion unit, computed by the rank that owns its input factor's block (see
 * kfac_distributed_get_owner; that rank also inverts the factors of the layer above, which its Ψ
 * needs) and shared through the inverse exchange, SUM or allgatherv route, after the groups'
 * units: every rank holds bit-identical link inverses and directions, equal to one process's on
 * the union batch.
 *
 * Allocation: after warm-up (the first exchange of each kind) the count, due, layout, pack and
 * unpack calls and kfac_distributed_synchronize allocate nothing, as a step does.
 *
 * Ownership: every buffer is the caller's, read or written only during the call; counts are
 * int64_t values of the handle's precision (model sums: doubles), and an MPI-style engine whose
 * counts are int must send them in chunks (libkfac_mpi does, at 2^31 − 1).
 *
 * Threading: as every call on a handle, one thread at a time; pack and unpack do not
 * communicate, so the allreduce may run on any thread the engine needs (MPI_THREAD_FUNNELED
 * suffices when the caller communicates on its calling thread).
 * ------------------------------------------------------------------------------------------- */

typedef enum kfac_distributed_reduce {
    KFAC_DISTRIBUTED_REDUCE_EAGER = 0,  /* pending sums and row counts at every factor update */
    KFAC_DISTRIBUTED_REDUCE_LAZY = 1    /* moving averages, only before an inverse update */
} kfac_distributed_reduce;

typedef enum kfac_distributed_exchange {
    KFAC_DISTRIBUTED_STATISTICS = 0,
    KFAC_DISTRIBUTED_INVERSES = 1,
    KFAC_DISTRIBUTED_SCALINGS = 2     /* EKFAC's scaling S; since 0.2 */
} kfac_distributed_exchange;

/** Since 0.2. Makes the handle rank `rank` of `size` processes (0 ≤ rank < size ≤ 2^24; 0 of 1,
 *  a single process, is the default). Neither saved in nor restored from states: set it again
 *  after kfac_state_load. Errors: NULL_POINTER, INVALID_ARGUMENT. */
KFAC_API int kfac_distributed_set_world(kfac_optimizer *opt, int32_t rank, int32_t size);

/** Since 0.2. The handle's rank and world size (either pointer may be NULL). Errors: NULL_POINTER (opt). */
KFAC_API int kfac_distributed_get_world(const kfac_optimizer *opt, int32_t *rank, int32_t *size);

/** Since 0.2. The number of values (of the handle's precision) of a pack of `what`
 *  (kfac_distributed_exchange), in *count. Statistics: per group of each layer in order, the input
 *  then the output factor, each factor's blocks' upper triangles (b(b+1)/2 values each) then one
 *  count. Inverses: per group, the inverse strategy's representation. Scalings: per group,
 *  o·a sums (o, a the output and input factor dimensions, row-major as
 *  kfac_layer_get_ekfac_scaling_*) then one example count. With block-tridiagonal links the
 *  statistics end with each link's cross factors (in link order, A_{l,l+1} then G_{l,l+1}, each
 *  the full row-major matrix then its row count) and the inverses with each linked layer's link
 *  inverse (ascending layers). Fixed once layers are registered and linked (inverses: for the
 *  current strategy). Errors: NULL_POINTER, INVALID_ARGUMENT (what), UNSUPPORTED (EKFAC with
 *  KFAC_PARAM_FACTOR_UPDATE_PERIOD 0), OUT_OF_MEMORY. */
KFAC_API int kfac_distributed_get_count(kfac_optimizer *opt, int32_t what, int64_t *count);

/** Since 0.2. *due = 1 when the next kfac_optimizer_step_* needs the exchange `what` (the same on
 *  every rank of a consistent run), else 0. Statistics already unpacked for this step are not
 *  due again (a retry after a failed inverse exchange must not count them twice): record every
 *  statistic of a step before its exchange. Errors: NULL_POINTER, INVALID_ARGUMENT (what). */
KFAC_API int kfac_distributed_get_due(const kfac_optimizer *opt, int32_t what, int32_t *due);

/** Since 0.2. The rank that computes block `block` of the input (side 0) or output (side 1) factor
 *  of group `group` of layer `layer`, in *rank. Errors: NULL_POINTER, UNKNOWN_LAYER,
 *  INVALID_ARGUMENT (group, side, block). */
KFAC_API int kfac_distributed_get_owner(const kfac_optimizer *opt, int32_t layer, int32_t group, int32_t side,
                                        int32_t block, int32_t *rank);

/** Since 0.2. Writes this rank's statistics (see "Statistics") into buffer[count], count from
 *  kfac_distributed_get_count. Changes nothing in the handle. Errors: NULL_POINTER, INVALID_SIZE
 *  (count; a link's rows that do not pair), DTYPE_MISMATCH, UNSUPPORTED (see
 *  kfac_distributed_get_count), OUT_OF_MEMORY. */
KFAC_API int kfac_distributed_pack_statistics_f32(kfac_optimizer *opt, float *buffer, int64_t count);
KFAC_API int kfac_distributed_pack_statistics_f64(kfac_optimizer *opt, double *buffer, int64_t count);

/** Since 0.2. Replaces the statistics by the SUM-allreduced pack (eager: the pending statistics
 *  become the union's; lazy: each factor becomes the mean of the ranks' moving averages, nothing
 *  pending). Use the reduce mode the pack used. Errors: NULL_POINTER, INVALID_SIZE, DTYPE_MISMATCH,
 *  NON_FINITE, INVALID_ARGUMENT (a count that is not a whole number >= 0), UNSUPPORTED (see
 *  kfac_distributed_get_count), OUT_OF_MEMORY. On error nothing changes. */
KFAC_API int kfac_distributed_unpack_statistics_f32(kfac_optimizer *opt, const float *buffer, int64_t count);
KFAC_API int kfac_distributed_unpack_statistics_f64(kfac_optimizer *opt, const double *buffer, int64_t count);

/** Since 0.2. Computes the inverses the next step needs for the units this rank owns and writes
 *  every group's inverse, zeros elsewhere (all zeros when no inverse is due). Nothing committed
 *  changes. Errors: NULL_POINTER, INVALID_SIZE, DTYPE_MISMATCH, NO_STATISTICS, NO_INVERSES,
 *  NON_FINITE, NOT_POSITIVE_DEFINITE, EIGEN_FAILED, UNSUPPORTED (see kfac_distributed_get_count),
 *  OUT_OF_MEMORY; on an error after the size checks the buffer is filled with NaN (see "Errors
 *  and rollback"). EKFAC: the bases, with zeros in place of S. */
KFAC_API int kfac_distributed_pack_inverses_f32(kfac_optimizer *opt, float *buffer, int64_t count);
KFAC_API int kfac_distributed_pack_inverses_f64(kfac_optimizer *opt, double *buffer, int64_t count);

/** Since 0.2. Takes the SUM-allreduced inverse pack as the inverses the next step commits.
 *  Errors: NULL_POINTER, INVALID_SIZE, DTYPE_MISMATCH, NON_FINITE (some rank's pack failed),
 *  NO_STATISTICS, NO_INVERSES, UNSUPPORTED (see kfac_distributed_get_count), OUT_OF_MEMORY. On
 *  error nothing changes. */
KFAC_API int kfac_distributed_unpack_inverses_f32(kfac_optimizer *opt, const float *buffer, int64_t count);
KFAC_API int kfac_distributed_unpack_inverses_f64(kfac_optimizer *opt, const double *buffer, int64_t count);

/** Since 0.2. EKFAC: writes this rank's share of the scaling S for the next step into
 *  buffer[count] (count from kfac_distributed_get_count with KFAC_DISTRIBUTED_SCALINGS): per
 *  group in layer order, for groups whose S that step sets (it inverts them: in the exchanged
 *  bases; it folds and they have an EKFAC inverse: in the current bases), the o·a sums
 *  Σ_n (Q_Gᵀ G_n Q_A)^∘2 over this rank's pending paired examples (rows for dense layers in per-row
 *  mode) then their count; zeros elsewhere (all zeros when no S changes). Call it after the
 *  inverse exchange of the same step. Nothing changes. Errors: NULL_POINTER, INVALID_SIZE,
 *  DTYPE_MISMATCH, INVALID_ARGUMENT (the strategy is not EKFAC), NO_INVERSES (the step inverts and
 *  its inverse exchange was not unpacked), UNSUPPORTED (see kfac_distributed_get_count); on an
 *  error after the size checks the buffer is filled with NaN (take part in the allreduce anyway). */
KFAC_API int kfac_distributed_pack_scalings_f32(kfac_optimizer *opt, float *buffer, int64_t count);
KFAC_API int kfac_distributed_pack_scalings_f64(kfac_optimizer *opt, double *buffer, int64_t count);

/** Since 0.2. EKFAC: takes the SUM-allreduced scaling pack for the next step, which then forms S
 *  from the union's sums and count (S_batch = sums / count at new bases; β_S S + (1 − β_S) S_batch
 *  at a fold) instead of this rank's examples. Valid for that step only (a later statistics or
 *  inverse exchange drops it). Errors: NULL_POINTER, INVALID_SIZE, DTYPE_MISMATCH, NON_FINITE (some
 *  rank's pack failed), INVALID_ARGUMENT (the strategy is not EKFAC; a negative sum; a count that is
 *  not a whole number >= 0), UNSUPPORTED, OUT_OF_MEMORY. On error nothing changes. */
KFAC_API int kfac_distributed_unpack_scalings_f32(kfac_optimizer *opt, const float *buffer, int64_t count);
KFAC_API int kfac_distributed_unpack_scalings_f64(kfac_optimizer *opt, const double *buffer, int64_t count);

/** Since 0.2. The adaptive mode's model sums over this rank's rows, for a SUM-allreduce:
 *  sums[3k], sums[3k+1], sums[3k+2] = Σ_n u_nᵀF_n u_n, u_nᵀF_n v_n, v_nᵀF_n v_n for candidate k
 *  (u = direction_products[k], v = previous_products, F_n the output Fisher at outputs[n]), then
 *  sums[3·n_candidates] = rows and sums[3·n_candidates + 1] = 1 if the previous update takes part
 *  (previous_products given and a previous solve), else 0; n_sums must be 3·n_candidates + 2.
 *  n_candidates 1 solves for candidate 0 (as kfac_adaptive_solve_step_size_*), else it must be
 *  kfac_candidates_get_count. Arguments as kfac_candidates_solve_step_size_*, except that rows may
 *  be 0 (a rank without examples: zeros; outputs and products are not read). Changes nothing.
 *  Errors: those of kfac_candidates_solve_step_size_*, INVALID_SIZE (n_sums). */
KFAC_API int kfac_distributed_pack_model_sums_f32(kfac_optimizer *opt, const float *outputs,
                                                  const float *const *direction_products, int32_t n_candidates,
                                                  const float *previous_products, int64_t rows, int64_t output_dim,
                                                  int32_t distribution, double *sums, int64_t n_sums);
KFAC_API int kfac_distributed_pack_model_sums_f64(kfac_optimizer *opt, const double *outputs,
                                                  const double *const *direction_products, int32_t n_candidates,
                                                  const double *previous_products, int64_t rows, int64_t output_dim,
                                                  int32_t distribution, double *sums, int64_t n_sums);

/** Since 0.2. Solves the step size from SUM-allreduced model sums (the layout of
 *  kfac_distributed_pack_model_sums_*; n_sums = 3·n_candidates + 2) exactly as
 *  kfac_adaptive_solve_step_size_* (one candidate) or kfac_candidates_solve_step_size_* would on
 *  the union batch: *chosen (may be NULL), *alpha, *mu, *predicted_change (may be NULL); the
 *  update and the kept γ as there. Errors: NULL_POINTER, INVALID_SIZE (n_sums), INVALID_ARGUMENT
 *  (candidate count, a row count that is not a whole number >= 1), NON_FINITE, NO_STEP,
 *  OUT_OF_MEMORY. On error nothing changes. */
KFAC_API int kfac_distributed_solve_model_sums(kfac_optimizer *opt, const double *sums, int64_t n_sums, int32_t *chosen,
                                               double *alpha, double *mu, double *predicted_change);

/** Since 0.2. The inverse exchange as an allgatherv, without zero padding: the sizes of each
 *  rank's segment for the next step, in counts[n_ranks] (n_ranks must be the world size) and, if
 *  not NULL, displacements[n_ranks] (their prefix sums: rank r's segment starts at
 *  displacements[r] of the gathered buffer, as MPI_Allgatherv's displs). A segment holds the
 *  units (see "Inverses") its rank owns among those the step inverts, in the fixed order
 *  (layer, group, input before output factor, block), each as the slices of the strategy's
 *  representation that belong to it (Cholesky: the block's inverse, b² values; eigen: its
 *  eigenvectors, b², then its eigenvalues, b). All zero when the step inverts nothing. The same
 *  on every rank; valid until the next step or parameter change. In all, one full inverse pack
 *  at most (when every block is inverted) instead of the SUM route's one per rank. EKFAC: its
 *  bases' units as eigen's (S goes through the scaling exchange). Block-tridiagonal links: after
 *  the blocks' units, one unit per linked layer (its whole link inverse, see "Inverses"). Errors:
 *  NULL_POINTER (opt, counts), INVALID_SIZE (n_ranks), OUT_OF_MEMORY. */
KFAC_API int kfac_distributed_get_inverse_layout(kfac_optimizer *opt, int64_t *counts, int64_t *displacements,
                                                 int32_t n_ranks);

/** Since 0.2. Computes the units this rank owns (as kfac_distributed_pack_inverses_*) and writes
 *  only them: count must be counts[rank] of kfac_distributed_get_inverse_layout. Nothing committed
 *  changes; on an error after the size checks the buffer is filled with NaN (take part in the
 *  allgatherv anyway). Errors: those of kfac_distributed_pack_inverses_*. */
KFAC_API int kfac_distributed_pack_owned_inverses_f32(kfac_optimizer *opt, float *buffer, int64_t count);
KFAC_API int kfac_distributed_pack_owned_inverses_f64(kfac_optimizer *opt, double *buffer, int64_t count);

/** Since 0.2. Takes the allgathered segments of every rank (rank order, count = the sum of the
 *  counts) as the inverses the next step commits: the same bits as the SUM route. Errors: those
 *  of kfac_distributed_unpack_inverses_*. On error nothing changes. */
KFAC_API int kfac_distributed_unpack_gathered_inverses_f32(kfac_optimizer *opt, const float *buffer, int64_t count);
KFAC_API int kfac_distributed_unpack_gathered_inverses_f64(kfac_optimizer *opt, const double *buffer, int64_t count);

/** Since 0.2. A caller's collective engine for kfac_distributed_synchronize (NCCL, a custom
 *  transport, anything with a SUM-allreduce; libkfac_mpi and the torch route use the pack calls
 *  directly). Growable: set struct_size = sizeof(kfac_collectives); fields past an older caller's
 *  struct_size read as NULL. allreduce_sum_f32/_f64 replaces buffer[0..count) by its element-wise
 *  sum over every rank (the same bits on every rank: sum in a fixed order) and returns 0, or
 *  non-zero on failure — which the engine must report on every rank, since ranks that go on would
 *  wait in the next collective. Only the function of the handle's precision is needed (the other
 *  may be NULL). It is called on the thread that called kfac_distributed_synchronize, only during
 *  that call, with buffers the handle owns (valid only during the callback; an engine with int
 *  counts sends count in chunks); it must not call into the same handle. */
typedef struct kfac_collectives {
    size_t struct_size;
    void *user;                                                          /* passed back unchanged */
    int (*allreduce_sum_f32)(float *buffer, int64_t count, void *user);  /* float32 handles */
    int (*allreduce_sum_f64)(double *buffer, int64_t count, void *user); /* float64 handles */
    /* Optional (NULL: the inverses go through allreduce_sum, zero-padded): gathers every rank's
     * send[0..counts[rank]) into receive at displacements[r], on every rank (MPI_Allgatherv with
     * int64_t counts, kfac_distributed_get_inverse_layout's). Returns 0 or non-zero as above. */
    int (*allgatherv_f32)(const float *send, float *receive, const int64_t *counts, const int64_t *displacements,
                          void *user);
    int (*allgatherv_f64)(const double *send, double *receive, const int64_t *counts, const int64_t *displacements,
                          void *user);
} kfac_collectives;

/** Since 0.2. A step's whole exchange through the caller's collective: when due (see
 *  kfac_distributed_get_due) the statistics, then the inverses, then (EKFAC) the scalings, each
 *  packed into a buffer the
 *  handle owns (allocated on first use and kept: after warm-up nothing is allocated),
 *  SUM-allreduced by collectives->allreduce_sum_* (the inverses allgathered by allgatherv_*
 *  when given: kfac_distributed_get_inverse_layout), and unpacked — the sequence of "Distributed"
 *  above in one call; call it where that sequence goes (after recording, before the step), on
 *  every rank. The collective is called 0 to 3 times, the same on every rank with the same
 *  counts, also when a pack fails on some rank (its buffer then carries NaN, so every rank's
 *  unpack fails alike; that rank returns its pack's error, the others NON_FINITE). Errors:
 *  NULL_POINTER (opt, collectives, the function of the handle's precision), INVALID_SIZE
 *  (struct_size smaller than the f32 function's end), CALLBACK (the collective returned non-zero),
 *  OUT_OF_MEMORY (before any collective), and those of the pack and unpack calls. On any error the
 *  handle is as before the call — also after a failure in the inverse or scaling exchange, when
 *  the statistics were already unpacked (they are put back from a copy taken before): retry the call,
 *  or step without it (the step then computes every inverse itself). */
KFAC_API int kfac_distributed_synchronize(kfac_optimizer *opt, const kfac_collectives *collectives);

/* ---------------------------------------------------------------------------------------------
 * Block-tridiagonal (experimental). Since 0.2.
 *
 * Martens & Grosse 2015, §4.3 and §6.3 (seed 001, eq. 8). Linking consecutive dense layers l and
 * l + 1 (layer l + 1 consumes layer l's activation) keeps, besides each layer's A_l ⊗ G_l, the
 * cross blocks F̃_{l,l+1} = A_{l,l+1} ⊗ G_{l,l+1} with
 *     A_{l,l+1} = E[ā_l ā_{l+1}ᵀ]  ((i_l + 1) × (i_{l+1} + 1) with biases, the bias coordinate last)
 *     G_{l,l+1} = E[g_l g_{l+1}ᵀ]  (o_l × o_{l+1}; output gradients scaled as for G),
 * averaged exactly like the diagonal factors (same moving average β, folded at the same times,
 * kept in state images). kfac_layer_get_info's has_inverses reports a linked layer's
 * block-tridiagonal inverse. Along a chain of linked layers l₀ … l_L the inverse of the curvature
 * is approximated as the precision of a chain-structured Gaussian graphical model, the one that
 * agrees with F̃ on the diagonal and first off-diagonal blocks:
 *     F̂⁻¹ = Ξᵀ Λ Ξ,  Ξ = I except Ξ_{l,l+1} = −Ψ_l,  Ψ_l = Ψ^A_l ⊗ Ψ^G_l,
 *     Ψ^A_l = A_{l,l+1} Ā_{l+1}⁻¹,  Ψ^G_l = G_{l,l+1} Ḡ_{l+1}⁻¹,
 *     Λ = diag(Σ_{l₀|l₀+1}⁻¹, …, Σ_{l_L}⁻¹),  Σ_{l_L} = Ā ⊗ Ḡ of the chain's last layer,
 *     Σ_{l|l+1} = Ā_l ⊗ Ḡ_l − C_l ⊗ D_l,  C_l = Ψ^A_l Ā_{l+1} Ψ^Aᵀ_l,  D_l = Ψ^G_l Ḡ_{l+1} Ψ^Gᵀ_l.
 * F̂⁻¹ is zero beyond the first off-diagonal block; F̂'s diagonal blocks are Ā_l ⊗ Ḡ_l and its
 * first off-diagonal ones A_{l,l+1} ⊗ G_{l,l+1}.
 *
 * Damping: factored Tikhonov on the diagonal factors only, wherever they appear (Ψ, C, D, Σ):
 * Ā = A + π√λ I, Ḡ = G + √λ/π I, λ the inverse damping and π as in KFAC_INVERSE_CHOLESKY
 * (1 unless KFAC_PARAM_PI_DAMPING); the cross factors are not damped. This holds for linked
 * layers whatever KFAC_PARAM_INVERSE_STRATEGY says (exact damping would make Σ a sum of three
 * Kronecker products, which eq. 8 cannot invert); unlinked layers keep their strategy. Damping
 * is required: with biases the largest generalized eigenvalue s of C x = s Ā x tends to 1 as λ → 0,
 * so Σ becomes singular.
 *
 * Σ_{l|l+1}⁻¹ by eq. 8: the generalized symmetric-definite eigenproblems C x = s Ā x and
 * D y = t Ḡ y (LAPACK sygvd) give K_A, K_G with K_Aᵀ Ā K_A = I, K_Aᵀ C K_A = diag(s), so that
 * Σ⁻¹ W = K_G [(K_Gᵀ W K_A) ⊘ (1 − t sᵀ)] K_Aᵀ. u = F̂⁻¹ v is applied per layer (V_l, U_l the
 * [o_l][i_l + 1] gradient matrices): W_l = V_l − Ψ^G_l V_{l+1} Ψ^Aᵀ_l, Z_l = Σ_{l|l+1}⁻¹ W_l
 * (Ḡ⁻¹ W Ā⁻¹ for the last layer), U_l = Z_l − Ψ^Gᵀ_{l−1} Z_{l−1} Ψ^A_{l−1}. The inversion costs,
 * per linked layer with a link up, two Cholesky inversions, four gemms and two sygvd; different
 * layers and sides run in parallel like the block-diagonal inversions.
 *
 * Call rules:
 *  - Link with kfac_layer_link before any statistics are recorded; link every consecutive pair
 *    of a chain to get the whole chain. Only ungrouped dense layers can be linked.
 *  - Record the same examples, in the same order, for both layers of a link, inputs and output
 *    gradients alike (kfac_layer_record_inputs_*, kfac_layer_record_output_grads_*; rows may be
 *    split over calls). A fold (kfac_optimizer_update_factors or a folding step) whose rows do not
 *    pair fails with KFAC_ERROR_INVALID_SIZE and changes nothing. Statistics recorded otherwise
 *    (kfac_layer_record_output_grad_columns_*, kfac_gn_chain_record_columns) do not pair either.
 *  - kfac_optimizer_step_* and kfac_optimizer_update_inverses handle the linked layers; a Σ that
 *    is not positive definite (1 − max s·t below √ε of the precision, or a damped factor that
 *    fails Cholesky) gives KFAC_ERROR_NOT_POSITIVE_DEFINITE and changes nothing.
 *  - kfac_layer_precondition_* on a linked layer returns KFAC_ERROR_UNSUPPORTED (its direction
 *    needs its neighbours'). kfac_curvature_multiply_* covers linked layers: power −1 is F̂⁻¹ of
 *    the current inverses (what the step applies), power +1 is F̂ = (Ξᵀ Λ Ξ)⁻¹, also from the
 *    current inverses (their damping and factors), so +1 then −1 is the identity; both return
 *    KFAC_ERROR_NO_INVERSES before the first inversion. Conjugate gradient's K-FAC preconditioner
 *    (kfac_cg_*) applies the same F̂⁻¹ to linked layers.
 *  - Re-choosing γ (KFAC_PARAM_FACTOR_DAMPING_PERIOD > 0) and the KFAC_INVERSE_EKFAC strategy are
 *    not supported with links: the step and kfac_optimizer_update_inverses return
 *    KFAC_ERROR_UNSUPPORTED (EKFAC's paired recording does not pair links either). The adaptive
 *    mode works as usual.
 * ------------------------------------------------------------------------------------------- */

/** Since 0.2. Links dense layer `lower` with layer `upper` = lower + 1 (see "Block-tridiagonal").
 *  Errors: NULL_POINTER, UNKNOWN_LAYER, INVALID_ARGUMENT (upper ≠ lower + 1, a layer that is not an
 *  ungrouped dense layer, a pair already linked), INVALID_SIZE (upper's in_features ≠ lower's
 *  out_features), LAYERS_FROZEN (statistics were recorded), OUT_OF_MEMORY. On error nothing changes. */
KFAC_API int kfac_layer_link(kfac_optimizer *opt, int32_t lower, int32_t upper);

/** Since 0.2. Copies the running cross factors of the link from `lower` to lower + 1:
 *  A_{l,l+1} into a_cross ([i_l + 1][i_{l+1} + 1] row-major, without the + 1 of a layer without
 *  bias) and G_{l,l+1} into g_cross ([o_l][o_{l+1}]). Either pointer may be NULL to skip it.
 *  Errors: NULL_POINTER (opt), UNKNOWN_LAYER, INVALID_ARGUMENT (no link from `lower`),
 *  DTYPE_MISMATCH, NO_STATISTICS. */
KFAC_API int kfac_layer_get_cross_factors_f32(const kfac_optimizer *opt, int32_t lower, float *a_cross,
                                              float *g_cross);
KFAC_API int kfac_layer_get_cross_factors_f64(const kfac_optimizer *opt, int32_t lower, double *a_cross,
                                              double *g_cross);

#endif /* KFAC_EXPERIMENTAL_API */

#ifdef __cplusplus
}
#endif

#endif /* KFAC_H */
