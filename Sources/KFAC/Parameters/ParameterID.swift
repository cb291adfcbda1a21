/// The parameters by their pinned `kfac_param` number. Numbers are banded by family (1–99 core,
/// 100–199 reserved for curvature sources, 200–299 adaptive mode, 300s Gauss-Newton, 400s EKFAC,
/// 500s distributed, 600s block-tridiagonal, 1000+ experimental); a parameter's type, bounds and
/// default come from its row in `ParameterSpec.table`, never from its number.
public enum ParameterID: Int32, Sendable, CaseIterable {
    // Core K-FAC (Parameters+Core.swift).
    case learningRate = 1
    case damping = 2
    case factorDecay = 3
    case klClip = 4
    case outputGradScale = 5
    case factorUpdatePeriod = 6
    case inverseUpdatePeriod = 7
    case inverseStrategy = 8
    case piDamping = 9
    case lossReduction = 10
    case threadCount = 11
    case inverseSpread = 12
    case asyncInversion = 13
    // Adaptive mode (Parameters+Adaptive.swift).
    case lmInterval = 200
    case lmDecay = 201
    case factorDamping = 202
    case factorDampingPeriod = 203
    case factorDampingDecay = 204
    case dampingMin = 205
    case factorDampingRatio = 206
    // EKFAC (Parameters+EKFAC.swift).
    case ekfacDecay = 400
    case ekfacMode = 401
    // Distributed runs (Parameters+Distributed.swift).
    case distributedReduce = 500

    /// This parameter's row of the table.
    public var spec: ParameterSpec { ParameterSpec.table[ParameterSpec.rowIndex(self)] }
}

/// How a parameter is read and written (`kfac_param_type`).
public enum ParameterType: Int32, Sendable {
    case double = 1
    case int = 2
}

/// The family a parameter belongs to (`kfac_family`), which is also its band of numbers.
public enum ParameterFamily: Int32, Sendable {
    case core = 0
    case adaptive = 2
    case gaussNewton = 3
    case ekfac = 4
    case distributed = 5
}

/// When a new value is first used (`kfac_param_effect`).
public enum ParameterEffect: Int32, Sendable {
    /// By the next call that uses it.
    case immediate = 0
    /// At the next step.
    case nextStep = 1
    /// At the next inverse update (it is baked into the inverses).
    case nextInversion = 2
    /// By the next record call (it scales what is recorded).
    case nextRecord = 3
}
