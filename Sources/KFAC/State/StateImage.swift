/// The state image: everything an optimizer needs to continue bit for bit. This comment is the
/// format's one description; each owner writes and reads its own section.
///
/// Layout (little-endian, all header fields 8 bytes wide):
///
///     header      "KFACSTAT"  u64 format version  u64 dtype  u64 image size
///     parameters  u64 count, then per parameter (ascending id): i64 id, then f64 for a double
///                 parameter or i64 for an int parameter (a parameter missing from an image
///                 loads as its default; an unknown id is refused as a newer format)
///     optimizer   i64 step count  f64 last ν
///     estimator   u64 statistics started  u64 layer count
///                 per layer: u64 field count, i64 fields (`LayerDescription.fields`: kind, then
///                 its sizes)
///                 per block (layer by layer, group by group):
///                   per factor (A then G): u64 has running [block scalars], u64 buffered rows
///                   [rows·width scalars], u64 summed rows [block scalars]
///                   u64 inverse strategy + 1 (0 = none), then the representation's section:
///                     Cholesky: A blocks, G blocks
///                     eigen: A eigenvectors, A eigenvalues, G eigenvectors, G eigenvalues
///                     EKFAC: the eigen section, then S (out × in scalars)
///     adaptive    u64 has previous update  u64 has prediction  f64 prediction  f64 last ρ
///                 i64 loss reports  [per block: previous update δ₀, out × in scalars, if there
///                 is one]
///     EKFAC       only when the inverse strategy is EKFAC: per block, u64 has paired statistics,
///                 then (`PairedStatistics`): u64 divisor, u64 rows [rows·in, rows·out scalars],
///                 u64 segments [u64 rows, u64 rows per example each], u64 matrices
///                 [matrices·out·in scalars]
///     links       only when the optimizer has block-tridiagonal links (so an image without
///                 links is unchanged): u64 link count, per link u64 lower layer and its cross
///                 factors A then G (u64 has running [factor], u64 paired rows [pending sum],
///                 u64 unpaired lower rows [rows], u64 unpaired upper rows [rows]), u64 has
///                 inverses, then per linked layer its tridiagonal inverse (`TridiagonalLinks`)
///     u64 checksum of all preceding bytes
///
/// Factors are stored as their diagonal blocks (`FactorStructure`), each whole and row-major.
/// Format 5 (0.2): parameters from the table; the adaptive fields and δ₀ in their own section
/// after the estimator's.
enum StateImage {
    static let magic: [UInt8] = Array("KFACSTAT".utf8)
    static let formatVersion: UInt64 = 5
    /// Bytes before the checksum-protected payload that `load` reads to validate the rest.
    static let headerSize = 32

    /// A 64-bit FNV-1a variant over 8-byte words: every step is a bijection of the running
    /// hash, so any change to a single word (or byte) always changes the result.
    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        let prime: UInt64 = 0x0000_0100_0000_01b3
        let words = bytes.count / 8
        for i in 0..<words {
            h = (h ^ bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) &* prime
        }
        for i in (words * 8)..<bytes.count { h = (h ^ UInt64(bytes[i])) &* prime }
        return h ^ (h >> 29)
    }
}
