/*
 * main.c — the C ABI tests of libkfac, written against include/kfac.h only, run in order.
 *
 * Build and run from the repository root: `make test-capi` (it also runs check_exports.sh), or
 *     make lib
 *     cc -std=c11 -Wall -Wextra -Werror -I include Tests/capi/[a-z]*.c -L .build/release -lkfac \
 *        -Wl,-rpath,$PWD/.build/release -lm -ldl -lpthread -o build/test_capi && build/test_capi
 *
 * Files: harness.{h,c} (check, buffers, twins, the fork guard), oracles.{h,c} (dense references),
 * and one file per family of the header: test_library.c (versions, status strings, exported
 * symbols, NULL handles, the parameter table), test_errors.c (error paths on twin handles),
 * test_layers.c (dense and convolution descriptors, layer info), test_optimizer.c (call order,
 * schedule, concurrency), test_numerics.c, test_state.c, test_adaptive.c (adaptive mode and
 * samplers), test_candidates.c, test_curvature.c and test_ekfac.c (the experimental section,
 * compiled with KFAC_EXPERIMENTAL_API).
 *
 * What is checked:
 *   1. Global functions: versions, status strings, NULL handles for every entry point.
 *   2. Error paths of every entry point, for a float32 and a float64 handle. Each bad call is made
 *      on one handle of a "twin" group whose handles have been fed identical valid calls. After
 *      the bad call the test checks the returned status, that kfac_optimizer_last_error and
 *      kfac_status_string are non-empty, that the state images of the twins are still
 *      byte-identical (the failed call changed nothing: factors, pending statistics, inverses,
 *      counters, parameters), and that a further record + step round succeeds on every twin and
 *      returns bitwise identical directions (memcmp). Calls that fail on caller buffers they would
 *      write also check those buffers are untouched.
 *   3. Call-order and schedule scenarios (NO_STATISTICS, NO_INVERSES, LAYERS_FROZEN, overflowing
 *      finite statistics), parameter defaults and bounds, layer info, state round trips.
 *   4. Numerics through the C ABI (float64): single-example factors A = ā āᵀ, G = g gᵀ exactly;
 *      the eigen strategy against a dense solve of (A⊗G + λI) vec(V) = vec(V₀); the Cholesky
 *      strategy against (G + (√λ/π) I)⁻¹ V (A + π√λ I)⁻¹; the KL clip; the mean-reduction and
 *      output-gradient-scale parameters; the moving average of the factors.
 *   5. Convolutions and channel grouping: kfac_layer_add_dense and kfac_layer_add_conv2d error paths
 *      on the twins (sizes, groups, kernel fit, enums, reserved, struct_size, overflowing sizes);
 *      twins with a grouped conv and a 1-D conv layer (layer info, kfac_layer_get_factors group
 *      range, record/step/precondition errors, state images of differing convolutions); the
 *      growable kfac_conv2d_desc (an older struct_size, zeros read as 1, group sizes not smaller
 *      than the channels); a float64 conv (groups 2, padding, stride 2, NCHW and NHWC): Ω_g, Γ_g
 *      against a naive loop and kfac_optimizer_step_f64 against dense per-group Kronecker solves.
 *      Calls that could crash a buggy library on huge sizes are tried in a forked child first,
 *      so that a crash is reported as a failed check instead of ending the test.
 *   6. The adaptive mode: kfac_adaptive_solve_step_size_* and kfac_adaptive_report_loss_change error paths on the
 *      twins (NULL pointers, sizes, overflow, distributions, NaN/Inf outputs and products,
 *      DTYPE_MISMATCH, NO_STEP order errors, non-finite losses); after each bad call the twins
 *      must also agree bitwise on a following valid solve and report (the state image does not
 *      hold the directions awaiting a solve). NO_STEP on a fresh handle and after loading a
 *      state image; a pending prediction survives an image. The handle-less samplers' error
 *      paths (output buffer untouched) and basic properties. LM parameters' defaults and
 *      ranges. Numerics: kfac_adaptive_solve_step_size_f64 on a linear softmax model against the 2×2
 *      system built in C from the explicit Fisher (1/N) Σ J_nᵀ(diag(p) − ppᵀ)J_n, ρ, and the
 *      Levenberg–Marquardt schedule.
 *   7. Regressions of two adaptive-mode bugs found by this test (fixed): a standalone
 *      precondition or a failed step between a step and its solve must not change the solve.
 *   8. Re-choosing the factor damping γ (KFAC_PARAM_FACTOR_DAMPING_PERIOD T₂,
 *      KFAC_PARAM_FACTOR_DAMPING_DECAY): kfac_candidates_get_count, kfac_candidates_get_directions_*,
 *      kfac_candidates_solve_step_size_* and kfac_adaptive_get_update_* error paths on twins with T₂ = 2
 *      (NULL pointers and array entries, n_layers, bias buffers, candidate range, n_candidates
 *      other than the count, sizes, NaN/Inf, DTYPE_MISMATCH, NO_STEP before a step, after the
 *      solve and before the first solve). The state images hold neither the candidates nor the
 *      directions awaiting a solve, so after each bad call the twins must also agree bitwise on the
 *      count, every candidate's directions and γ, a candidate solve, kfac_adaptive_get_update and a report.
 *      Valid calls: candidate 0 is bitwise kfac_optimizer_step's output, candidates 1, 2 have γ·ω₂, γ/ω₂;
 *      kfac_candidates_get_directions, kfac_candidates_get_count and kfac_adaptive_get_update change nothing (state
 *      image, twin behaviour); the kept γ becomes KFAC_PARAM_FACTOR_DAMPING; one candidate equals
 *      kfac_adaptive_solve_step_size bitwise; a failed step or a precondition before the solve keeps the
 *      candidates, a state load discards them. Numerics (float64, the linear softmax model of 6):
 *      the count 3 on k ≡ 0 mod T₂ and 1 otherwise (T₂ = 2 and 3); each candidate's γ and
 *      directions against a dense solve of (A⊗G + γ_j I) vec(U) = vec(V) with the factors read
 *      back (eigen), against the factored Tikhonov solve (Cholesky, including the inverses adopted
 *      for the steps after a γ step), with KL clipping each candidate's own ν; the kept candidate,
 *      α, μ and M(δ) against the quadratic models built from the explicit Fisher; the new
 *      KFAC_PARAM_FACTOR_DAMPING; kfac_adaptive_get_update = −α·D_kept + μ·δ₀; ρ; γ = 0 starting from λ;
 *      kfac_adaptive_solve_step_size on a γ step (candidate 0, γ unchanged). The new parameters' defaults
 *      and ranges are in 2 and 3 (and learning rate 0, which is accepted and never clips, in 4).
 *
 * 9. Added with the 0.2 ABI (test_library.c, test_layers.c): the version macros against the
 *    loaded library; the 0.1 names are not exported; kfac_param_get_info for every parameter
 *    against the header's table written out here (name, type, bounds, inclusive flags, default,
 *    family, effect), its growable struct, unknown ids and NULL; kfac_param_list; the
 *    kfac_dense_desc checks (older struct_size, reserved, has_bias, struct_size too small,
 *    negative group sizes); the out-parameter getters leave *out untouched when they fail.
 *
 * 10. The experimental kfac_curvature_multiply_f32/_f64 (test_curvature.c), in both precisions:
 *    power +1 on a dense layer with bias, a dense layer with input and output channel grouping,
 *    a grouped dense layer without bias and a 2-group convolution against the explicit damped
 *    Kronecker matrix built from the factors read back per group (eigen A ⊗ G + λI; Cholesky
 *    (A + π√λ I) ⊗ (G + √λ/π I) with π and with KFAC_PARAM_PI_DAMPING 0; KFAC_PARAM_FACTOR_DAMPING γ
 *    in place of λ); power −1 against the dense solve, +1 then −1 giving V back, −1 bitwise
 *    kfac_layer_precondition per layer; a new λ reaching −1 at once (eigen) or at the next inverse
 *    update (Cholesky). Errors on twins with every caller buffer compared: NULL pointers,
 *    n_layers, power, bias buffers, DTYPE_MISMATCH, NaN/Inf, NO_STATISTICS (also with one layer
 *    folded), NO_INVERSES (also after a strategy change), a product that overflows in one layer
 *    only (no layer's buffer written); valid calls leave the state image and the pending adaptive
 *    solve unchanged.
 *
 * 11. The experimental kfac_cg_* (test_cg.c): CG on an SPD matrix of known spectrum against the
 *    dense solve, the result's model values, ρ and the LM rule, the product-function wrapper
 *    bitwise equal to the reverse-communication loop and its CALLBACK path, K-FAC preconditioning
 *    exact in one iteration; every misuse on twins, whose solves must then go on identically.
 * 12. Issue 15 (test_reliability.c): crafted state images with a valid checksum (counters, row
 *    counts, flags, NaN/Inf and impossible factors or inverses) refused with the handle unchanged;
 *    the checksum before the version; pending sums that overflow only together refused, and
 *    kfac_optimizer_discard_statistics as the way out; kfac_optimizer_free joins the worker
 *    threads; state files (links at temporary names, concurrent saves to one path, non-UTF-8
 *    paths, FIFOs, directories, a 64 GiB file, saves killed mid-write); OUT_OF_MEMORY under an
 *    address-space limit; long 1-D convolutions registered at once; numerical faults recovering
 *    like a clean twin; every single-bit flip and truncation of a dense + conv + adaptive image.
 *    KFAC_TEST_LIGHT=1 (the valgrind run) skips the forking, timing and exhaustive parts.
 *
 * Every check prints one line ("ok" or "FAIL"); the exit status is the number of failures
 * (capped at 100), 0 if all passed.
 * 10. Gauss-Newton products (test_gauss_newton.c, experimental): S Sᵀ = B and B·q against B
 *     written out; G·v from stored columns (caller's and the chain's own) and from the chain's
 *     R operator against the analytic (1/N) Σ JᵀBJ v of a tanh MLP, three distributions, both
 *     precisions; K = 1 FACTOR columns bitwise record_output_grads; every misuse on twins with the
 *     kept columns and chain compared bitwise after each bad call.
 *     KFRA (test_kfra.c, experimental): = KFLR at N = 1 and = the recursion written out at N = 6
 *     (GGN and Hessian), three distributions, both precisions; misuse on twins.
 */
