/// Preconditioned conjugate gradient by reverse communication (issue 9): the solver never calls
/// the caller. It asks for the product of the Gauss-Newton matrix G with a vector it hands out,
/// the caller computes it by any means (an R-op, stored Jacobian columns, torch.func) and passes
/// it back. `include/kfac.h`, "Conjugate gradient and Newton-CG", is the contract.
///
/// The system is (G + (λ + η) I) x = −g, λ = `KFACParameters.damping` (the Levenberg–Marquardt
/// damping), η = `CGOptions.l2`. With A = G + (λ + η) I, M the preconditioner and r = −g − A x:
///
///     start:  x₀ = 0 (or decay · previous solution), r₀ = −g − A x₀, y₀ = M⁻¹ r₀, p₀ = y₀
///     step i: α = rᵀy / pᵀAp, x += α p, r −= α A p, y = M⁻¹ r, β = r_newᵀ y_new / r_oldᵀ y_old,
///             p = y + β p
///     φ(x) = ½ xᵀ A x + gᵀ x = ½ gᵀ x − ½ xᵀ r            (no extra product)
///
/// Stopping (checked at the start and after every iteration i, in this order): ‖r‖ = 0; the rule
/// (`.residual`: ‖r_i‖ ≤ ξ ‖g‖; `.relativeProgress`: i > k, φ_i < 0 and (φ_i − φ_{i−k}) / φ_i <
/// k ε with k = max(10, ⌊i/10⌋)); i = maxIterations. A non-positive pᵀAp stops before the
/// update (x stays the last iterate).

/// Which preconditioner M a solve uses.
public enum CGPreconditioner: Int32, Sendable, CaseIterable {
    /// M = I.
    case none = 0
    /// The current K-FAC inverses (the estimator's damped curvature at power −1, any strategy).
    case kfac = 1
    /// M = diag(d + λ + η)^exponent, d given per solve (Martens 2010: the sum of squared
    /// per-example gradients).
    case diagonal = 2
}

/// The stopping rule of a solve.
public enum CGStopRule: Int32, Sendable, CaseIterable {
    /// simpleNN: ‖r_i‖ ≤ ξ ‖g‖, ξ = tolerance (default 0.1).
    case residual = 0
    /// Martens 2010, §4.4: relative progress of φ over the last k = max(10, ⌊i/10⌋) iterations
    /// below k ε, ε = tolerance (default 5e-4).
    case relativeProgress = 1
}

/// Why a solve stopped.
public enum CGStopReason: Int32, Sendable {
    /// Not stopped (yet).
    case running = 0
    /// ‖r‖ ≤ ξ‖g‖ (or ‖r‖ = 0 under either rule).
    case residual = 1
    /// Martens' relative-progress test.
    case relativeProgress = 2
    /// The iteration limit.
    case maxIterations = 3
    /// pᵀ A p ≤ 0 (only from rounding or a product that is not positive semi-definite).
    case nonPositiveCurvature = 4
    /// The caller finished the solve before the solver stopped.
    case caller = 5
}

/// What the solver wants after `begin` or `supplyProduct`.
public enum CGRequest: Int32, Sendable {
    /// The caller reads the vector (`conjugateGradientVector`) and supplies G times it.
    case needProduct = 1
    /// The solve has stopped: call `finishConjugateGradient`.
    case done = 2
}

/// The options of one solve (the C `kfac_cg_desc`, its zeros replaced by defaults).
public struct CGOptions: Sendable, Equatable {
    public var maxIterations = 250
    public var stopRule = CGStopRule.residual
    /// ξ (residual) or ε (relative progress); nil = 0.1 or 5e-4.
    public var tolerance: Double?
    public var preconditioner = CGPreconditioner.none
    /// α of the diagonal preconditioner (Martens: 0.75).
    public var diagonalExponent = 0.75
    /// Start from `warmStartDecay` times the previous solve's solution (if there is one).
    public var warmStart = false
    public var warmStartDecay = 0.95
    /// η, added to λ in the system and to G in the model.
    public var l2 = 0.0

    public init(maxIterations: Int = 250, stopRule: CGStopRule = .residual, tolerance: Double? = nil,
                preconditioner: CGPreconditioner = .none, diagonalExponent: Double = 0.75, warmStart: Bool = false,
                warmStartDecay: Double = 0.95, l2: Double = 0) {
        self.maxIterations = maxIterations
        self.stopRule = stopRule
        self.tolerance = tolerance
        self.preconditioner = preconditioner
        self.diagonalExponent = diagonalExponent
        self.warmStart = warmStart
        self.warmStartDecay = warmStartDecay
        self.l2 = l2
    }

    /// The tolerance in use.
    public var effectiveTolerance: Double { tolerance ?? (stopRule == .residual ? 0.1 : 5e-4) }

    /// The largest iteration limit (the φ history is kept for every iteration).
    public static let iterationLimit = 1_000_000

