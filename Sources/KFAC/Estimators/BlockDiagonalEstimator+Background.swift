/// Background inversion (`KFAC_PARAM_ASYNC_INVERSION`): a due step copies the running factors of
/// the blocks it re-inverts into snapshots the estimator owns and launches their inversion on
/// the background thread, into the blocks' staging inverses; a later step commits them.
///
/// While work is pending the caller's thread touches neither the snapshots, nor the staging
/// inverses of the pending blocks, nor the job bookkeeping and the worker pool: steps that
/// invert nothing read the committed inverses and fold into the running factors, and anything
/// that inverts synchronously (`stageInverses`) first waits for the background thread.
extension BlockDiagonalEstimator {
    /// The background thread's work: the launched jobs into the staging inverses.
    func runBackgroundWork() {
        do throws(KFACError) {
            try runInversionJobs(strategy: backgroundStrategy, target: .staging, threadCount: backgroundThreadCount,
                                 selected: backgroundBlock)
            backgroundError = nil
        } catch {
            backgroundError = error
        }
    }
}

extension BlockDiagonalEstimator {
    /// Whether pending background work has finished (does not wait).
    var backgroundFinished: Bool { backgroundPending && !background.isRunning }

    /// Waits until no background work runs (pending work stays pending).
    func waitForBackground() { background.wait() }

    /// Waits for pending work and drops it: its blocks keep their committed inverses. Cannot fail.
    func discardBackground() {
        background.wait()
        backgroundPending = false
        for k in backgroundBlock.indices { backgroundBlock[k] = false }
    }

    /// Whether block `k` belongs to pending work that finished with an error (only meaningful
    /// once the caller has waited for it).
    func backgroundFailed(block k: Int) -> Bool {
        backgroundPending && backgroundError != nil && backgroundBlock[k]
    }

    /// After `planInversions`: marks the blocks whose finished background inverse the step
    /// commits (`consumeBlock`: pending work the caller waited for, `joined`, that succeeded
    /// with the step's strategy, for blocks the step does not invert itself) and, when
    /// `launching`, the blocks it hands to the background (`launchBlock`: every block with an
    /// inverse for the strategy that the step does not invert itself). Returns whether any
    /// block is launched.
    func planBackground(joined: Bool, launching: Bool, strategy: InverseStrategy) -> Bool {
        let consuming = joined && backgroundPending && backgroundError == nil && backgroundStrategy == strategy
        var any = false
        for k in blocks.indices {
            consumeBlock[k] = consuming && backgroundBlock[k] && !invertBlock[k]
            launchBlock[k] = launching && !invertBlock[k] && !isExcluded(blockLayer[k]) && blocks[k].hasInverse(for: strategy)
            any = any || launchBlock[k]
        }
        return any
    }

    /// Whether the step preconditions block `k` with its staging inverse: one it inverts
    /// itself or one it commits from the background.
    func usesStagedInverse(_ k: Int) -> Bool { invertBlock[k] || consumeBlock[k] }

    /// Before a launch (in the step's fallible part): the snapshots, staging inverses and
    /// workspaces of the blocks in `launchBlock`; allocates only the first time.
    func reserveBackground(strategy: InverseStrategy, threadCount: Int) throws(KFACError) {
        var jobs = 0
        for k in blocks.indices where launchBlock[k] {
            let c = blocks[k]
            if snapshots[k] == nil {
                snapshots[k] = (try AlignedBuffer(rows: 1, columns: c.input.running.count),
                                try AlignedBuffer(rows: 1, columns: c.output.running.count))
            }
            _ = try c.stagingInverse(for: strategy)
            jobs += c.input.structure.uniqueSizes.count + c.output.structure.uniqueSizes.count
        }
        try reserveWorkspaces(threadCount: threadCount, jobCount: jobs)
    }

    /// Commits what the step consumed (nothing here can fail): the finished background
    /// inverses of `consumeBlock`; work the caller waited for is settled either way.
    func commitBackground(joined: Bool) {
        for k in blocks.indices where consumeBlock[k] { blocks[k].commitStagedInverse() }
        if joined { discardBackground() }
    }

    /// Snapshots the running factors of the blocks in `launchBlock` (after the step's fold),
    /// forms their damping with λ = `damping` and the current π, and starts their inversion on
    /// the background thread (or runs it here if the thread cannot be created). Needs
    /// `reserveBackground`; allocates nothing after it; cannot fail (an inversion error is
    /// kept for the step that commits the work).
    func launchBackground(settings: CurvatureSettings, damping: Double) {
        let strategy = settings.strategy
        inversionJobs.removeAll(keepingCapacity: true)
        for k in blocks.indices {
            backgroundBlock[k] = launchBlock[k]
            guard launchBlock[k], let snapshot = snapshots[k] else { continue }
            let c = blocks[k]
            snapshot.a.copyContents(from: c.input.running)
            snapshot.g.copyContents(from: c.output.running)
            jobSources[k].a = snapshot.a
            jobSources[k].g = snapshot.g
            switch c.damping(strategy, lambda: damping, piDamping: settings.piDamping, a: snapshot.a.base, g: snapshot.g.base) {
            case .factored(let inputShift, let outputShift):
                (jobSources[k].inputShift, jobSources[k].outputShift) = (inputShift, outputShift)
            case .exact:
                (jobSources[k].inputShift, jobSources[k].outputShift) = (0, 0)
            }
            for q in c.input.structure.uniqueSizes.indices {
                inversionJobs.append(InversionJob(block: k, side: .input, unique: q, size: c.input.structure.uniqueSizes[q]))
            }
            for q in c.output.structure.uniqueSizes.indices {
                inversionJobs.append(InversionJob(block: k, side: .output, unique: q, size: c.output.structure.uniqueSizes[q]))
            }
        }
        backgroundStrategy = strategy
        // One thread fewer than a synchronous inversion (at least one): the caller's step runs
        // beside the background work, and on a machine whose cores the step already uses, a
        // background on every core slowed the steps after the launch (probe: 1.5× the median).
        let threads = settings.threadCount == 0 ? onlineProcessorCount() : settings.threadCount
        backgroundThreadCount = max(1, threads - 1)
        backgroundError = nil
        backgroundPending = true
        inversionStrategy = strategy
        inversionTarget = .staging
        if !background.launch(Unmanaged.passUnretained(self).toOpaque()) { runBackgroundWork() }
    }
}
