/*
 * threads.c — several threads, each driving its own handle through steps with parallel
 * inversions (KFAC_PARAM_NUM_THREADS = 3, OpenBLAS single-threaded so the worker pool is used),
 * state images and frees: the header's promise that distinct handles may be used concurrently,
 * checked under ThreadSanitizer (`make test-tsan`; also run natively by it).
 */
#include <kfac.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { THREADS = 4, STEPS = 40 };

static int failures;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *what, kfac_optimizer *h) {
    pthread_mutex_lock(&lock);
    failures++;
    fprintf(stderr, "FAIL %s: %s\n", what, h ? kfac_optimizer_last_error(h) : "");
    pthread_mutex_unlock(&lock);
}

static void *drive(void *arg) {
    const int id = (int)(intptr_t)arg;
    for (int round = 0; round < 2; round++) {
        kfac_optimizer *h = NULL;
        if (kfac_optimizer_create(KFAC_FLOAT64, &h)) { fail("create", NULL); return NULL; }
        kfac_param_set_int(h, KFAC_PARAM_NUM_THREADS, 3);
        kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 1);
        kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, (id + round) % 2);
        kfac_dense_desc d0 = {sizeof d0, .in_features = 6, .out_features = 5, .has_bias = 1};
        kfac_dense_desc d1 = {sizeof d1, .in_features = 5, .out_features = 4, .has_bias = 0};
        kfac_conv2d_desc c = {sizeof c, .in_channels = 2, .out_channels = 4, .kernel_h = 3, .kernel_w = 3,
                              .padding_h = 1, .padding_w = 1, .groups = 2, .input_h = 5, .input_w = 5, .has_bias = 1};
        int32_t l;
        if (kfac_layer_add_dense(h, &d0, &l) || kfac_layer_add_dense(h, &d1, &l) || kfac_layer_add_conv2d(h, &c, &l))
            fail("add layers", h);
        double x0[8 * 6], g0[8 * 5], x1[8 * 5], g1[8 * 4], xc[2 * 2 * 25], gc[2 * 4 * 25];
        double w0[30], b0[5], w1[20], wc[4 * 1 * 9], bc[4];
        unsigned seed = 1u + (unsigned)id;
        for (int s = 0; s < STEPS; s++) {
            double *all[] = {x0, g0, x1, g1, xc, gc, w0, b0, w1, wc, bc};
            size_t n[] = {48, 40, 40, 32, 100, 200, 30, 5, 20, 36, 4};
            for (int a = 0; a < 11; a++)
                for (size_t i = 0; i < n[a]; i++) {
                    seed = seed * 1103515245u + 12345u;
                    all[a][i] = (double)(seed >> 16 & 0x7fff) / 16384.0 - 1.0;
                }
            if (kfac_layer_record_inputs_f64(h, 0, x0, 8) || kfac_layer_record_output_grads_f64(h, 0, g0, 8) ||
                kfac_layer_record_inputs_f64(h, 1, x1, 8) || kfac_layer_record_output_grads_f64(h, 1, g1, 8) ||
                kfac_layer_record_inputs_f64(h, 2, xc, 2) || kfac_layer_record_output_grads_f64(h, 2, gc, 2))
                fail("record", h);
            double *ws[] = {w0, w1, wc}, *bs[] = {b0, NULL, bc};
            if (kfac_optimizer_step_f64(h, ws, bs, 3)) fail("step", h);
        }
        size_t size = 0, written = 0;
        kfac_state_get_size(h, &size);
        unsigned char *img = malloc(size);
        if (kfac_state_save(h, img, size, &written) || kfac_state_load(h, img, written)) fail("state", h);
        free(img);
        kfac_optimizer_free(h);
    }
    return NULL;
}

int main(void) {
    void (*set_threads)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    if (set_threads) set_threads(1);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, drive, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    printf("%d threads x 2 handles x %d steps with parallel inversions: %d failures\n", THREADS, STEPS, failures);
    return failures != 0;
}
