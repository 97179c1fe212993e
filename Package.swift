// swift-tools-version: 6.2
import PackageDescription

let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    // A nonisolated async function runs on its caller's executor (SE-0461) instead of hopping
    // to the global one at every call: on the data plane, whose tasks prefer the reactor's
    // thread, each such hop was a look-up of the task's preferred executor under a lock.
    .enableUpcomingFeature("NonisolatedNonsendingByDefault"),
]

let package = Package(
    name: "holdfast",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "holdfast", targets: ["holdfast"]),
        .library(name: "HoldfastCore", targets: ["HoldfastCore"]),
        .library(name: "HoldfastPosix", targets: ["HoldfastPosix"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-configuration", from: "1.4.0", traits: [.defaults, "YAML"]),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // HMAC-SHA256 of stream hellos and of the bridge's handshake (HoldfastCore); SHA-256 of
        // relayed streams in the tests and holdfast-soak.
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // C for what Swift cannot import: CMSG_* macros, sockaddr_vm, ioctl numbers, fork+exec.
        .target(name: "CHoldfastShims"),
        // libseccomp, from Debian's libseccomp-dev.
        .systemLibrary(name: "CSeccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        // Pure logic: ConnSlot, redial policy, registry, relays over abstract connections.
        // Codecs: resumable stream frames, bridge frames, broker control messages.
        .target(name: "HoldfastProtocol", swiftSettings: strict),
        .target(
            name: "HoldfastCore",
            dependencies: [
                "HoldfastProtocol", .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                // HMAC-SHA256 of stream hellos and of the bridge's handshake (pure computation).
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        // Thin, tested wrappers over syscalls: reactor, fds, sockets, addresses, pipes, ptys.
        .target(
            name: "HoldfastPosix",
            dependencies: [
                "CHoldfastShims", "CSeccomp", "HoldfastCore", "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict),
        // The host side: stream listeners (and later the bridge server), for tools, tests and
        // host agents.
        .target(
            name: "HoldfastHost",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // The daemon's configuration: file (YAML/JSON) + environment, checked key by key.
        .target(
            name: "HoldfastConfig",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol",
                .product(name: "Configuration", package: "swift-configuration"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict),
        // The broker role: owns every stdio fd, the streams and relays; seccomp-confined.
        .target(
            name: "HoldfastBroker",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict),
        // The supervisor role: `holdfast daemon`.
        .target(
            name: "HoldfastSupervisor",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol", "HoldfastConfig", "HoldfastBroker",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict),
        // The bridge worker role.
        .target(
            name: "HoldfastBridge",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // Drivers for the demo and the command-line utilities.
        .target(
            name: "HoldfastTools",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastHost", "HoldfastProtocol", "HoldfastSupervisor", "HoldfastBroker",
                "HoldfastBridge", "HoldfastConfig", "CHoldfastShims",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // The executable: argument parsing only.
        .executableTarget(
            name: "holdfast",
            dependencies: [
                "HoldfastCore", "HoldfastTools", "HoldfastPosix", "HoldfastProtocol", "HoldfastSupervisor", "HoldfastBroker",
                "HoldfastBridge", "HoldfastConfig",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // Fuzz targets (README "Fuzzing"): the harnesses, and one executable that is libFuzzer's
        // driver in a fuzz build (`make fuzz`) and a replayer of inputs in a normal build.
        .target(
            name: "HoldfastFuzzing",
            dependencies: [
                "HoldfastBridge", "HoldfastBroker", "HoldfastConfig", "HoldfastCore", "HoldfastPosix", "HoldfastProtocol",
                "HoldfastSupervisor",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .target(name: "CFuzzerDriver"),
        .executableTarget(name: "holdfast-fuzz", dependencies: ["CFuzzerDriver", "HoldfastFuzzing"], swiftSettings: strict),
        // Fakes and helpers shared by every test target: in-memory and fault-injecting
        // connections, bounded waits, child-process helpers.
        // Benchmarks that print numbers (not shipped).
        .executableTarget(
            name: "holdfast-bench",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastHost", "HoldfastProtocol",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            swiftSettings: strict),
        // The soak: a real daemon under a churning workload, migrations and bridge kills for
        // N minutes; checks every byte and exit (not shipped; `make soak`, RELIABILITY.md).
        .executableTarget(
            name: "holdfast-soak",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastHost", "HoldfastProtocol",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        .target(
            name: "HoldfastTestSupport",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastHostTests",
            dependencies: [
                "HoldfastHost", "HoldfastCore", "HoldfastPosix", "HoldfastProtocol", "HoldfastTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastConfigTests", dependencies: ["HoldfastConfig", "HoldfastCore", "HoldfastTestSupport"], swiftSettings: strict),
        .testTarget(
            name: "HoldfastDaemonTests",
            dependencies: [
                "HoldfastCore", "HoldfastPosix", "HoldfastProtocol", "HoldfastHost", "HoldfastTestSupport", "HoldfastSupervisor", "HoldfastTools",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastToolsTests",
            dependencies: [
                "HoldfastTools", "HoldfastTestSupport", "HoldfastHost", "HoldfastProtocol", "HoldfastCore", "HoldfastPosix",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(name: "HoldfastProtocolTests", dependencies: ["HoldfastProtocol"], swiftSettings: strict),
        .testTarget(
            name: "HoldfastFuzzTests",
            dependencies: [
                "HoldfastFuzzing", "HoldfastBridge", "HoldfastBroker", "HoldfastConfig", "HoldfastCore", "HoldfastProtocol",
                "HoldfastSupervisor",
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastCoreTests",
            dependencies: [
                "HoldfastCore", "HoldfastProtocol", "HoldfastTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastPosixTests",
            dependencies: [
                "HoldfastPosix", "HoldfastCore", "HoldfastProtocol", "HoldfastTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
    ]
)
