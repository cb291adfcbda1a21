/*
 * test_state.c — state images and files on twin handles: NULL pointers, small buffers,
 * damaged images, images of other handles, unwritable paths, atomic files, round trips.
 */
#include "harness.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

/* Writes `size` bytes to a new file. */
static int write_file(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fwrite(data, 1, size, f) == size;
    return fclose(f) == 0 && ok;
}

/* Number of entries in a directory, "." and ".." excluded. */
static int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

/* State images and files. */
void errors_state(twins_t *tp, const char *tmpdir) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype;
    char what[256], path[512], why[512] = "";
    section(dt == KFAC_FLOAT32 ? "float32 handle: state images and files"
                               : "float64 handle: state images and files");

    size_t size = 0, written = 0;
    BAD_NO_ROUND(kfac_state_get_size(B, NULL), KFAC_ERROR_NULL_POINTER, "kfac_state_get_size(size = NULL)");
    unsigned char *img = save_image(B, &size);
    if (!img) return;
    check(size > 16, "[%s] state image of %zu bytes", dtype_tag(dt), size);
    check(memcmp(img, "KFACSTAT", 8) == 0, "[%s] image starts with the magic \"KFACSTAT\"",
          dtype_tag(dt));

    /* kfac_state_save */
    unsigned char *out = malloc(size + 16);
    memset(out, 0xA5, size + 16);
    unsigned char *pattern = malloc(size + 16);
    memset(pattern, 0xA5, size + 16);
    BAD(kfac_state_save(B, NULL, size, &written), KFAC_ERROR_NULL_POINTER,
        "kfac_state_save(buffer = NULL)");
    BAD(kfac_state_save(B, out, size, NULL), KFAC_ERROR_NULL_POINTER,
        "kfac_state_save(written = NULL)");
    free(img);
    img = save_image(B, &size); /* the rounds changed the state */
    if (!img) return;
    out = realloc(out, size + 16);
    pattern = realloc(pattern, size + 16);
    memset(out, 0xA5, size + 16);
    memset(pattern, 0xA5, size + 16);
    int st = bad_call(B, kfac_state_save(B, out, size - 1, &written));
    after_bad(&t, st, KFAC_ERROR_BUFFER_TOO_SMALL, "kfac_state_save(capacity = size - 1)", 0,
              memcmp(out, pattern, size + 16) == 0);
    st = bad_call(B, kfac_state_save(B, out, 0, &written));
    after_bad(&t, st, KFAC_ERROR_BUFFER_TOO_SMALL, "kfac_state_save(capacity = 0)", 0,
              memcmp(out, pattern, size + 16) == 0);
    st = kfac_state_save(B, out, size + 16, &written);
    check(st == KFAC_OK && written == size && memcmp(out, img, size) == 0 &&
              memcmp(out + size, pattern, 16) == 0,
          "[%s] kfac_state_save with a larger buffer writes exactly the image (%zu bytes)",
          dtype_tag(dt), written);

    /* kfac_state_load: damaged images. */
    BAD(kfac_state_load(B, NULL, size), KFAC_ERROR_NULL_POINTER, "kfac_state_load(buffer = NULL)");
    unsigned char *bad = malloc(size + 1);
    const struct {
        size_t len;
        long flip; /* index of a byte to flip, -1 for none */
        const char *what;
    } damaged[] = {
        {0, -1, "empty image (size 0)"},
        {8, -1, "magic only"},
        {size / 2, -1, "first half of the image"},
        {size - 1, -1, "truncated by one byte"},
        {size + 1, -1, "one trailing byte"},
        {size, 0, "first magic byte flipped"},
        {size, (long)(size / 2), "a byte in the middle flipped"},
        {size, (long)(size - 1), "last checksum byte flipped"},
        {size, (long)(size - 9), "last payload byte flipped"},
    };
    for (size_t i = 0; i < sizeof damaged / sizeof damaged[0]; i++) {
        memcpy(bad, img, size);
        bad[size] = 0;
        if (damaged[i].flip >= 0) bad[damaged[i].flip] ^= 0x5A;
        snprintf(what, sizeof what, "kfac_state_load(%s)", damaged[i].what);
        BAD(kfac_state_load(B, bad, damaged[i].len), KFAC_ERROR_CORRUPT_STATE, what);
    }

    /* Images of other handles: different layers, different precision. */
    const model_t others[] = {
        {1, {{5, 4, 1, NULL}}},                                   /* fewer layers */
        {3, {{5, 4, 1, NULL}, {4, 3, 0, NULL}, {3, 2, 1, NULL}}}, /* more layers */
        {2, {{5, 4, 0, NULL}, {4, 3, 0, NULL}}},                  /* a bias differs */
        {2, {{5, 4, 1, NULL}, {4, 2, 0, NULL}}},                  /* a size differs */
        {2, {{6, 4, 1, NULL}, {4, 3, 0, NULL}}},                  /* an input size differs */
    };
    const char *other_names[] = {"fewer layers", "more layers", "layer 0 without bias",
                                 "layer 1 with 2 outputs", "layer 0 with 6 inputs"};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        kfac_optimizer *o = make_handle(dt, &others[i]);
        size_t osize;
        unsigned char *oimg = save_image(o, &osize);
        snprintf(what, sizeof what, "kfac_state_load(image of a handle with %s)", other_names[i]);
        if (oimg) BAD(kfac_state_load(B, oimg, osize), KFAC_ERROR_STATE_MISMATCH, what);
        free(oimg);
        kfac_optimizer_free(o);
    }
    {
        kfac_optimizer *o = make_handle(other_dtype(dt), &t.model);
        size_t osize;
        unsigned char *oimg = save_image(o, &osize);
        snprintf(what, sizeof what, "kfac_state_load(image of a %s handle, same layers)",
                 dtype_tag(other_dtype(dt)));
        if (oimg) BAD(kfac_state_load(B, oimg, osize), KFAC_ERROR_STATE_MISMATCH, what);
        free(oimg);
        kfac_optimizer_free(o);
    }

    /* Files. */
    BAD(kfac_state_save_file(B, NULL), KFAC_ERROR_NULL_POINTER, "kfac_state_save_file(path = NULL)");
    BAD(kfac_state_load_file(B, NULL), KFAC_ERROR_NULL_POINTER, "kfac_state_load_file(path = NULL)");
    BAD(kfac_state_save_file(B, "/nonexistent-kfac-dir/sub/state.bin"), KFAC_ERROR_IO,
        "kfac_state_save_file(path in a missing directory)");
    BAD(kfac_state_save_file(B, "/proc/kfac-state.bin"), KFAC_ERROR_IO,
        "kfac_state_save_file(path in /proc, unwritable even for root)");
    snprintf(path, sizeof path, "%s/adir", tmpdir);
    mkdir(path, 0700);
    st = bad_call(B, kfac_state_save_file(B, path));
    struct stat sb;
    after_bad(&t, st, KFAC_ERROR_IO, "kfac_state_save_file(path is a directory); no temp file left",
              1, stat(path, &sb) == 0 && S_ISDIR(sb.st_mode) && count_entries(tmpdir) == 1);
    rmdir(path);

    snprintf(path, sizeof path, "%s/missing.bin", tmpdir);
    BAD(kfac_state_load_file(B, path), KFAC_ERROR_IO, "kfac_state_load_file(missing file)");
    BAD(kfac_state_load_file(B, tmpdir), KFAC_ERROR_IO, "kfac_state_load_file(a directory)");
    snprintf(path, sizeof path, "%s/empty.bin", tmpdir);
    write_file(path, "", 0);
    BAD(kfac_state_load_file(B, path), KFAC_ERROR_CORRUPT_STATE, "kfac_state_load_file(empty file)");
    unlink(path);
    free(img);
    img = save_image(B, &size);
    if (!img) return;
    snprintf(path, sizeof path, "%s/truncated.bin", tmpdir);
    write_file(path, img, size - 3);
    BAD(kfac_state_load_file(B, path), KFAC_ERROR_CORRUPT_STATE,
        "kfac_state_load_file(truncated image)");
    unlink(path);
    snprintf(path, sizeof path, "%s/garbage.bin", tmpdir);
    write_file(path, pattern, size);
    BAD(kfac_state_load_file(B, path), KFAC_ERROR_CORRUPT_STATE,
        "kfac_state_load_file(garbage of the right size)");
    unlink(path);

    /* Valid round trips: save the good twin, restore into a fresh handle (and into the bad twin
     * itself), then all three must produce identical directions. */
    snprintf(path, sizeof path, "%s/state.bin", tmpdir);
    st = kfac_state_save_file(t.h[0], path);
    check(st == KFAC_OK && count_entries(tmpdir) == 1,
          "[%s] kfac_state_save_file to a new path succeeds, no temp file left", dtype_tag(dt));
    st = kfac_state_save_file(t.h[0], path);
    check(st == KFAC_OK && count_entries(tmpdir) == 1,
          "[%s] kfac_state_save_file over an existing file succeeds", dtype_tag(dt));
    kfac_optimizer *fresh = make_handle(dt, &t.model);
    REQUIRE_OK(fresh, kfac_param_set_double(fresh, KFAC_PARAM_DAMPING, 0.5)); /* replaced by load */
    st = kfac_state_load_file(fresh, path);
    check(st == KFAC_OK && same_state(t.h[0], fresh),
          "[%s] kfac_state_load_file into a fresh handle reproduces the state image", dtype_tag(dt));
    double damping = 0;
    kfac_param_get_double(fresh, KFAC_PARAM_DAMPING, &damping);
    check(damping == 1e-3, "[%s] loading replaced the fresh handle's parameters (damping %g)",
          dtype_tag(dt), damping);
    free(img);
    img = save_image(t.h[0], &size);
    check(img && kfac_state_load(B, img, size) == KFAC_OK && same_state(t.h[0], B),
          "[%s] kfac_state_load of the twin's (identical) image", dtype_tag(dt));
    t.h[2] = fresh;
    t.n = 3;
    for (int r = 0; r < 12; r++) {
        if (!twins_round(&t, why, sizeof why)) break;
    }
    check(why[0] == '\0', "[%s] restored handle: 12 further rounds bitwise identical to the "
                          "original%s%s", dtype_tag(dt), why[0] ? ": " : "", why);
    kfac_optimizer_free(fresh);
    t.h[2] = NULL;
    t.n = 2;
    unlink(path);

    free(bad);
    free(img);
    free(out);
    free(pattern);
    *tp = t;
}
