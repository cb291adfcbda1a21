/// A link between dense layer `lower` and dense layer `lower + 1` (which consumes `lower`'s
/// activation): its cross factors A_{l,l+1} ((i_l+1)×(i_{l+1}+1) with biases) and G_{l,l+1}
/// (o_l×o_{l+1}).
final class TridiagonalLink<Scalar: KFACScalar> {
    let lower: Int
    var upper: Int { lower + 1 }
    let inputs: CrossFactor<Scalar>
    let gradients: CrossFactor<Scalar>

    init(lower: Int, lowerLayer: LayerDescription, upperLayer: LayerDescription) throws(KFACError) {
        self.lower = lower
        inputs = try CrossFactor(lowerWidth: lowerLayer.inputFactorDimension, upperWidth: upperLayer.inputFactorDimension)
        gradients = try CrossFactor(lowerWidth: lowerLayer.outputFactorDimension, upperWidth: upperLayer.outputFactorDimension)
    }
}

/// What the block-tridiagonal inverse keeps for one linked layer l (a = input factor dimension,
/// o = output dimension; ua, uo those of layer l + 1 when l links up):
/// - the damped diagonal factors Ā = A + π√λ I, Ḡ = G + √λ/π I (full symmetric) and their
///   inverses;
/// - with an upper link: Ψ^A = A_{l,l+1} Ā_{l+1}⁻¹ (a×ua), Ψ^G = G_{l,l+1} Ḡ_{l+1}⁻¹ (o×uo),
///   C = Ψ^A Ā_{l+1} Ψ^Aᵀ = A_{l,l+1} Ā_{l+1}⁻¹ A_{l,l+1}ᵀ, D likewise, and the eq. 8 inverse of
///   Σ_{l|l+1} = Ā ⊗ Ḡ − C ⊗ D.
final class TridiagonalLayerInverse<Scalar: KFACScalar> {
    let dampedA, dampedG, inverseA, inverseG: AlignedBuffer<Scalar>
    let psiA, psiG, crossA, crossG: AlignedBuffer<Scalar>?
    let sigma: KroneckerPairInverse<Scalar>?

    init(a: Int, o: Int, upper: (a: Int, o: Int)?) throws(KFACError) {
        dampedA = try AlignedBuffer(rows: a, columns: a)
        dampedG = try AlignedBuffer(rows: o, columns: o)
        inverseA = try AlignedBuffer(rows: a, columns: a)
        inverseG = try AlignedBuffer(rows: o, columns: o)
        if let u = upper {
            psiA = try AlignedBuffer(rows: a, columns: u.a)
            psiG = try AlignedBuffer(rows: o, columns: u.o)
            crossA = try AlignedBuffer(rows: a, columns: a)
            crossG = try AlignedBuffer(rows: o, columns: o)
            sigma = try KroneckerPairInverse(inputDimension: a, outputDimension: o)
        } else {
            (psiA, psiG, crossA, crossG, sigma) = (nil, nil, nil, nil, nil)
        }
    }

    /// Every buffer, in state-image order.
    var buffers: [AlignedBuffer<Scalar>] {
        [dampedA, dampedG, inverseA, inverseG] + [psiA, psiG, crossA, crossG].compactMap { $0 } + (sigma?.buffers ?? [])
    }

    /// What an inversion leaves (checked on load, issue 15): every value finite; the damped
    /// factors and their inverses symmetric (they are symmetrized) with positive diagonals
    /// (positive definite); C and D symmetric; Σ's scale grid 1 / (1 − s·t) positive.
    var isValid: Bool {
        for b in buffers where !Scalar.allFinite(b.base, count: b.count) { return false }
        for m in [dampedA, dampedG, inverseA, inverseG] {
            let n = m.rows
            for i in 0..<n {
                guard m.base[i * n + i] > 0 else { return false }
                for j in (i + 1)..<Swift.max(i + 1, n) where m.base[i * n + j] != m.base[j * n + i] { return false }
            }
        }
        for m in [crossA, crossG].compactMap({ $0 }) {
            let n = m.rows
            for i in 0..<n {
                for j in (i + 1)..<Swift.max(i + 1, n) where m.base[i * n + j] != m.base[j * n + i] { return false }
            }
        }
        if let s = sigma {
            for i in 0..<s.scale.count where !(s.scale.base[i] > 0) { return false }
        }
        return true
    }
}

