/*
 * kfac_mpi.c — libkfac_mpi (include/kfac_mpi.h): SUM-allreduces of libkfac's packed statistics
 * and inverses over an MPI communicator. Plain C; MPI_Init/MPI_Finalize are the caller's.
 */
#include "kfac_mpi.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int kfac_mpi_attach(kfac_optimizer *opt, MPI_Fint comm) {
    if (!opt) return KFAC_ERROR_NULL_POINTER;
    MPI_Comm c = MPI_Comm_f2c(comm);
    int rank = 0, size = 1;
    if (MPI_Comm_rank(c, &rank) != MPI_SUCCESS || MPI_Comm_size(c, &size) != MPI_SUCCESS)
        return KFAC_MPI_ERROR_COMMUNICATION;
    return kfac_distributed_set_world(opt, rank, size);
}

int kfac_mpi_allreduce_sum(void *buffer, int64_t count, int32_t dtype, MPI_Fint comm) {
    if (count < 0) return KFAC_ERROR_INVALID_SIZE;
    if (dtype != KFAC_FLOAT32 && dtype != KFAC_FLOAT64) return KFAC_ERROR_INVALID_ARGUMENT;
    if (count == 0) return KFAC_OK;
    if (!buffer) return KFAC_ERROR_NULL_POINTER;
    MPI_Comm c = MPI_Comm_f2c(comm);
    MPI_Datatype type = dtype == KFAC_FLOAT32 ? MPI_FLOAT : MPI_DOUBLE;
    size_t width = dtype == KFAC_FLOAT32 ? sizeof(float) : sizeof(double);
    for (int64_t done = 0; done < count;) {
        int64_t n = count - done > INT_MAX ? INT_MAX : count - done;
        if (MPI_Allreduce(MPI_IN_PLACE, (char *)buffer + (size_t)done * width, (int)n, type, MPI_SUM, c) != MPI_SUCCESS)
            return KFAC_MPI_ERROR_COMMUNICATION;
        done += n;
    }
    return KFAC_OK;
}

/* kfac_distributed_synchronize's collectives over one communicator; `failed` tells an MPI
 * failure (returned as KFAC_MPI_ERROR_COMMUNICATION) from the library's own errors. */
typedef struct {
    MPI_Fint comm;
    int failed;
} mpi_collectives;

static int allreduce_f32(float *buffer, int64_t count, void *user) {
    mpi_collectives *m = user;
    m->failed = kfac_mpi_allreduce_sum(buffer, count, KFAC_FLOAT32, m->comm) != KFAC_OK;
    return m->failed;
}

static int allreduce_f64(double *buffer, int64_t count, void *user) {
    mpi_collectives *m = user;
    m->failed = kfac_mpi_allreduce_sum(buffer, count, KFAC_FLOAT64, m->comm) != KFAC_OK;
    return m->failed;
}

/* MPI_Allgatherv when every count and displacement fits an int; else each rank's segment is
 * broadcast from its owner in chunks of at most 2^31 − 1 values. */
static int allgatherv(const void *send, void *receive, const int64_t *counts, const int64_t *displacements,
                      MPI_Datatype type, size_t width, mpi_collectives *m) {
    MPI_Comm c = MPI_Comm_f2c(m->comm);
    int rank = 0, size = 1;
    if (MPI_Comm_rank(c, &rank) != MPI_SUCCESS || MPI_Comm_size(c, &size) != MPI_SUCCESS) return m->failed = 1;
    int fits = displacements[size - 1] + counts[size - 1] <= INT_MAX;
    int *ic = fits ? malloc((size_t)size * sizeof(int)) : NULL, *id = fits ? malloc((size_t)size * sizeof(int)) : NULL;
    if (fits && ic && id) {
        for (int r = 0; r < size; r++) { ic[r] = (int)counts[r]; id[r] = (int)displacements[r]; }
        /* The own segment is already in place in a copy made by MPI (not MPI_IN_PLACE: send is
         * a separate buffer). */
        m->failed = MPI_Allgatherv(send, ic[rank], type, receive, ic, id, type, c) != MPI_SUCCESS;
    } else {
        memcpy((char *)receive + (size_t)displacements[rank] * width, send, (size_t)counts[rank] * width);
        m->failed = 0;
        for (int r = 0; r < size && !m->failed; r++)
            for (int64_t done = 0; done < counts[r] && !m->failed;) {
                int64_t n = counts[r] - done > INT_MAX ? INT_MAX : counts[r] - done;
                m->failed = MPI_Bcast((char *)receive + (size_t)(displacements[r] + done) * width, (int)n, type, r, c) !=
                            MPI_SUCCESS;
                done += n;
            }
    }
    free(ic);
    free(id);
    return m->failed;
}

