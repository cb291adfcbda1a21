// The samplers of model targets: kfac_sample_* of include/kfac.h (no handle).

import KFAC
import _KFACHeader

/// Validates the arguments of the handle-less samplers and runs one.
private func sample<S: KFACScalar>(
    _ outputs: UnsafePointer<S>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ out: UnsafeMutablePointer<S>?,
    _ body: (OutputDistribution, UnsafePointer<S>, Int, Int, UnsafeMutablePointer<S>) -> Void
) -> Int32 {
    do throws(KFACError) {
        let z = try required(outputs, "outputs"), o = try required(out, "out")
        guard rows >= 1, dim >= 1 else { throw KFACError(.invalidSize, "rows and output_dim must be >= 1") }
        let (count, overflow) = Int(rows).multipliedReportingOverflow(by: Int(dim))
        guard !overflow else { throw KFACError(.sizeOverflow, "rows × output_dim overflows") }
        let d = try distribution(dist)
        guard S.allFinite(z, count: count) else { throw KFACError(.nonFinite, "outputs contain NaN or Inf") }
        body(d, z, Int(rows), Int(dim), o)
        return KFACStatus.ok.rawValue
    } catch {
        return error.status.rawValue
    }
}

@c @implementation
public func kfac_sample_targets_f32(_ outputs: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                    _ seed: UInt64, _ targets: UnsafeMutablePointer<Float>?) -> Int32 {
    sample(outputs, rows, dim, dist, targets) { d, z, r, c, o in
        TargetSampler.sampleTargets(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}

@c @implementation
public func kfac_sample_targets_f64(_ outputs: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                    _ seed: UInt64, _ targets: UnsafeMutablePointer<Double>?) -> Int32 {
    sample(outputs, rows, dim, dist, targets) { d, z, r, c, o in
        TargetSampler.sampleTargets(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}

@c @implementation
public func kfac_sample_output_grads_f32(_ outputs: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                          _ seed: UInt64, _ grads: UnsafeMutablePointer<Float>?) -> Int32 {
    sample(outputs, rows, dim, dist, grads) { d, z, r, c, o in
        TargetSampler.sampledOutputGradients(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}

@c @implementation
public func kfac_sample_output_grads_f64(_ outputs: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                          _ seed: UInt64, _ grads: UnsafeMutablePointer<Double>?) -> Int32 {
    sample(outputs, rows, dim, dist, grads) { d, z, r, c, o in
        TargetSampler.sampledOutputGradients(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}