/// Block-tridiagonal K-FAC (Martens & Grosse 2015, §4.3; seed 001, eq. 8) for chains of linked
/// consecutive dense layers, beside the block-diagonal estimator that keeps owning every
/// layer's diagonal factors (recording, folding, `get_factors`, state) and that inverts the
/// layers no link touches.
///
/// The inverse of the Fisher is approximated as the precision of a chain-structured Gaussian
/// graphical model: F̂⁻¹ = Ξᵀ Λ Ξ with Ξ = I except Ξ_{l,l+1} = −Ψ_l, Ψ_l = Ψ^A_l ⊗ Ψ^G_l, and
/// Λ = diag(Σ_{l|l+1}⁻¹ …, Σ_top⁻¹), Σ_top = Ā ⊗ Ḡ of the chain's last layer. Linked layers
/// always use factored (π) damping of their diagonal factors, everywhere those appear (Ψ, C, D,
/// Σ); the cross factors are not damped.
///
/// Inversion is staged like the estimator's: into `staged`, made current by `commit`. It runs
/// in two rounds of parallel jobs over the worker pool: (1) the Cholesky inverses of every
/// linked layer's damped factors, (2) per layer with an upper link and per side, Ψ, C (or D)
/// and the generalized eigenproblem.
final class TridiagonalLinks<Scalar: KFACScalar>: ParallelJobs {
    private(set) var links: [TridiagonalLink<Scalar>] = []
    /// Per layer: the index in `links` of its link up (to l + 1) and down (to l − 1), or −1.
    private(set) var upLink: [Int] = []
    private(set) var downLink: [Int] = []
    /// The linked layers, ascending.
    private(set) var linkedLayers: [Int] = []
    /// Per layer: whether this rank computes its inverse (`stageInverses(ownedOnly:)`).
    var owned: [Bool] = []
    private(set) var committed: [TridiagonalLayerInverse<Scalar>?] = []
    private var staged: [TridiagonalLayerInverse<Scalar>?] = []
    private(set) var hasInverses = false
    /// Application buffers per linked layer: w, z (o×a), above (o×ua), below (o×a of l − 1).
    private var w: [AlignedBuffer<Scalar>?] = []
    private var z: [AlignedBuffer<Scalar>?] = []
    private var above: [AlignedBuffer<Scalar>?] = []
    private var below: [AlignedBuffer<Scalar>?] = []

    // Inversion work.
    private struct Job { var layer: Int; var side: FactorSide }
    private var jobs: [Job] = []
    private var secondRound = false
    private var jobErrors = UnsafeMutableBufferPointer<KFACError?>(start: nil, count: 0)
    private var workspaces: [EigenWorkspace<Scalar>] = []
    private var factorScratch: [AlignedBuffer<Scalar>] = []
    private var crossSources: [(a: AlignedBuffer<Scalar>, g: AlignedBuffer<Scalar>)?] = []
    private let workers = WorkerPool()
    private var largestDimension = 0
    /// Per layer: (in features, out features, bias) of the linked dense layers.
    private var shapes: [(inFeatures: Int, outFeatures: Int, hasBias: Bool)] = []

    /// 1 − max s·t below which Σ_{l|l+1} counts as not positive definite.
    static var minimumDenominator: Scalar { Scalar.ulpOfOne.squareRoot() }

    init() {}

    deinit { releaseJobErrors() }

    private func releaseJobErrors() {
        guard jobErrors.baseAddress != nil else { return }
        jobErrors.deinitialize()
        jobErrors.deallocate()
    }

    func isLinked(_ l: Int) -> Bool { l >= 0 && l < upLink.count && (upLink[l] >= 0 || downLink[l] >= 0) }

    func link(lowerOf l: Int) -> TridiagonalLink<Scalar>? { l >= 0 && l < upLink.count && upLink[l] >= 0 ? links[upLink[l]] : nil }

    // MARK: Links

