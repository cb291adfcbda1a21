// swift-tools-version:6.0
import Foundation
import PackageDescription

/// The package root, for linker inputs that must be given as absolute paths.
let packageRoot = String(#filePath.dropLast("Package.swift".count))

/// The version is written once, in include/kfac.h; the SONAME follows the header's policy:
/// libkfac.so.0.MINOR while the major version is 0, libkfac.so.MAJOR from 1.0 on.
func headerVersion(_ part: String) -> String {
    let header = (try? String(contentsOfFile: packageRoot + "include/kfac.h", encoding: .utf8)) ?? ""
    for line in header.split(separator: "\n") where line.hasPrefix("#define KFAC_VERSION_\(part) ") {
        return String(line.split(separator: " ").last ?? "0")
    }
    return "0"
}
let soname = headerVersion("MAJOR") == "0" ? "libkfac.so.0.\(headerVersion("MINOR"))" : "libkfac.so.\(headerVersion("MAJOR"))"

let package = Package(
    name: "libkfac",
    products: [
        // The C ABI: libkfac.so, described by include/kfac.h.
        .library(name: "kfac", type: .dynamic, targets: ["KFACCAPI"]),
        // The Swift-native API.
        .library(name: "KFAC", targets: ["KFAC"]),
    ],
    targets: [
        // MARK: - Public API
        .target(name: "KFAC", dependencies: ["CBLAS", "CLAPACKE"]),
        .target(
            name: "KFACCAPI",
            dependencies: ["KFAC", "_KFACHeader"],
            exclude: ["exports.map"],
            linkerSettings: [.unsafeFlags([
                "-Xlinker", "-soname=\(soname)",
                "-Xlinker", "--version-script=\(packageRoot)Sources/KFACCAPI/exports.map",
            ])]
        ),

        // MARK: - Implementation details
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS"),
        .systemLibrary(name: "CLAPACKE", path: "Sources/CLAPACKE"),
        // include/kfac.h as the C layer sees it (experimental section included), so every
        // `@c @implementation` export is checked against its declaration. Not API.
        .systemLibrary(name: "_KFACHeader", path: "Sources/_KFACHeader"),
        // Interposes malloc in the executables that link it, to count allocations (tests and
        // benchmarks). Not API.
        .target(name: "AllocationCounter", path: "Sources/_AllocationCounter"),

        // MARK: - Unit test bundles
        .testTarget(name: "KFACTests", dependencies: ["KFAC", "CBLAS", "AllocationCounter"]),

        // MARK: - Examples and benchmarks
        .executableTarget(name: "kfac-swift-example", dependencies: ["KFAC", "CBLAS"], path: "examples/swift"),
        .executableTarget(name: "kfac-bench", dependencies: ["KFAC", "CBLAS", "CLAPACKE", "AllocationCounter"],
                          path: "benchmarks/swift"),
    ],
    swiftLanguageModes: [.v5]
)
