// LAPACKE, the C interface to LAPACK (Debian: liblapacke-dev). Only the *_work variants are
// used, so the library never lets LAPACKE allocate workspace behind its back.
#include <lapacke.h>