#include "harness.h"

#include <unistd.h>

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* keep the output in order if the library crashes */
    char tmpdir[] = "/tmp/kfac-capi-XXXXXX";
    if (!mkdtemp(tmpdir)) {
        printf("FAIL cannot create a temporary directory\n");
        return 1;
    }

    test_globals();
    test_exports();
    test_param_table();
    test_getters();
    test_candidates_null_handle();
    test_errors(KFAC_FLOAT32, tmpdir);
    test_errors(KFAC_FLOAT64, tmpdir);
    test_dense_desc();
    test_conv_errors(KFAC_FLOAT32);
    test_conv_errors(KFAC_FLOAT64);
    test_conv_desc_compat();
    test_call_order();
    test_params_and_info();
    test_layer_info();
    test_concurrency();
    test_async_inversion();
    test_numerics();
    test_conv_numerics();
    test_adaptive_call_order();
    test_samplers();
    test_adaptive_numerics();
    test_candidate_errors(KFAC_FLOAT32);
    test_candidate_errors(KFAC_FLOAT64);
    test_candidate_numerics();
    test_adaptive_pending_solve();
    test_adaptive_skipped_reports();
    test_curvature_multiply();
    test_distributed();
    test_gauss_newton();
    test_kfra();
    test_cg();
    test_ekfac_numerics();
    test_ekfac_errors(KFAC_FLOAT32);
    test_ekfac_errors(KFAC_FLOAT64);
    test_tridiagonal();
    test_reliability(tmpdir);

    rmdir(tmpdir);
    printf("\n%d checks, %d failed\n", g_checks, g_failures);
    if (g_failures) printf("FAILED\n");
    else printf("ALL PASSED\n");
    return g_failures > 100 ? 100 : g_failures;
}
