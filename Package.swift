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
        // The supervisor's parts as Services in a ServiceGroup (ordered graceful shutdown).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // HMAC-SHA256 of stream hellos and of the bridge's handshake (HoldfastCore); SHA-256 of
        // relayed streams in the tests and holdfast-soak.
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // C for what Swift cannot import: CMSG_* macros, sockaddr_vm, ioctl numbers, fork+exec.
        .target(name: "CHoldfastShims"),
        // Test-only: adversaries that need ioctl(2), which Swift cannot call (never shipped).
        .target(name: "CHoldfastTestShims"),
        // libseccomp, from Debian's libseccomp-dev (the broker's filter).
        .systemLibrary(name: "CSeccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        // Every wire message, request enum and error type: codecs only, no I/O.
        .target(name: "HoldfastProtocol", swiftSettings: strict),
        // Pure logic, no syscalls: ConnSlot, ReplayRing, resumable streams, relays, the RPC loop, timeouts.
        // Crypto: HMAC-SHA256 of stream hellos and of the bridge handshake (pure computation).
        .target(
            name: "HoldfastCore",
            dependencies: [
                "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        // Thin, tested wrappers over syscalls: reactor, fds, sockets, pipes, ptys, spawn, privileges.
        .target(
            name: "HoldfastPosix",
            dependencies: [
                "CHoldfastShims",
                "HoldfastCore",
                "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict),
        // The daemon's log handler (journald-friendly lines on stderr).
        .target(
            name: "HoldfastLogging",
            dependencies: [
                "HoldfastProtocol",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // The host side: stream listeners, the bridge server, and the host agent (`holdfast host serve`
        // and its clients).
        .target(
            name: "HoldfastHost",
            dependencies: [
                "HoldfastCore",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // The daemon's configuration: file (YAML/JSON) + environment, checked key by key.
        .target(
            name: "HoldfastConfig",
            dependencies: [
                "HoldfastCore",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "Configuration", package: "swift-configuration"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict),
        // The broker role: owns every stdio fd, the streams and relays; its own seccomp profile.
        .target(
            name: "HoldfastBroker",
            dependencies: [
                "CHoldfastShims",
                "CSeccomp",
                "HoldfastCore",
                "HoldfastLogging",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict),
        // The supervisor role: `holdfast daemon` (never imports the broker: the broker is a process it starts).
        .target(
            name: "HoldfastSupervisor",
            dependencies: [
                "CSeccomp",
                "HoldfastConfig",
                "HoldfastCore",
                "HoldfastLogging",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict),
        // The bridge worker role.
        .target(
            name: "HoldfastBridge",
            dependencies: [
                "HoldfastCore",
                "HoldfastLogging",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // The guest-side utilities and demos: status, pipe/receive, probes, the migration and raw demos.
        .target(
            name: "HoldfastTools",
            dependencies: [
                "CHoldfastShims",
                "HoldfastBroker",
                "HoldfastCore",
                "HoldfastHost",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // The executable: argument parsing only.
        .executableTarget(
            name: "holdfast",
            dependencies: [
                "HoldfastBridge",
                "HoldfastBroker",
                "HoldfastConfig",
                "HoldfastCore",
                "HoldfastHost",
                "HoldfastLogging",
                "HoldfastPosix",
                "HoldfastProtocol",
                "HoldfastSupervisor",
                "HoldfastTools",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // Fuzz targets (README "Fuzzing"): the harnesses, and one executable that is libFuzzer's
        // driver in a fuzz build (`make fuzz`) and a replayer of inputs in a normal build.
        .target(
            name: "HoldfastFuzzing",
            dependencies: [
                "HoldfastBridge",
                "HoldfastBroker",
                "HoldfastConfig",
                "HoldfastCore",
                "HoldfastPosix",
                "HoldfastProtocol",
                "HoldfastSupervisor",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .target(name: "CFuzzerDriver"),
        .executableTarget(name: "holdfast-fuzz", dependencies: ["CFuzzerDriver", "HoldfastFuzzing"], swiftSettings: strict),
        // Benchmarks that print numbers (not shipped).
        .executableTarget(
            name: "holdfast-bench",
            dependencies: [
                "HoldfastCore",
                "HoldfastHost",
                "HoldfastPosix",
                "HoldfastProtocol",
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
                "HoldfastCore",
                "HoldfastHost",
                "HoldfastLogging",
                "HoldfastPosix",
                "HoldfastProtocol",
                "HoldfastTestSupport",
                "HoldfastTools",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        // Fakes and helpers shared by every test target: in-memory and fault-injecting
        // connections, bounded waits, child-process helpers.
        .target(
            name: "HoldfastTestSupport",
            dependencies: [
                "HoldfastCore",
                "HoldfastPosix",
                "HoldfastProtocol",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastProtocolTests",
            dependencies: [
                "HoldfastProtocol",
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastCoreTests",
            dependencies: [
                "HoldfastCore",
                "HoldfastProtocol",
                "HoldfastTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastPosixTests",
            dependencies: [
                "CHoldfastShims",
                "CHoldfastTestShims",
                "HoldfastCore",
                "HoldfastPosix",
                "HoldfastProtocol",
                "HoldfastTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastHostTests",
            dependencies: [
                "HoldfastCore",
                "HoldfastHost",
                "HoldfastPosix",
                "HoldfastProtocol",
                "HoldfastTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastConfigTests",
            dependencies: [
                "HoldfastConfig",
                "HoldfastCore",
                "HoldfastTestSupport",
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastDaemonTests",
            dependencies: [
                "CHoldfastTestShims",
                "HoldfastCore",
                "HoldfastHost",
                "HoldfastPosix",
                "HoldfastProtocol",
                "HoldfastSupervisor",
                "HoldfastTestSupport",
                "HoldfastTools",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastToolsTests",
            dependencies: [
                "HoldfastLogging", "HoldfastProtocol", "HoldfastTestSupport", "HoldfastTools",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "HoldfastFuzzTests",
            dependencies: [
                "HoldfastBridge",
                "HoldfastBroker",
                "HoldfastCore",
                "HoldfastFuzzing",
                "HoldfastProtocol",
                "HoldfastSupervisor",
            ],
            swiftSettings: strict),
    ]
)
