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
    /// What the helper threads share with the pool. It lives in memory the pool allocates and
    /// frees (not in the pool object), so that a helper thread holds no reference to the pool:
    /// a thread that retained the pool while it waits would keep it alive forever, and the
    /// pool's deinit — which stops and joins the threads — would never run.
    private struct Shared {
        var mutex = pthread_mutex_t()
        var wake = pthread_cond_t()
        var finished = pthread_cond_t()
        var generation = 0
        var running = 0
        var stopping = false
        var task: (any ParallelJobs)?
        var jobCount = 0
        var workerCount = 0
    }

    private let shared: UnsafeMutablePointer<Shared>
    private var threads: [pthread_t] = []

    init() {
        shared = .allocate(capacity: 1)
        shared.initialize(to: Shared())
        pthread_mutex_init(&shared.pointee.mutex, nil)
        pthread_cond_init(&shared.pointee.wake, nil)
        pthread_cond_init(&shared.pointee.finished, nil)
    }

    deinit {
        pthread_mutex_lock(&shared.pointee.mutex)
        shared.pointee.stopping = true
        pthread_cond_broadcast(&shared.pointee.wake)
        pthread_mutex_unlock(&shared.pointee.mutex)
        for t in threads { pthread_join(t, nil) }
        pthread_mutex_destroy(&shared.pointee.mutex)
        pthread_cond_destroy(&shared.pointee.wake)
        pthread_cond_destroy(&shared.pointee.finished)
        shared.deinitialize(count: 1)
        shared.deallocate()
    }

    /// The number of helper threads started so far (tests).
    var threadCount: Int { threads.count }

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
        pthread_mutex_lock(&shared.pointee.mutex)
        shared.pointee.task = jobs
        shared.pointee.jobCount = count
        shared.pointee.workerCount = workers
        shared.pointee.running = workers - 1
        shared.pointee.generation += 1
        pthread_cond_broadcast(&shared.pointee.wake)
        pthread_mutex_unlock(&shared.pointee.mutex)

        var job = 0
        while job < count { jobs.runJob(job, worker: 0); job += workers }

        pthread_mutex_lock(&shared.pointee.mutex)
        while shared.pointee.running > 0 { pthread_cond_wait(&shared.pointee.finished, &shared.pointee.mutex) }
        shared.pointee.task = nil
        pthread_mutex_unlock(&shared.pointee.mutex)
    }

    /// Makes sure `n` helper threads exist; false if the system refused to create them.
    private func startThreads(upTo n: Int) -> Bool {
        while threads.count < n {
            let context = UnsafeMutablePointer<(UnsafeMutablePointer<Shared>, Int)>.allocate(capacity: 1)
            context.initialize(to: (shared, threads.count + 1))
            var thread = pthread_t()
            let status = pthread_create(&thread, nil, { raw in
                let context = raw!.assumingMemoryBound(to: (UnsafeMutablePointer<WorkerPool.Shared>, Int).self)
                let (shared, index) = context.pointee
                context.deallocate()
                WorkerPool.serve(shared, worker: index)
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
    /// Holds no reference to the pool, only to the shared state, which outlives the thread.
    private static func serve(_ shared: UnsafeMutablePointer<Shared>, worker: Int) {
        var seen = 0
        pthread_mutex_lock(&shared.pointee.mutex)
        while true {
            while shared.pointee.generation == seen && !shared.pointee.stopping {
                pthread_cond_wait(&shared.pointee.wake, &shared.pointee.mutex)
            }
            if shared.pointee.stopping { break }
            seen = shared.pointee.generation
            guard worker < shared.pointee.workerCount, let jobs = shared.pointee.task else { continue }
            let (count, stride) = (shared.pointee.jobCount, shared.pointee.workerCount)
            pthread_mutex_unlock(&shared.pointee.mutex)
            var job = worker
            while job < count { jobs.runJob(job, worker: worker); job += stride }
            pthread_mutex_lock(&shared.pointee.mutex)
            shared.pointee.running -= 1
            if shared.pointee.running == 0 { pthread_cond_signal(&shared.pointee.finished) }
        }
        pthread_mutex_unlock(&shared.pointee.mutex)
    }
}

/// The number of online CPUs (at least 1).
func onlineProcessorCount() -> Int {
    Swift.max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
}
