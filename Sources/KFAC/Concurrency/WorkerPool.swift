import CBLAS

#if canImport(Glibc)
import Glibc
#endif

/// Work that a `WorkerPool` can run: jobs numbered 0..<count, each run once on some worker.
protocol ParallelJobs: AnyObject {
    func runJob(_ job: Int, worker: Int)
}

/// A small pool of persistent worker threads that runs `jobs.runJob(job, worker)` for jobs
/// 0..<count, the calling thread taking part as worker 0. Threads are created the first time
/// they are needed and then reused, so that a steady-state step starts no thread and allocates
/// nothing (Dispatch, and storing a closure, allocate on every call). They are joined when the
/// pool is released.
final class WorkerPool {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let finished = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var threads: [pthread_t] = []
    private var generation = 0
    private var running = 0
    private var stopping = false
    private var task: (any ParallelJobs)?
    private var jobCount = 0
    private var workerCount = 0

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
        pthread_cond_init(finished, nil)
    }

    deinit {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_broadcast(wake)
        pthread_mutex_unlock(mutex)
        for t in threads { pthread_join(t, nil) }
        pthread_mutex_destroy(mutex); pthread_cond_destroy(wake); pthread_cond_destroy(finished)
        mutex.deallocate(); wake.deallocate(); finished.deallocate()
    }

    /// Runs the jobs on `workers` threads (the caller included), worker w taking jobs
    /// w, w + workers, … . Returns when all are done.
    ///
    /// The jobs call LAPACK, so they run on several threads only while OpenBLAS itself is
    /// single-threaded (`OPENBLAS_NUM_THREADS=1`): then parallel calls neither oversubscribe the
    /// cores nor depend on how OpenBLAS arbitrates concurrent callers. Otherwise they run one
    /// after the other, each using OpenBLAS's threads. The library never changes OpenBLAS's
    /// process-wide thread setting: other handles and the caller's own BLAS calls share it.
    func run(count: Int, workers requested: Int, _ jobs: any ParallelJobs) {
        let workers = openblas_get_num_threads() == 1 ? Swift.max(1, Swift.min(requested, count)) : 1
        if workers == 1 || !startThreads(upTo: workers - 1) {
            for job in 0..<count { jobs.runJob(job, worker: 0) }
            return
        }
        pthread_mutex_lock(mutex)
        task = jobs
        jobCount = count
        workerCount = workers
        running = workers - 1
        generation += 1
        pthread_cond_broadcast(wake)
        pthread_mutex_unlock(mutex)

        var job = 0
        while job < count { jobs.runJob(job, worker: 0); job += workers }

        pthread_mutex_lock(mutex)
        while running > 0 { pthread_cond_wait(finished, mutex) }
        task = nil
        pthread_mutex_unlock(mutex)
    }

    /// Makes sure `n` helper threads exist; false if the system refused to create them.
    private func startThreads(upTo n: Int) -> Bool {
        while threads.count < n {
            let context = UnsafeMutablePointer<(Unmanaged<WorkerPool>, Int)>.allocate(capacity: 1)
            context.initialize(to: (Unmanaged.passUnretained(self), threads.count + 1))
            var thread = pthread_t()
            let status = pthread_create(&thread, nil, { raw in
                let context = raw!.assumingMemoryBound(to: (Unmanaged<WorkerPool>, Int).self)
                let (pool, index) = context.pointee
                context.deallocate()
                pool.takeUnretainedValue().serve(worker: index)
                return nil
            }, context)
            guard status == 0 else {
                context.deallocate()
                return false
            }
            threads.append(thread)
        }
        return true
    }

    /// The loop of helper thread `worker` (1-based): wait for a generation, do its share, report.
    private func serve(worker: Int) {
        var seen = 0
        pthread_mutex_lock(mutex)
        while true {
            while generation == seen && !stopping { pthread_cond_wait(wake, mutex) }
            if stopping { break }
            seen = generation
            guard worker < workerCount, let jobs = task else { continue }
            let (count, stride) = (jobCount, workerCount)
            pthread_mutex_unlock(mutex)
            var job = worker
            while job < count { jobs.runJob(job, worker: worker); job += stride }
            pthread_mutex_lock(mutex)
            running -= 1
            if running == 0 { pthread_cond_signal(finished) }
        }
        pthread_mutex_unlock(mutex)
    }
}

/// The number of online CPUs (at least 1).
func onlineProcessorCount() -> Int {
    Swift.max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
}