    func validate() throws(KFACError) {
        guard maxIterations >= 1 && maxIterations <= Self.iterationLimit else {
            throw KFACError(.invalidArgument, "max_iterations must be in [1, \(Self.iterationLimit)] (0 = 250), got \(maxIterations)")
        }
        let t = effectiveTolerance
        guard t.isFinite && t > 0 && (stopRule == .relativeProgress || t < 1) else {
            throw KFACError(.invalidArgument, "tolerance must be in (0, 1) for the residual rule and > 0 for the progress rule, got \(t)")
        }
        guard diagonalExponent.isFinite && diagonalExponent > 0 && diagonalExponent <= 1 else {
            throw KFACError(.invalidArgument, "diagonal_exponent must be in (0, 1] (0 = 0.75), got \(diagonalExponent)")
        }
        guard warmStartDecay.isFinite && warmStartDecay > 0 && warmStartDecay <= 1 else {
            throw KFACError(.invalidArgument, "warm_start_decay must be in (0, 1] (0 = 0.95), got \(warmStartDecay)")
        }
        guard l2.isFinite && l2 >= 0 else {
            throw KFACError(.invalidArgument, "l2 must be finite and >= 0, got \(l2)")
        }
    }
}

/// The outcome of a solve (the C `kfac_cg_result`). s is the solution, G the caller's products
/// (without λ and η).
public struct CGResult: Sendable, Equatable {
    /// CG iterations (products of search directions; a warm start's initial product not counted).
    public var iterations = 0
    /// Products the caller supplied (iterations, plus 1 for a warm start).
    public var products = 0
    public var reason = CGStopReason.running
    /// gᵀs.
    public var gradDotStep = 0.0
    /// sᵀ(G + ηI)s, from the residual: sᵀ(−g − r) − λ‖s‖².
    public var stepCurvature = 0.0
    /// λ‖s‖² (λ of the solve).
    public var dampingTerm = 0.0
    /// q(s) = gᵀs + ½ sᵀ(G + ηI)s: the model without λ, the denominator of ρ (Martens 2010,
    /// simpleNN).
    public var modelValue = 0.0
    /// φ(s) = q(s) + ½ λ‖s‖², the quadratic CG minimised.
    public var quadraticValue = 0.0
    /// ‖r‖ at s, and ‖g‖.
    public var residualNorm = 0.0
    public var gradientNorm = 0.0
    /// λ of the solve (`KFACParameters.damping` at `begin`).
    public var damping = 0.0

    public init() {}
}

/// The solver's state, owned by the optimizer but kept apart from its curvature blocks. Vectors
/// are flat: layer by layer, its weight ([out][in] row-major) then its bias.
final class ConjugateGradientState<Scalar: KFACScalar> {
    enum Phase { case idle, initialProduct, iterating, stopped }

    var phase = Phase.idle
    var options = CGOptions()
    /// Per layer: offset of its weight, number of weight values, bias values (0 without bias).
    var layout: [(offset: Int, weights: Int, biases: Int)] = []
    var size = 0

    // Committed vectors of the open solve.
    var g: AlignedBuffer<Scalar>?
    var x: AlignedBuffer<Scalar>?
    var r: AlignedBuffer<Scalar>?
    var y: AlignedBuffer<Scalar>?
    var p: AlignedBuffer<Scalar>?
    /// The diagonal preconditioner's M⁻¹ = (d + λ + η)^(−α).
    var minv: AlignedBuffer<Scalar>?
    // Scratch: everything a call computes before it commits.
    var q: AlignedBuffer<Scalar>?
    var rNext: AlignedBuffer<Scalar>?
    var yNext: AlignedBuffer<Scalar>?
    var minvNext: AlignedBuffer<Scalar>?
    /// The products of `solveConjugateGradient` (the product function's output).
    var productScratch: AlignedBuffer<Scalar>?
    /// The last finished solution (for warm starts).
    var previous: AlignedBuffer<Scalar>?
    var hasPrevious = false

    var lambda = 0.0
    var ry = 0.0
    var gradientNorm = 0.0
    var residualNorm = 0.0
    var iterations = 0
    var products = 0
    var reason = CGStopReason.running
    /// φ_0 … φ_i (capacity reserved at `begin`).
    var phi: [Double] = []

    /// The model of the last finished solve, awaiting `reportNewtonLossChange`: gᵀs and
    /// sᵀ(G + ηI)s.
    var pendingModel: (gs: Double, sGs: Double)?
    /// ρ of the last Newton report, NaN before the first, and the number of reports (the
    /// Levenberg–Marquardt interval counts them, apart from the adaptive mode's).
    var lastReductionRatio = Double.nan
    var lossReports = 0

    /// A buffer of `size` values, reusing `b` when it has that size.
    static func sized(_ b: AlignedBuffer<Scalar>?, _ size: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        if let b, b.count == size { return b }
        return try AlignedBuffer(rows: 1, columns: size)
    }
}
