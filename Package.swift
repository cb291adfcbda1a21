// swift-tools-version:6.0
import PackageDescription

/// The package root, for linker inputs that must be given as absolute paths.
let packageRoot = String(#filePath.dropLast("Package.swift".count))

let package = Package(
    name: "libkfac",
    products: [
        // The C ABI: libkfac.so, described by include/kfac.h.
        .library(name: "kfac", type: .dynamic, targets: ["KFACCAPI"]),
        // The Swift-native API.
        .library(name: "KFAC", targets: ["KFAC"]),
    ],
    targets: [
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS"),
        .systemLibrary(name: "CLAPACKE", path: "Sources/CLAPACKE"),
        .target(name: "KFAC", dependencies: ["CBLAS", "CLAPACKE"]),
        .target(
            name: "KFACCAPI",
            dependencies: ["KFAC"],
            exclude: ["exports.map"],
            linkerSettings: [.unsafeFlags([
                "-Xlinker", "-soname=libkfac.so.0",
                "-Xlinker", "--version-script=\(packageRoot)Sources/KFACCAPI/exports.map",
            ])]
        ),
        .testTarget(name: "KFACTests", dependencies: ["KFAC", "CBLAS", "AllocationCounter"]),
        // Interposes malloc in the executables that link it, to count allocations.
        .target(name: "AllocationCounter", path: "benchmarks/allocation-counter"),
        .executableTarget(name: "kfac-swift-example", dependencies: ["KFAC", "CBLAS"], path: "examples/swift"),
        .executableTarget(name: "kfac-bench", dependencies: ["KFAC", "CBLAS", "CLAPACKE", "AllocationCounter"],
                          path: "benchmarks/swift"),
    ],
    swiftLanguageModes: [.v5]
)
