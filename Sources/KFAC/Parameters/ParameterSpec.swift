/// One row of the parameter table: everything the library knows about a parameter. The table
/// drives validation, the typed getters and setters, the state image, `kfac_param_get_info` and,
/// through it, the bindings' parameter lists; a family adds its rows in a
/// `Parameters+<Family>.swift` file.
public struct ParameterSpec: Sendable {
    public let id: ParameterID
    /// The lower_snake_case name, also the Python property and keyword.
    public let name: StaticString
    public let type: ParameterType
    public let family: ParameterFamily
    /// Bounds; ±infinity means unbounded on that side (the value must still be finite).
    public let lower: Double
    public let upper: Double
    public let lowerInclusive: Bool
    public let upperInclusive: Bool
    public let defaultValue: Double
    public let effect: ParameterEffect
    /// Reads and writes the field of `KFACParameters` that holds the parameter. Int parameters
    /// are carried as doubles here: every int bound is below 2^53, so the conversion is exact.
    let read: @Sendable (KFACParameters) -> Double
    let write: @Sendable (inout KFACParameters, Double) -> Void

    init(_ id: ParameterID, _ name: StaticString, _ type: ParameterType, _ family: ParameterFamily,
         lower: Double, lowerInclusive: Bool = true, upper: Double, upperInclusive: Bool = true,
         default defaultValue: Double, effect: ParameterEffect,
         read: @escaping @Sendable (KFACParameters) -> Double,
         write: @escaping @Sendable (inout KFACParameters, Double) -> Void) {
        self.id = id
        self.name = name
        self.type = type
        self.family = family
        self.lower = lower
        self.upper = upper
        self.lowerInclusive = lowerInclusive
        self.upperInclusive = upperInclusive
        self.defaultValue = defaultValue
        self.effect = effect
        self.read = read
        self.write = write
    }

    /// The whole table, in ascending id order: one array per family.
    public static let table: [ParameterSpec] = (coreParameters + adaptiveParameters + ekfacParameters + distributedParameters).sorted { $0.id.rawValue < $1.id.rawValue }

    /// The position of `id`'s row in `table` (every case has exactly one row; a test checks it).
    static func rowIndex(_ id: ParameterID) -> Int {
        var low = 0, high = table.count - 1
        while low < high {
            let mid = (low + high) / 2
            if table[mid].id.rawValue < id.rawValue { low = mid + 1 } else { high = mid }
        }
        return low
    }

    /// Whether `value` is allowed: within the bounds, finite, and a whole number for int parameters.
    public func accepts(_ value: Double) -> Bool {
        guard value.isFinite else { return false }
        guard lowerInclusive ? value >= lower : value > lower else { return false }
        guard upperInclusive ? value <= upper : value < upper else { return false }
        return type == .double || value.rounded(.towardZero) == value
    }

    /// The allowed range in interval notation, for messages: "(0, 1)", "[0, 2147483647]".
    public var rangeDescription: String {
        func bound(_ v: Double) -> String {
            if v.isInfinite { return v < 0 ? "-inf" : "inf" }
            return type == .int ? String(Int64(v)) : "\(v)"
        }
        return "\(lowerInclusive ? "[" : "(")\(bound(lower)), \(bound(upper))\(upperInclusive ? "]" : ")")"
    }
}

extension ParameterSpec {
    /// Largest value of an int parameter that counts steps or reports: 2^31 − 1.
    static let periodLimit = Double(Int32.max)
}
