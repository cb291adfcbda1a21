/*
 * async.c — KFAC_PARAM_ASYNC_INVERSION under ThreadSanitizer (`make test-tsan`): two threads,
 * each driving its own handle whose background thread inverts (on a 2-thread worker pool, OpenBLAS
 * single-threaded) while the caller records, folds, steps, saves state images, changes the
 * strategy and the mode, calls update_inverses, loads an image and frees the handle with work
 * pending. Every call must succeed and TSan must see no race between the caller's thread, the
 * background thread and the pool's workers.
 */
#include <kfac.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { THREADS = 2, STEPS = 48 };

static int failures;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *what, int step, kfac_optimizer *h) {
    pthread_mutex_lock(&lock);
    failures++;
    fprintf(stderr, "FAIL %s at step %d: %s\n", what, step, h ? kfac_optimizer_last_error(h) : "");
    pthread_mutex_unlock(&lock);
}

static void *drive(void *arg) {
    const int id = (int)(intptr_t)arg;
    kfac_optimizer *h = NULL;
    if (kfac_optimizer_create(KFAC_FLOAT32, &h)) { fail("create", -1, NULL); return NULL; }
    kfac_param_set_int(h, KFAC_PARAM_NUM_THREADS, 2);
    kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 2);
    kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, id % 2);
    kfac_param_set_int(h, KFAC_PARAM_ASYNC_INVERSION, KFAC_ASYNC_INVERSION_NEWEST);
    kfac_dense_desc d0 = {sizeof d0, .in_features = 24, .out_features = 20, .has_bias = 1};
    kfac_dense_desc d1 = {sizeof d1, .in_features = 20, .out_features = 16, .has_bias = 0};
    int32_t l;
    if (kfac_layer_add_dense(h, &d0, &l) || kfac_layer_add_dense(h, &d1, &l)) fail("add layers", -1, h);
    static const size_t n[] = {8 * 24, 8 * 20, 8 * 20, 8 * 16, 20 * 24, 20, 16 * 20};
    float *buf[7];
    for (int a = 0; a < 7; a++) buf[a] = malloc(n[a] * sizeof(float));
    unsigned char *image = NULL;
    size_t written = 0;
    unsigned seed = 7u + (unsigned)id;
    for (int s = 0; s < STEPS; s++) {
        for (int a = 0; a < 7; a++)
            for (size_t i = 0; i < n[a]; i++) {
                seed = seed * 1103515245u + 12345u;
                buf[a][i] = (float)(seed >> 16 & 0x7fff) / 16384.0f - 1.0f;
            }
        if (kfac_layer_record_inputs_f32(h, 0, buf[0], 8) || kfac_layer_record_output_grads_f32(h, 0, buf[1], 8) ||
            kfac_layer_record_inputs_f32(h, 1, buf[2], 8) || kfac_layer_record_output_grads_f32(h, 1, buf[3], 8))
            fail("record", s, h);
        float *ws[] = {buf[4], buf[6]}, *bs[] = {buf[5], NULL};
        if (kfac_optimizer_step_f32(h, ws, bs, 2)) fail("step", s, h);
        if (s == 11) { /* an image taken with work pending */
            size_t size = 0;
            kfac_state_get_size(h, &size);
            image = malloc(size);
            if (kfac_state_save(h, image, size, &written)) fail("save", s, h);
        }
        if (s == 17 && kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, 1 - id % 2)) fail("strategy", s, h);
        if (s == 25 && kfac_optimizer_update_inverses(h)) fail("update_inverses", s, h);
        if (s == 31 && kfac_param_set_int(h, KFAC_PARAM_ASYNC_INVERSION, KFAC_ASYNC_INVERSION_DETERMINISTIC))
            fail("mode", s, h);
        if (s == 39 && kfac_state_load(h, image, written)) fail("load", s, h);
    }
    free(image);
    for (int a = 0; a < 7; a++) free(buf[a]);
    kfac_optimizer_free(h); /* the last step launched: free waits for the work and joins */
    return NULL;
}

int main(void) {
    void (*set_threads)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    if (set_threads) set_threads(1);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, drive, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    printf("%d handles x %d steps with background inversion: %d failures\n", THREADS, STEPS, failures);
    return failures != 0;
}
