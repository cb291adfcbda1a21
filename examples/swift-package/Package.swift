// swift-tools-version:6.0
// An example package that depends on libkfac as another project would and uses its Swift API,
// the `KFAC` product. Here the dependency is by path (this checkout); elsewhere it would be
//     .package(url: "<libkfac git URL>", branch: "main")   with   .product(name: "KFAC", package: "libkfac")
// (the package name in .product is the dependency's identity: the last component of its URL or
// path, so for a path dependency the checkout directory's name, read below).
import Foundation
import PackageDescription

let libkfacPath = "../.."
let libkfacIdentity = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .appendingPathComponent(libkfacPath).standardizedFileURL.lastPathComponent.lowercased()

let package = Package(
    name: "kfac-swift-package-example",
    dependencies: [.package(path: libkfacPath)],
    targets: [
        .executableTarget(name: "TrainDigits", dependencies: [.product(name: "KFAC", package: libkfacIdentity)]),
    ]
)
