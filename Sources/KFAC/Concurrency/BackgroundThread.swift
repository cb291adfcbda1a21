#if canImport(Glibc)
import Glibc
#endif

/// One persistent library thread that runs `body(context)` while the caller goes on (the
/// asynchronous inversions of `KFAC_PARAM_ASYNC_INVERSION`). The thread is created at the first
/// launch and reused, so a steady-state launch starts no thread and allocates nothing.
///
/// The thread holds no reference to its owner: the context is an unretained pointer (the body
/// borrows the owner from it without retaining it), and the owner waits
/// for it (`wait`) before it goes away, so that its deinit — which joins the thread — can never
/// run on the thread itself. Everything the work wrote is visible to the owner after `wait`
/// or after `isRunning` returned false (both take the mutex the thread released).
final class BackgroundThread {
    private struct Shared {
        var mutex = pthread_mutex_t()
        var changed = pthread_cond_t()
        var launched = false
        var running = false
        var stopping = false
        var context: UnsafeMutableRawPointer?
        var body: (UnsafeMutableRawPointer) -> Void
    }

    private let shared: UnsafeMutablePointer<Shared>
    private var thread: pthread_t?

    /// `body` runs on the thread with the context of each launch; it must not retain what the
    /// context points to (see `Unmanaged._withUnsafeGuaranteedRef`).
    init(body: @escaping (UnsafeMutableRawPointer) -> Void) {
        shared = .allocate(capacity: 1)
        shared.initialize(to: Shared(body: body))
        pthread_mutex_init(&shared.pointee.mutex, nil)
        pthread_cond_init(&shared.pointee.changed, nil)
    }

    deinit {
        wait()
        if let thread {
            pthread_mutex_lock(&shared.pointee.mutex)
            shared.pointee.stopping = true
            pthread_cond_broadcast(&shared.pointee.changed)
            pthread_mutex_unlock(&shared.pointee.mutex)
            pthread_join(thread, nil)
        }
        pthread_mutex_destroy(&shared.pointee.mutex)
        pthread_cond_destroy(&shared.pointee.changed)
        shared.deinitialize(count: 1)
        shared.deallocate()
    }

    /// Starts `body(context)` on the thread; false (nothing started) if the system refused to
    /// create the thread, and then the caller runs the work itself. Must not be called while
    /// running.
    func launch(_ context: UnsafeMutableRawPointer) -> Bool {
        guard startThread() else { return false }
        pthread_mutex_lock(&shared.pointee.mutex)
        shared.pointee.context = context
        shared.pointee.launched = true
        shared.pointee.running = true
        pthread_cond_broadcast(&shared.pointee.changed)
        pthread_mutex_unlock(&shared.pointee.mutex)
        return true
    }

    /// Whether launched work has not finished yet (does not wait).
    var isRunning: Bool {
        pthread_mutex_lock(&shared.pointee.mutex)
        defer { pthread_mutex_unlock(&shared.pointee.mutex) }
        return shared.pointee.running
    }

    /// Returns once no work is running.
    func wait() {
        pthread_mutex_lock(&shared.pointee.mutex)
        while shared.pointee.running { pthread_cond_wait(&shared.pointee.changed, &shared.pointee.mutex) }
        pthread_mutex_unlock(&shared.pointee.mutex)
    }

    private func startThread() -> Bool {
        if thread != nil { return true }
        var t = pthread_t()
        let status = pthread_create(&t, nil, { raw in
            BackgroundThread.serve(raw!.assumingMemoryBound(to: Shared.self))
            return nil
        }, UnsafeMutableRawPointer(shared))
        guard status == 0 else { return false }
        thread = t
        return true
    }

    /// The thread's loop: wait for a launch, run it, report. Touches only the shared state,
    /// which outlives the thread.
    private static func serve(_ shared: UnsafeMutablePointer<Shared>) {
        pthread_mutex_lock(&shared.pointee.mutex)
        while true {
            while !shared.pointee.launched && !shared.pointee.stopping {
                pthread_cond_wait(&shared.pointee.changed, &shared.pointee.mutex)
            }
            if shared.pointee.stopping { break }
            shared.pointee.launched = false
            let (context, body) = (shared.pointee.context, shared.pointee.body)
            pthread_mutex_unlock(&shared.pointee.mutex)
            if let context { body(context) }
            pthread_mutex_lock(&shared.pointee.mutex)
            shared.pointee.context = nil
            shared.pointee.running = false
            pthread_cond_broadcast(&shared.pointee.changed)
        }
        pthread_mutex_unlock(&shared.pointee.mutex)
    }
}
