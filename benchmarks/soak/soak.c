/*
 * soak.c — the soak of benchmarks/soak/soak.py through the C interface only, so that the
 * memory figures are the library's (the Python run also counts numpy's and the interpreter's):
 * a 32-64-10 model's two dense float64 layers, random batches of 64 rows, a step each time,
 * the state saved to a file and loaded back every 250 steps, into a fresh handle every 1000
 * (the old one freed). Prints VmRSS after 500 steps, every 10^4 steps and at the end; exits
 * non-zero if a call fails or a direction is not finite. `make soak` runs it (STEPS, default 10^4).
 */
#include <kfac.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) v = atol(line + 6);
    if (f) fclose(f);
    return v;
}

static kfac_optimizer *make(void) {
    kfac_optimizer *o = NULL;
    kfac_dense_desc a = {sizeof a, .in_features = 32, .out_features = 64, .has_bias = 1};
    kfac_dense_desc b = {sizeof b, .in_features = 64, .out_features = 10, .has_bias = 1};
    int32_t l;
    if (kfac_optimizer_create(KFAC_FLOAT64, &o) || kfac_param_set_double(o, KFAC_PARAM_DAMPING, 1e-2) ||
        kfac_param_set_int(o, KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN) || kfac_layer_add_dense(o, &a, &l) ||
        kfac_layer_add_dense(o, &b, &l)) {
        fprintf(stderr, "soak: set-up failed\n");
        exit(1);
    }
    return o;
}

int main(int argc, char **argv) {
    const int steps = argc > 1 ? atoi(argv[1]) : 10000;
    const char *path = argc > 2 ? argv[2] : "/tmp/kfac-soak.ckpt";
    static double x[64 * 32], h[64 * 64], g1[64 * 64], g2[64 * 10], w1[64 * 32], b1[64], w2[640], b2[10];
    double *all[] = {x, h, g1, g2, w1, b1, w2, b2};
    const int n[] = {2048, 4096, 4096, 640, 2048, 64, 640, 10};
    unsigned seed = 15;
    long start = 0;
    kfac_optimizer *o = make();
    for (int k = 0; k < steps; k++) {
        for (int a = 0; a < 8; a++)
            for (int i = 0; i < n[a]; i++) {
                seed = seed * 1103515245u + 12345u;
                all[a][i] = (double)(seed >> 16 & 0x7fff) / 16384.0 - 1.0;
            }
        double *ws[] = {w1, w2}, *bs[] = {b1, b2};
        if (kfac_layer_record_inputs_f64(o, 0, x, 64) || kfac_layer_record_output_grads_f64(o, 0, g1, 64) ||
            kfac_layer_record_inputs_f64(o, 1, h, 64) || kfac_layer_record_output_grads_f64(o, 1, g2, 64) ||
            kfac_optimizer_step_f64(o, ws, bs, 2)) {
            fprintf(stderr, "soak: step %d failed: %s\n", k, kfac_optimizer_last_error(o));
            return 1;
        }
        for (int i = 0; i < 2048; i++)
            if (!isfinite(w1[i])) {
                fprintf(stderr, "soak: step %d: a direction is not finite\n", k);
                return 1;
            }
        if ((k + 1) % 250 == 0) {
            kfac_optimizer *target = (k + 1) % 1000 == 0 ? make() : o;
            if (kfac_state_save_file(o, path) || kfac_state_load_file(target, path)) {
                fprintf(stderr, "soak: save/load at step %d failed: %s\n", k, kfac_optimizer_last_error(target));
                return 1;
            }
            if (target != o) {
                kfac_optimizer_free(o);
                o = target;
            }
        }
        if (k + 1 == 500) start = rss_kib();
        if ((k + 1) % 10000 == 0) printf("soak (C): step %d, VmRSS %ld KiB\n", k + 1, rss_kib());
    }
    long end = rss_kib();
    printf("soak (C): %d steps, save+load every 250, fresh handle every 1000: VmRSS %ld KiB after 500 steps, "
           "%ld KiB at the end (%+ld KiB)\n", steps, start, end, end - start);
    kfac_optimizer_free(o);
    remove(path);
    return 0;
}
