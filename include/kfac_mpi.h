/*
 * kfac_mpi.h — libkfac_mpi, the optional Open MPI companion of libkfac (experimental, since 0.2).
 *
 * libkfac never communicates (include/kfac.h, "Distributed"): it packs what the ranks of a
 * data-parallel run must combine and unpacks the element-wise sum. This small C library does the
 * SUM-allreduces with MPI for C and C++ trainers. Build it with `make mpi` (it needs mpicc; one
 * build per MPI implementation, since MPI's ABI differs between them), link with
 * `pkg-config --libs kfac_mpi` (or -lkfac_mpi -lkfac).
 *
 * Communicators are passed in MPI's portable Fortran form, MPI_Fint (MPI_Comm_c2f(comm)), so that
 * neither kfac.h nor the handle ever holds an implementation's MPI_Comm. The library never calls
 * MPI_Init or MPI_Finalize: initialise MPI before the first call (MPI_THREAD_FUNNELED suffices if
 * these calls are made on the thread that communicates) and finalise it after the last. Every
 * call is collective: all ranks of `comm` call it with the same handle layout and parameters,
 * for the same steps, in the same order. Counts above 2^31 − 1 are sent in chunks (MPI counts are
 * int).
 *
 * Per training step, after recording the local batch's statistics and averaging the gradients
 * (MPI_Allreduce of the gradients of the union batch's mean loss — the library never reduces
 * gradients):
 *     kfac_mpi_synchronize(opt, MPI_Comm_c2f(MPI_COMM_WORLD));
 *     kfac_optimizer_step_f64(opt, grads_w, grads_b, n_layers);
 *
 * Statuses are kfac.h's, plus KFAC_MPI_ERROR_COMMUNICATION when an MPI call fails (MPI's error
 * handler must then return instead of aborting: MPI_ERRORS_RETURN on the communicator).
 */
#ifndef KFAC_MPI_H
#define KFAC_MPI_H

#ifndef KFAC_EXPERIMENTAL_API
#define KFAC_EXPERIMENTAL_API
#endif
#include "kfac.h"

#include <mpi.h>

#ifdef __cplusplus
extern "C" {
#endif

/** An MPI call failed (its error code is not kept; kfac_optimizer_last_error is not set). */
#define KFAC_MPI_ERROR_COMMUNICATION (-71)

/** Since 0.2. Makes the handle rank MPI_Comm_rank of MPI_Comm_size processes of `comm`
 *  (kfac_distributed_set_world). Collective only in that every rank must call it. Errors:
 *  NULL_POINTER, KFAC_MPI_ERROR_COMMUNICATION, and those of kfac_distributed_set_world. */
int kfac_mpi_attach(kfac_optimizer *opt, MPI_Fint comm);

/** Since 0.2. In-place SUM-allreduce of `count` values of dtype (KFAC_FLOAT32 or KFAC_FLOAT64)
 *  over `comm`, in chunks of at most 2^31 − 1 values. Errors: NULL_POINTER (buffer with
 *  count > 0), INVALID_ARGUMENT (dtype), INVALID_SIZE (count < 0), KFAC_MPI_ERROR_COMMUNICATION. */
int kfac_mpi_allreduce_sum(void *buffer, int64_t count, int32_t dtype, MPI_Fint comm);

/** Since 0.2. The exchanges the handle's next step needs (kfac_distributed_get_due), through
 *  kfac_distributed_synchronize: the statistics by kfac_mpi_allreduce_sum, then the inverses by
 *  MPI_Allgatherv of each rank's own units (no zero padding; kfac_distributed_get_inverse_layout;
 *  when a count or displacement exceeds INT_MAX, one chunked MPI_Bcast per rank instead). A rank
 *  whose inverse pack fails still takes part, its segment NaN, so that the unpack fails with
 *  NON_FINITE on every rank: the call then returns the failing rank's own error there and
 *  NON_FINITE elsewhere. Buffers are kept by the handle (OUT_OF_MEMORY on first use). Any
 *  failure, an MPI one included, leaves the handle as before the call on every rank that saw it.
 *  Errors: those of kfac_distributed_synchronize (CALLBACK never: an MPI failure is
 *  KFAC_MPI_ERROR_COMMUNICATION). */
int kfac_mpi_synchronize(kfac_optimizer *opt, MPI_Fint comm);

/** A statistics exchange in flight (kfac_mpi_statistics_start). Opaque. */
typedef struct kfac_mpi_request kfac_mpi_request;

/** Since 0.2. Starts the statistics exchange the next step needs, non-blocking: packs the
 *  statistics and starts MPI_Iallreduce on them (in chunks of at most 2^31 − 1 values), so that
 *  the caller can overlap it with other work (its gradient allreduce, say). *request receives the
 *  exchange, or NULL when none is due. Do not record statistics or step until
 *  kfac_mpi_statistics_finish; the handle is unchanged until then. Errors: NULL_POINTER, those of
 *  kfac_distributed_pack_statistics_*, OUT_OF_MEMORY, KFAC_MPI_ERROR_COMMUNICATION (nothing
 *  in flight then). */
int kfac_mpi_statistics_start(kfac_optimizer *opt, MPI_Fint comm, kfac_mpi_request **request);

/** Since 0.2. Waits for a kfac_mpi_statistics_start exchange, unpacks it and frees the request
 *  (NULL: nothing to do). Then exchange the inverses (kfac_mpi_synchronize does only what is still
 *  due) and step. Errors: those of kfac_distributed_unpack_statistics_*,
 *  KFAC_MPI_ERROR_COMMUNICATION; the request is freed and the handle unchanged on error. */
int kfac_mpi_statistics_finish(kfac_optimizer *opt, kfac_mpi_request *request);

#ifdef __cplusplus
}
#endif

#endif /* KFAC_MPI_H */