    /// Links `lower` and `lower + 1`; the estimator's layers must be final (no statistics yet).
    func link(lower: Int, upper: Int, estimator e: BlockDiagonalEstimator<Scalar>) throws(KFACError) {
        let lo = try e.layer(lower), up = try e.layer(upper)
        guard !e.statisticsStarted else {
            throw KFACError(.layersFrozen, "layers must be linked before statistics are recorded")
        }
        guard upper == lower + 1 else {
            throw KFACError(.invalidArgument, "a link joins consecutive layers (upper = lower + 1), got \(lower) and \(upper)")
        }
        for (l, b) in [(lower, lo), (upper, up)] {
            guard case .dense = b.layer, b.blocks.count == 1, b.blocks[0].input.structure.uniqueSizes.count == 1,
                  b.blocks[0].output.structure.uniqueSizes.count == 1 else {
                throw KFACError(.invalidArgument, "layer \(l) is not an ungrouped dense layer: only those can be linked")
            }
        }
        guard up.layer.inFeatures == lo.layer.outFeatures else {
            throw KFACError(.invalidSize, "layer \(upper) has \(up.layer.inFeatures) inputs but layer \(lower) \(lo.layer.outFeatures) outputs: the upper layer of a link consumes the lower one's activation")
        }
        if link(lowerOf: lower) != nil { throw KFACError(.invalidArgument, "layers \(lower) and \(upper) are already linked") }
        let new = try TridiagonalLink<Scalar>(lower: lower, lowerLayer: lo.layer, upperLayer: up.layer)
        var all = links + [new]
        all.sort { $0.lower < $1.lower }
        try rebuild(all, estimator: e)
    }

    /// Installs `all` and sizes every per-layer buffer for it; on error nothing changed.
    private func rebuild(_ all: [TridiagonalLink<Scalar>], estimator e: BlockDiagonalEstimator<Scalar>) throws(KFACError) {
        let n = e.layerCount
        var up = [Int](repeating: -1, count: n), down = up
        for (k, link) in all.enumerated() {
            up[link.lower] = k
            down[link.upper] = k
        }
        let layers = (0..<n).filter { up[$0] >= 0 || down[$0] >= 0 }
        func dims(_ l: Int) -> (a: Int, o: Int) { (e.layers[l].layer.inputFactorDimension, e.layers[l].layer.outputFactorDimension) }
        var newCommitted = [TridiagonalLayerInverse<Scalar>?](repeating: nil, count: n), newStaged = newCommitted
        var newW = [AlignedBuffer<Scalar>?](repeating: nil, count: n), newZ = newW, newAbove = newW, newBelow = newW
        var largest = 0
        for l in layers {
            let (a, o) = dims(l)
            largest = Swift.max(largest, a, o)
            let u = up[l] >= 0 ? dims(l + 1) : nil
            newCommitted[l] = try TridiagonalLayerInverse(a: a, o: o, upper: u)
            newStaged[l] = try TridiagonalLayerInverse(a: a, o: o, upper: u)
            newW[l] = try AlignedBuffer(rows: o, columns: a)
            newZ[l] = try AlignedBuffer(rows: o, columns: a)
            if let u { newAbove[l] = try AlignedBuffer(rows: o, columns: u.a) }
            if down[l] >= 0 { newBelow[l] = try AlignedBuffer(rows: o, columns: dims(l - 1).a) }
        }
        let errors = UnsafeMutableBufferPointer<KFACError?>.allocate(capacity: Swift.max(2 * layers.count, 1))
        errors.initialize(repeating: nil)
        releaseJobErrors()
        jobErrors = errors
        links = all
        upLink = up
        downLink = down
        linkedLayers = layers
        owned = [Bool](repeating: true, count: n)
        committed = newCommitted
        staged = newStaged
        (w, z, above, below) = (newW, newZ, newAbove, newBelow)
        crossSources = Array(repeating: nil, count: all.count)
        jobs = []
        jobs.reserveCapacity(2 * layers.count)
        largestDimension = largest
        shapes = e.layers.map { ($0.layer.inFeatures, $0.layer.outFeatures, $0.layer.hasBias) }
        hasInverses = false
    }

    // MARK: Statistics

    /// Reserves what recording `rows` rows for layer `l` needs in its links (call before the
    /// estimator records them; on error nothing changed).
    func prepareRecord(layer l: Int, outputSide: Bool, rows: Int) throws(KFACError) {
        if let k = link(lowerOf: l) { try (outputSide ? k.gradients : k.inputs).prepare(upper: false, rows: rows) }
        if l > 0, let k = link(lowerOf: l - 1) { try (outputSide ? k.gradients : k.inputs).prepare(upper: true, rows: rows) }
    }

