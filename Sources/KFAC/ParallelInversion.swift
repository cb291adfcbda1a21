import CBLAS
import Dispatch

#if canImport(Glibc)
import Glibc
#endif

/// Runs `body(job, worker)` for jobs 0..<count on `threads` workers (worker in 0..<threads),
/// worker w taking jobs w, w + threads, … . With more than one worker, OpenBLAS is set to one
/// thread for the duration, so that the workers do not oversubscribe the cores; the previous
/// setting is restored afterwards.
func forEachJobInParallel(count: Int, threads: Int, _ body: (_ job: Int, _ worker: Int) -> Void) {
    let workers = Swift.max(1, Swift.min(threads, count))
    if workers == 1 {
        for job in 0..<count { body(job, 0) }
        return
    }
    let blasThreads = openblas_get_num_threads()
    openblas_set_num_threads(1)
    DispatchQueue.concurrentPerform(iterations: workers) { worker in
        var job = worker
        while job < count {
            body(job, worker)
            job += workers
        }
    }
    openblas_set_num_threads(blasThreads)
}

/// The number of online CPUs (at least 1).
func onlineProcessorCount() -> Int {
    Swift.max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
}
