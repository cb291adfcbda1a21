import XCTest
@testable import KFAC

/// The parameter table against the values include/kfac.h documents, written out here by hand:
/// a row that drifts from the header fails.
final class ParameterTableTests: XCTestCase {
    /// (id, name, type, default, lower, lower inclusive, upper, upper inclusive, family).
    private let documented: [(Int32, String, ParameterType, Double, Double, Bool, Double, Bool, ParameterFamily)] = [
        (1, "learning_rate", .double, 0.1, 0, true, .infinity, false, .core),
        (2, "damping", .double, 1e-3, 0, false, .infinity, false, .core),
        (3, "factor_decay", .double, 0.95, 0, true, 1, false, .core),
        (4, "kl_clip", .double, 1e-3, 0, true, .infinity, false, .core),
        (5, "output_grad_scale", .double, 1, 0, false, .infinity, false, .core),
        (6, "factor_update_period", .int, 1, 0, true, 2_147_483_647, true, .core),
        (7, "inverse_update_period", .int, 10, 0, true, 2_147_483_647, true, .core),
        (8, "inverse_strategy", .int, 1, 0, true, 2, true, .core),
        (9, "pi_damping", .int, 1, 0, true, 1, true, .core),
        (10, "loss_reduction", .int, 0, 0, true, 1, true, .core),
        (11, "num_threads", .int, 0, 0, true, 256, true, .core),
        (12, "inverse_spread", .int, 0, 0, true, 1, true, .core),
        (13, "async_inversion", .int, 0, 0, true, 2, true, .core),
        (200, "lm_interval", .int, 0, 0, true, 2_147_483_647, true, .adaptive),
        (201, "lm_decay", .double, 0.95, 0, false, 1, false, .adaptive),
        (202, "factor_damping", .double, 0, 0, true, .infinity, false, .adaptive),
        (203, "factor_damping_period", .int, 0, 0, true, 2_147_483_647, true, .adaptive),
        (204, "factor_damping_decay", .double, 0.95, 0, false, 1, false, .adaptive),
        (205, "damping_min", .double, 1e-4, 0, true, .infinity, false, .adaptive),
        (206, "factor_damping_ratio", .double, 10, 1, true, .infinity, false, .adaptive),
        (400, "ekfac_decay", .double, 0.95, 0, true, 1, false, .ekfac),
        (401, "ekfac_mode", .int, 0, 0, true, 1, true, .ekfac),
        (500, "distributed_reduce", .int, 0, 0, true, 1, true, .distributed),
    ]

    func testTableMatchesTheHeader() {
        XCTAssertEqual(ParameterSpec.table.map(\.id.rawValue), documented.map(\.0), "one row per parameter, ascending")
        XCTAssertEqual(Set(ParameterID.allCases.map(\.rawValue)), Set(documented.map(\.0)))
        for (id, name, type, value, lower, lowerIn, upper, upperIn, family) in documented {
            let spec = ParameterID(rawValue: id)!.spec
            XCTAssertEqual(spec.id.rawValue, id)
            XCTAssertEqual("\(spec.name)", name)
            XCTAssertEqual(spec.type, type, name)
            XCTAssertEqual(spec.defaultValue, value, name)
            XCTAssertEqual(spec.lower, lower, name)
            XCTAssertEqual(spec.lowerInclusive, lowerIn, name)
            XCTAssertEqual(spec.upper, upper, name)
            XCTAssertEqual(spec.upperInclusive, upperIn, name)
            XCTAssertEqual(spec.family, family, name)
            // The band of the number is the family's.
            XCTAssertEqual(family == .core ? 0 : Int(family.rawValue), Int(id) / 100, name)
        }
    }

    func testDefaultsComeFromTheTable() {
        let p = KFACParameters()
        XCTAssertEqual(p.learningRate, 0.1)
        XCTAssertEqual(p.damping, 1e-3)
        XCTAssertEqual(p.factorDecay, 0.95)
        XCTAssertEqual(p.klClip, 1e-3)
        XCTAssertEqual(p.outputGradScale, 1)
        XCTAssertEqual(p.factorUpdatePeriod, 1)
        XCTAssertEqual(p.inverseUpdatePeriod, 10)
        XCTAssertEqual(p.inverseStrategy, .eigen)
        XCTAssertEqual(p.piDamping, true)
        XCTAssertEqual(p.lossReduction, .sum)
        XCTAssertEqual(p.threadCount, 0)
        XCTAssertEqual(p.lmInterval, 0)
        XCTAssertEqual(p.lmDecay, 0.95)
        XCTAssertEqual(p.factorDamping, 0)
        XCTAssertEqual(p.factorDampingPeriod, 0)
        XCTAssertEqual(p.factorDampingDecay, 0.95)
        XCTAssertNoThrow(try p.validate())
        for spec in ParameterSpec.table { XCTAssertEqual(p[spec.id], spec.defaultValue, "\(spec.name)") }
    }

    /// Every bound, from both sides, through the typed setters and through `validate` (the two
    /// paths that drifted apart in 0.1: a Swift caller could store a period the C setter refused).
    func testBoundsAreEnforcedAtEveryEdge() throws {
        let p = KFACParameters()
        for spec in ParameterSpec.table {
            let step = spec.type == .int ? 1.0 : Swift.max(1e-9, spec.lower.magnitude * 1e-9)
            var outside: [Double] = [.nan, .infinity, -.infinity]
            var inside: [Double] = []
            if spec.lower.isFinite {
                if spec.lowerInclusive { inside.append(spec.lower) } else { outside.append(spec.lower) }
                outside.append(spec.lower - step)
            }
            if spec.upper.isFinite {
                if spec.upperInclusive { inside.append(spec.upper) } else { outside.append(spec.upper) }
                outside.append(spec.upper + (spec.type == .int ? 1 : spec.upper * 1e-9))
                if !spec.upperInclusive { inside.append(spec.upper.nextDown) }
            }
            for v in outside {
                if spec.type == .double {
                    XCTAssertThrowsError(try p.setting(spec.id, v), "\(spec.name) = \(v)")
                } else if v.isFinite {
                    XCTAssertThrowsError(try p.setting(spec.id, Int64(v)), "\(spec.name) = \(v)")
                }
                var q = p
                spec.write(&q, v.isFinite || spec.type == .double ? v : 0)
                // Enum and flag fields cannot hold an out-of-range value; every other field can.
                if !(spec.type == .int && !v.isFinite) && (q[spec.id] == v || v.isNaN) {
                    XCTAssertThrowsError(try q.validate(), "validate \(spec.name) = \(v)")
                }
            }
            for v in inside {
                let q = spec.type == .double ? try p.setting(spec.id, v) : try p.setting(spec.id, Int64(v))
                XCTAssertEqual(q[spec.id], v, "\(spec.name)")
            }
            // The wrong typed setter is a type error, not a range error.
            var wrongType: KFACStatus?
            do throws(KFACError) {
                _ = spec.type == .double ? try p.setting(spec.id, Int64(0)) : try p.setting(spec.id, 0.5)
            } catch {
                wrongType = error.status
            }
            XCTAssertEqual(wrongType, .parameterType, "\(spec.name)")
        }
    }
}