    /// Adds the rows the estimator has just recorded for layer `l` to its links (after
    /// `prepareRecord`): dense inputs [rows][in] with the bias coordinate 1 appended if the layer
    /// has a bias, or output gradients [rows][out] times `scale`.
    func record(layer l: Int, _ x: UnsafePointer<Scalar>, rows: Int, outputSide: Bool, scale: Scalar) {
        let d = shapes[l]
        let width = outputSide ? d.outFeatures : d.inFeatures
        let appended: Scalar? = !outputSide && d.hasBias ? 1 : nil
        if let k = link(lowerOf: l) {
            (outputSide ? k.gradients : k.inputs).add(upper: false, x, rows: rows, width: width, appended: appended, scale: scale)
        }
        if l > 0, let k = link(lowerOf: l - 1) {
            (outputSide ? k.gradients : k.inputs).add(upper: true, x, rows: rows, width: width, appended: appended, scale: scale)
        }
    }

    /// Throws `.invalidSize` if some link's rows do not pair (see `CrossFactor`).
    func checkPaired(estimator e: BlockDiagonalEstimator<Scalar>) throws(KFACError) {
        for i in 0..<links.count {
            let k = links[i]
            let lo = e.blocks[e.layerBlocks[k.lower].lowerBound], up = e.blocks[e.layerBlocks[k.upper].lowerBound]
            do {
                try k.inputs.checkPaired(lowerPending: lo.input.pendingRows, upperPending: up.input.pendingRows, what: "input")
                try k.gradients.checkPaired(lowerPending: lo.output.pendingRows, upperPending: up.output.pendingRows,
                                            what: "output-gradient")
            } catch {
                throw KFACError(error.status, "link \(k.lower)–\(k.upper): \(error.message)")
            }
        }
    }

    /// Drops every link's pending cross statistics, paired or not (with the layers' own pending
    /// statistics: kfac_optimizer_discard_statistics).
    func discardPending() {
        for i in 0..<links.count {
            links[i].inputs.discardPending()
            links[i].gradients.discardPending()
        }
    }

    /// Folds every link's pending cross statistics (after `checkPaired`).
    func fold(decay: Double) {
        for i in 0..<links.count {
            let k = links[i]
            k.inputs.fold(decay: Scalar(decay))
            k.gradients.fold(decay: Scalar(decay))
        }
    }

    /// Whether every linked layer and every link has factors.
    func hasFactors(estimator e: BlockDiagonalEstimator<Scalar>) -> Bool {
        linkedLayers.allSatisfy { e.blocks[e.layerBlocks[$0].lowerBound].hasFactors } && links.allSatisfy { $0.inputs.hasRunning && $0.gradients.hasRunning }
    }

    // MARK: Inversion

