// Counts heap allocations made by the whole process (all threads) between start and stop, by
// interposing malloc and friends in the executable that links this target. Used to show that a
// steady-state training step allocates nothing.
#pragma once
#include <stdint.h>

void allocation_counter_start(void);
/// Stops counting and returns the number of allocation calls since start.
int64_t allocation_counter_stop(void);
/// Of those, the allocations made with OpenBLAS on the call stack (counted until stop).
int64_t allocation_counter_openblas(void);