static int allgatherv_f32(const float *send, float *receive, const int64_t *counts, const int64_t *displacements,
                          void *user) {
    return allgatherv(send, receive, counts, displacements, MPI_FLOAT, sizeof(float), user);
}

static int allgatherv_f64(const double *send, double *receive, const int64_t *counts, const int64_t *displacements,
                          void *user) {
    return allgatherv(send, receive, counts, displacements, MPI_DOUBLE, sizeof(double), user);
}

int kfac_mpi_synchronize(kfac_optimizer *opt, MPI_Fint comm) {
    if (!opt) return KFAC_ERROR_NULL_POINTER;
    mpi_collectives m = {comm, 0};
    kfac_collectives c = {sizeof(kfac_collectives), &m, allreduce_f32, allreduce_f64, allgatherv_f32, allgatherv_f64};
    int s = kfac_distributed_synchronize(opt, &c);
    return s == KFAC_ERROR_CALLBACK && m.failed ? KFAC_MPI_ERROR_COMMUNICATION : s;
}

struct kfac_mpi_request {
    void *buffer;
    int64_t count;
    int32_t dtype;
    int n_requests;
    MPI_Request *requests;
};

static void free_request(kfac_mpi_request *r) {
    if (!r) return;
    free(r->buffer);
    free(r->requests);
    free(r);
}

int kfac_mpi_statistics_start(kfac_optimizer *opt, MPI_Fint comm, kfac_mpi_request **request) {
    if (!opt || !request) return KFAC_ERROR_NULL_POINTER;
    *request = NULL;
    int32_t dtype = 0, due = 0;
    int s = kfac_optimizer_get_dtype(opt, &dtype);
    if (!s) s = kfac_distributed_get_due(opt, KFAC_DISTRIBUTED_STATISTICS, &due);
    if (s || !due) return s;
    int64_t n = 0;
    if ((s = kfac_distributed_get_count(opt, KFAC_DISTRIBUTED_STATISTICS, &n))) return s;
    size_t width = dtype == KFAC_FLOAT32 ? sizeof(float) : sizeof(double);
    int chunks = (int)((n + INT_MAX - 1) / INT_MAX);
    kfac_mpi_request *r = calloc(1, sizeof *r);
    if (r) {
        r->buffer = malloc((size_t)(n > 0 ? n : 1) * width);
        r->requests = malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(MPI_Request));
    }
    if (!r || !r->buffer || !r->requests) {
        free_request(r);
        return KFAC_ERROR_OUT_OF_MEMORY;
    }
    r->count = n;
    r->dtype = dtype;
    s = dtype == KFAC_FLOAT32 ? kfac_distributed_pack_statistics_f32(opt, r->buffer, n)
                              : kfac_distributed_pack_statistics_f64(opt, r->buffer, n);
    if (s) {
        free_request(r);
        return s;
    }
    MPI_Comm c = MPI_Comm_f2c(comm);
    MPI_Datatype type = dtype == KFAC_FLOAT32 ? MPI_FLOAT : MPI_DOUBLE;
    for (int64_t done = 0; done < n; r->n_requests++) {
        int64_t k = n - done > INT_MAX ? INT_MAX : n - done;
        if (MPI_Iallreduce(MPI_IN_PLACE, (char *)r->buffer + (size_t)done * width, (int)k, type, MPI_SUM, c,
                           &r->requests[r->n_requests]) != MPI_SUCCESS) {
            MPI_Waitall(r->n_requests, r->requests, MPI_STATUSES_IGNORE);
            free_request(r);
            return KFAC_MPI_ERROR_COMMUNICATION;
        }
        done += k;
    }
    *request = r;
    return KFAC_OK;
}

int kfac_mpi_statistics_finish(kfac_optimizer *opt, kfac_mpi_request *request) {
    if (!request) return KFAC_OK;
    if (!opt) {
        free_request(request);
        return KFAC_ERROR_NULL_POINTER;
    }
    int s = MPI_Waitall(request->n_requests, request->requests, MPI_STATUSES_IGNORE) == MPI_SUCCESS
                ? KFAC_OK : KFAC_MPI_ERROR_COMMUNICATION;
    if (!s)
        s = request->dtype == KFAC_FLOAT32
                ? kfac_distributed_unpack_statistics_f32(opt, request->buffer, request->count)
                : kfac_distributed_unpack_statistics_f64(opt, request->buffer, request->count);
    free_request(request);
    return s;
}