    /// Computes the tridiagonal inverse of every chain into the staging set, from the running
    /// factors or, with `foldingPending`, from out-of-place folds of the pending statistics
    /// (diagonal and cross). Nothing committed changes; on failure throws the first error in
    /// layer order.
    ///
    /// `ownedOnly` (a distributed run): only the layers `owned` marks are computed (with the
    /// Cholesky inverses of the layers above them that their Ψ needs); the others' staged
    /// inverses are left as they are, to be filled by the inverse exchange.
    func stageInverses(estimator e: BlockDiagonalEstimator<Scalar>, foldingPending: Bool, settings: CurvatureSettings,
                       ownedOnly: Bool = false) throws(KFACError) {
        let owned = self.owned
        func selected(_ l: Int) -> Bool { !ownedOnly || owned[l] }
        let decay = Scalar(settings.factorDecay)
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            let c = e.blocks[e.layerBlocks[l].lowerBound]
            let a = foldingPending ? try c.input.stageFold(decay: decay) : c.input.running
            let g = foldingPending ? try c.output.stageFold(decay: decay) : c.output.running
            let inv = staged[l]!
            let sqrtDamping = Scalar(settings.damping.squareRoot())
            let pi = settings.piDamping ? c.factoredDampingPi(a: a.base, g: g.base) : 1
            let (da, dg) = (inv.dampedA.rows, inv.dampedG.rows)
            Scalar.copyUpperTriangle(from: a.base, to: inv.dampedA.base, n: da, diagonalShift: pi * sqrtDamping)
            Scalar.symmetrizeFromUpper(inv.dampedA.base, n: da)
            Scalar.copyUpperTriangle(from: g.base, to: inv.dampedG.base, n: dg, diagonalShift: sqrtDamping / pi)
            Scalar.symmetrizeFromUpper(inv.dampedG.base, n: dg)
        }
        for k in 0..<links.count {
            let link = links[k]
            crossSources[k] = foldingPending ? (try link.inputs.stageFold(decay: decay), try link.gradients.stageFold(decay: decay))
                                             : (link.inputs.running, link.gradients.running)
        }
        let threads = settings.threadCount == 0 ? onlineProcessorCount() : settings.threadCount
        let workerCount = Swift.max(1, Swift.min(threads, 2 * linkedLayers.count))
        while workspaces.count < workerCount {
            workspaces.append(try EigenWorkspace())
            factorScratch.append(try AlignedBuffer(rows: largestDimension, columns: largestDimension))
        }
        defer { for k in crossSources.indices { crossSources[k] = nil } }
        for round in 0..<2 {
            let round = round == 1
            jobs.removeAll(keepingCapacity: true)
            for i in 0..<linkedLayers.count {
                let l = linkedLayers[i]
                guard !round || upLink[l] >= 0 else { continue }
                // Round 1 also inverts the factors of the layer above an owned layer (its Ψ needs them).
                let wanted = round ? selected(l) : selected(l) || (downLink[l] >= 0 && selected(l - 1))
                guard wanted else { continue }
                jobs.append(Job(layer: l, side: .input))
                jobs.append(Job(layer: l, side: .output))
            }
            secondRound = round
            workers.run(count: jobs.count, workers: workerCount, self)
            var first: (layer: Int, error: KFACError)?
            for i in jobs.indices {
                if let error = jobErrors[i] {
                    jobErrors[i] = nil
                    if first == nil || jobs[i].layer < first!.layer { first = (jobs[i].layer, error) }
                }
            }
            if let f = first { throw KFACError(f.error.status, "layer \(f.layer) (block-tridiagonal): \(f.error.message)") }
        }
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            guard upLink[l] >= 0, selected(l) else { continue }
            do {
                try staged[l]!.sigma!.finish(sign: -1, minimumDenominator: Self.minimumDenominator)
            } catch {
                throw KFACError(error.status, "layer \(l), Σ of the link to layer \(l + 1): \(error.message)")
            }
        }
    }

    func runJob(_ index: Int, worker: Int) {
        let job = jobs[index]
        do throws(KFACError) {
            let inv = staged[job.layer]!
            let input = job.side == .input
            if !secondRound {
                let (damped, inverse) = input ? (inv.dampedA, inv.inverseA) : (inv.dampedG, inv.inverseG)
                let n = damped.rows
                Scalar.copyUpperTriangle(from: damped.base, to: inverse.base, n: n, diagonalShift: 0)
                guard Scalar.choleskyFactor(n: n, a: inverse.base) == 0, Scalar.choleskyInverse(n: n, a: inverse.base) == 0 else {
                    throw KFACError(.notPositiveDefinite, "damped \(n)×\(n) \(input ? "input" : "output") factor is not positive definite; increase the damping")
                }
                Scalar.symmetrizeFromUpper(inverse.base, n: n)
            } else {
                let source = crossSources[upLink[job.layer]]!
                let upper = staged[job.layer + 1]!
                let (x, upperInverse, psi, cross, damped) = input
                    ? (source.a, upper.inverseA, inv.psiA!, inv.crossA!, inv.dampedA)
                    : (source.g, upper.inverseG, inv.psiG!, inv.crossG!, inv.dampedG)
                let (n, u) = (x.rows, x.columns)
                // Ψ = X Ū⁻¹, C = Ψ Xᵀ
                Scalar.gemm(transA: false, transB: false, m: n, n: u, k: u, alpha: 1, a: x.base, lda: u,
                            b: upperInverse.base, ldb: u, beta: 0, c: psi.base, ldc: u)
                Scalar.gemm(transA: false, transB: true, m: n, n: n, k: u, alpha: 1, a: psi.base, lda: u,
                            b: x.base, ldb: u, beta: 0, c: cross.base, ldc: n)
                Scalar.symmetrizeFromUpper(cross.base, n: n)
                try inv.sigma!.computeSide(job.side, factor: damped.base, other: cross.base,
                                           factorScratch: factorScratch[worker].base, workspace: workspaces[worker])
            }
            jobErrors[index] = nil
        } catch {
            jobErrors[index] = error
        }
    }

    // MARK: Distributed exchange

    /// Scalars of linked layer `l`'s inverse image (its buffers in state-image order).
    func inverseImageCount(layer l: Int) -> Int {
        let inv = staged[l]!
        var n = inv.dampedA.count + inv.dampedG.count + inv.inverseA.count + inv.inverseG.count
        if let psiA = inv.psiA, let psiG = inv.psiG, let crossA = inv.crossA, let crossG = inv.crossG, let sigma = inv.sigma {
            n += psiA.count + psiG.count + crossA.count + crossG.count
            n += sigma.inputVectors.count + sigma.inputValues.count + sigma.outputVectors.count + sigma.outputValues.count + sigma.scale.count
        }
        return n
    }

    /// Scalars of the link section of an inverse pack: every linked layer's image, ascending.
    var inversePackCount: Int {
        var n = 0
        for i in 0..<linkedLayers.count { n += inverseImageCount(layer: linkedLayers[i]) }
        return n
    }

    /// Copies linked layer `l`'s staged inverse to (`toImage`) or from an image at `p`.
    func transferStaged(layer l: Int, _ p: UnsafeMutablePointer<Scalar>, toImage: Bool) {
        let inv = staged[l]!
        var w = 0
        // (A static helper, not a nested function: capturing `w` would allocate a context.)
        Self.move(inv.dampedA, p, &w, toImage); Self.move(inv.dampedG, p, &w, toImage)
        Self.move(inv.inverseA, p, &w, toImage); Self.move(inv.inverseG, p, &w, toImage)
        Self.move(inv.psiA, p, &w, toImage); Self.move(inv.psiG, p, &w, toImage)
        Self.move(inv.crossA, p, &w, toImage); Self.move(inv.crossG, p, &w, toImage)
        if let sigma = inv.sigma {
            Self.move(sigma.inputVectors, p, &w, toImage); Self.move(sigma.inputValues, p, &w, toImage)
            Self.move(sigma.outputVectors, p, &w, toImage); Self.move(sigma.outputValues, p, &w, toImage)
            Self.move(sigma.scale, p, &w, toImage)
        }
    }

    private static func move(_ b: AlignedBuffer<Scalar>?, _ p: UnsafeMutablePointer<Scalar>, _ w: inout Int, _ toImage: Bool) {
        guard let b else { return }
        if toImage { (p + w).update(from: b.base, count: b.count) } else { b.base.update(from: p + w, count: b.count) }
        w += b.count
    }

    /// Makes the staging set current.
    func commit() {
        swap(&committed, &staged)
        hasInverses = true
    }

    // MARK: Products

    /// u = F̂⁻¹ v for every linked layer, v in each layer's block `gradient`, u into its block
    /// `direction`, with the staging set (`staged`) or the current one:
    ///   W_l = V_l − Ψ^G_l V_{l+1} Ψ^Aᵀ_l (l links up), W = V otherwise;
    ///   Z_l = Σ_{l|l+1}⁻¹ W_l by eq. 8, Z = Ḡ⁻¹ W Ā⁻¹ for a chain's last layer;
    ///   U_l = Z_l − Ψ^Gᵀ_{l−1} Z_{l−1} Ψ^A_{l−1} (l links down), U = Z otherwise.
    /// Throws `.nonFinite` if some U is not finite.
    func precondition(estimator e: BlockDiagonalEstimator<Scalar>, staged useStaged: Bool) throws(KFACError) {
        let set = useStaged ? staged : committed
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            let c = e.blocks[e.layerBlocks[l].lowerBound], inv = set[l]!
            let (o, a) = (c.output.dimension, c.input.dimension)
            let wl = w[l]!, zl = z[l]!
            if upLink[l] >= 0 {
                let v = e.blocks[e.layerBlocks[l + 1].lowerBound].gradient
                let (uo, ua) = (v.rows, v.columns)
                let t = above[l]!
                Scalar.gemm(transA: false, transB: false, m: o, n: ua, k: uo, alpha: 1, a: inv.psiG!.base, lda: uo,
                            b: v.base, ldb: ua, beta: 0, c: t.base, ldc: ua)
                wl.base.update(from: c.gradient.base, count: o * a)
                Scalar.gemm(transA: false, transB: true, m: o, n: a, k: ua, alpha: -1, a: t.base, lda: ua,
                            b: inv.psiA!.base, ldb: ua, beta: 1, c: wl.base, ldc: a)
                inv.sigma!.apply(wl.base, into: zl.base, scratch: c.scratch.base)
            } else {
                Scalar.gemm(transA: false, transB: false, m: o, n: a, k: a, alpha: 1, a: c.gradient.base, lda: a,
                            b: inv.inverseA.base, ldb: a, beta: 0, c: c.scratch.base, ldc: a)
                Scalar.gemm(transA: false, transB: false, m: o, n: a, k: o, alpha: 1, a: inv.inverseG.base, lda: o,
                            b: c.scratch.base, ldb: a, beta: 0, c: zl.base, ldc: a)
            }
        }
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            let c = e.blocks[e.layerBlocks[l].lowerBound]
            let (o, a) = (c.output.dimension, c.input.dimension)
            let u = c.direction
            u.base.update(from: z[l]!.base, count: o * a)
            if downLink[l] >= 0 {
                let lowerInverse = set[l - 1]!, zLower = z[l - 1]!
                let (lo, la) = (zLower.rows, zLower.columns)
                let t = below[l]!
                Scalar.gemm(transA: true, transB: false, m: o, n: la, k: lo, alpha: 1, a: lowerInverse.psiG!.base, lda: o,
                            b: zLower.base, ldb: la, beta: 0, c: t.base, ldc: la)
                Scalar.gemm(transA: false, transB: false, m: o, n: a, k: la, alpha: -1, a: t.base, lda: la,
                            b: lowerInverse.psiA!.base, ldb: a, beta: 1, c: u.base, ldc: a)
            }
            guard Scalar.allFinite(u.base, count: u.count) else {
                throw KFACError(.nonFinite, "the preconditioned gradient of layer \(l) is not finite; increase the damping")
            }
        }
    }

    /// u = F̂ v for every linked layer (the inverse of `precondition`'s matrix: the GGM's
    /// covariance), from the current set: Y solves Ξᵀ Y = V (Y_l = V_l + Ψ^Gᵀ_{l−1} Y_{l−1} Ψ^A_{l−1}),
    /// W_l = Σ_{l|l+1} Y_l = Ḡ Y Ā − D Y C, then U solves Ξ U = W (U_l = W_l + Ψ^G_l U_{l+1} Ψ^Aᵀ_l).
    func multiplyForward(estimator e: BlockDiagonalEstimator<Scalar>) throws(KFACError) {
        let set = committed
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            let c = e.blocks[e.layerBlocks[l].lowerBound]
            let (o, a) = (c.output.dimension, c.input.dimension)
            let y = w[l]!
            y.base.update(from: c.gradient.base, count: o * a)
            if downLink[l] >= 0 {
                let lowerInverse = set[l - 1]!, yLower = w[l - 1]!
                let (lo, la) = (yLower.rows, yLower.columns)
                let t = below[l]!
                Scalar.gemm(transA: true, transB: false, m: o, n: la, k: lo, alpha: 1, a: lowerInverse.psiG!.base, lda: o,
                            b: yLower.base, ldb: la, beta: 0, c: t.base, ldc: la)
                Scalar.gemm(transA: false, transB: false, m: o, n: a, k: la, alpha: 1, a: t.base, lda: la,
                            b: lowerInverse.psiA!.base, ldb: a, beta: 1, c: y.base, ldc: a)
            }
        }
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            let c = e.blocks[e.layerBlocks[l].lowerBound], inv = set[l]!
            let (o, a) = (c.output.dimension, c.input.dimension)
            let y = w[l]!, zl = z[l]!, s = c.scratch
            Scalar.gemm(transA: false, transB: false, m: o, n: a, k: a, alpha: 1, a: y.base, lda: a,
                        b: inv.dampedA.base, ldb: a, beta: 0, c: s.base, ldc: a)
            Scalar.gemm(transA: false, transB: false, m: o, n: a, k: o, alpha: 1, a: inv.dampedG.base, lda: o,
                        b: s.base, ldb: a, beta: 0, c: zl.base, ldc: a)
            if upLink[l] >= 0 {
                Scalar.gemm(transA: false, transB: false, m: o, n: a, k: a, alpha: 1, a: y.base, lda: a,
                            b: inv.crossA!.base, ldb: a, beta: 0, c: s.base, ldc: a)
                Scalar.gemm(transA: false, transB: false, m: o, n: a, k: o, alpha: -1, a: inv.crossG!.base, lda: o,
                            b: s.base, ldb: a, beta: 1, c: zl.base, ldc: a)
            }
        }
        for i in stride(from: linkedLayers.count - 1, through: 0, by: -1) {
            let l = linkedLayers[i]
            let c = e.blocks[e.layerBlocks[l].lowerBound], inv = set[l]!
            let (o, a) = (c.output.dimension, c.input.dimension)
            let u = c.direction
            u.base.update(from: z[l]!.base, count: o * a)
            if upLink[l] >= 0 {
                let uUpper = e.blocks[e.layerBlocks[l + 1].lowerBound].direction
                let (uo, ua) = (uUpper.rows, uUpper.columns)
                let t = above[l]!
                Scalar.gemm(transA: false, transB: false, m: o, n: ua, k: uo, alpha: 1, a: inv.psiG!.base, lda: uo,
                            b: uUpper.base, ldb: ua, beta: 0, c: t.base, ldc: ua)
                Scalar.gemm(transA: false, transB: true, m: o, n: a, k: ua, alpha: 1, a: t.base, lda: ua,
                            b: inv.psiA!.base, ldb: ua, beta: 1, c: u.base, ldc: a)
            }
        }
        for i in 0..<linkedLayers.count {
            let l = linkedLayers[i]
            let u = e.blocks[e.layerBlocks[l].lowerBound].direction
            guard Scalar.allFinite(u.base, count: u.count) else {
                throw KFACError(.nonFinite, "the curvature product of layer \(l) is not finite")
            }
        }
    }

    // MARK: State image

    /// The values of every linked layer's inverse set in an image (fixed by the links).
    var inverseValueCount: Int {
        var n = 0
        for l in linkedLayers { for b in committed[l]!.buffers { n += b.count } }
        return n
    }

    /// Writes the links section: u64 link count, per link u64 lower and the two cross factors
    /// (A then G), then u64 has inverses and, if so, every linked layer's current set.
    func write(to w: inout StateWriter) {
        w.u64(UInt64(links.count))
        for k in links {
            w.u64(UInt64(k.lower))
            k.inputs.write(to: &w)
            k.gradients.write(to: &w)
        }
        w.u64(hasInverses ? 1 : 0)
        guard hasInverses else { return }
        for l in linkedLayers {
            for b in committed[l]!.buffers { w.scalars(b.base, count: b.count) }
        }
    }

    /// Reads what `write` wrote, checked against these links; returns an installer (nothing
    /// changes until it is called).
    func read(from r: inout StateReader, estimator e: BlockDiagonalEstimator<Scalar>,
              restored: [any CurvatureLayer<Scalar>]) throws(KFACError) -> () -> Void {
        let count = try r.u64()
        guard count == UInt64(links.count) else {
            throw KFACError(.stateMismatch, "state image has \(count) block-tridiagonal links, the optimizer \(links.count)")
        }
        var fresh: [TridiagonalLink<Scalar>] = []
        for k in links {
            guard try r.u64() == UInt64(k.lower) else {
                throw KFACError(.stateMismatch, "state image links other layers than the optimizer")
            }
            let f = try TridiagonalLink<Scalar>(lower: k.lower, lowerLayer: e.layers[k.lower].layer, upperLayer: e.layers[k.upper].layer)
            // A cross row is recorded with a row of each layer's own factor: no more can be
            // pending than the restored layers have (an ungrouped dense layer: one block).
            let lo = restored[k.lower].blocks[0], up = restored[k.upper].blocks[0]
            try f.inputs.read(from: &r, lowerPending: lo.input.pendingRows, upperPending: up.input.pendingRows)
            try f.gradients.read(from: &r, lowerPending: lo.output.pendingRows, upperPending: up.output.pendingRows)
            fresh.append(f)
        }
        let restoredHasInverses = try r.flag()
        var sets = [TridiagonalLayerInverse<Scalar>?](repeating: nil, count: committed.count)
        if restoredHasInverses {
            for l in linkedLayers {
                let old = committed[l]!
                let set = try TridiagonalLayerInverse<Scalar>(a: old.dampedA.rows, o: old.dampedG.rows,
                                                              upper: old.psiA.map { ($0.columns, old.psiG!.columns) })
                for b in set.buffers { try r.scalars(into: b.base, count: b.count) }
                guard set.isValid else {
                    throw KFACError(.corruptState, "state image has a block-tridiagonal inverse of layer \(l) that no inversion produces (not finite, not symmetric, or not positive)")
                }
                sets[l] = set
            }
        }
        return { [self] in
            for (k, f) in fresh.enumerated() { links[k] = f }
            if restoredHasInverses { for l in linkedLayers { committed[l] = sets[l] } }
            hasInverses = restoredHasInverses
        }
    }
}
