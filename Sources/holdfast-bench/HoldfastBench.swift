import ArgumentParser
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Benchmarks that need more than a pipeline of processes (see bench/run.sh for those). Not
/// shipped in the package.
@main
struct HoldfastBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "holdfast-bench",
        abstract: "Holdfast benchmarks that print numbers (see BENCHMARKS.md).",
        subcommands: [IdleStreams.self, IdleHost.self, Reconnect.self, Scale.self])
}

/// Figures read from /proc/self.
struct ProcessSample {
    var rssKiB: Int
    var peakKiB: Int
    var threads: Int
    var cpuTicks: Int
    var voluntarySwitches: Int

    static func read(pid: pid_t = getpid()) -> ProcessSample {
        var sample = ProcessSample(rssKiB: 0, peakKiB: 0, threads: 0, cpuTicks: 0, voluntarySwitches: 0)
        let status = String(decoding: slurp("/proc/\(pid)/status"), as: UTF8.self)
        for line in status.split(separator: "\n") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 2, let value = Int(fields[1]) else { continue }
            switch fields[0] {
            case "VmRSS:": sample.rssKiB = value
            case "VmHWM:": sample.peakKiB = value
            case "Threads:": sample.threads = value
            case "voluntary_ctxt_switches:": sample.voluntarySwitches = value
            default: break
            }
        }
        let stat = String(decoding: slurp("/proc/\(pid)/stat"), as: UTF8.self)
        if let close = stat.lastIndex(of: ")") {
            let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
            // utime and stime are fields 14 and 15 of stat; here indices 11 and 12 after the comm.
            if fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) { sample.cpuTicks = user + system }
        }
        return sample
    }
}

func slurp(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return [] }
    defer { close(fd) }
    var result: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 8192)
    while true {
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count <= 0 { break }
        result += buffer[..<count]
    }
    return result
}

func format(_ value: Double) -> String {
    let scaled = (value * 100).rounded() / 100
    return String(scaled)
}

/// Three decimals (CPU seconds per GiB are fractions of a second).
func format3(_ value: Double) -> String {
    let scaled = (value * 1000).rounded() / 1000
    return String(scaled)
}

/// The secret of the idle benchmark's stream `index`: its host end runs in another process, and
/// both compute the same one (a benchmark's, not a secret).
func benchSecret(_ index: Int) -> StreamSecret {
    try! StreamSecret(bytes: (0..<32).map { UInt8(truncatingIfNeeded: index >> (8 * ($0 % 8))) ^ UInt8($0) })
}

func raiseDescriptorLimit() {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    limit.rlim_cur = limit.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
}

struct IdleStreams: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "RSS and idle CPU of one process holding N connected, idle resumable streams.")

    @Option(help: "Streams to hold.") var count = 3000
    @Option(help: "Seconds to measure idle CPU over.") var seconds = 10
    @Option(help: "Bytes written through every stream at once before going idle.") var burst = 1
    @Flag(help: "Leave glibc's default allocation thresholds (for comparison).") var defaultMalloc = false

    func run() async throws {
        raiseDescriptorLimit()
        if !defaultMalloc { Memory.returnLargeBuffersToTheSystem() }
        let directory = "/tmp/holdfast-idle-\(getpid())"
        mkdir(directory, 0o700)
        defer {
            unlink(directory + "/streams.sock")
            rmdir(directory)
        }
        let address = SocketAddress.unix(path: directory + "/streams.sock")
        let baseline = ProcessSample.read()

        // The host end runs in its own process, so only the guest side is measured here.
        var options = SpawnOptions(executable: "/proc/self/exe", arguments: [
            "holdfast-bench", "idle-host", "--listen", address.description, "--count", String(count),
        ])
        options.parentDeathSignal = SIGKILL
        options.stderr = 2
        let host = try Spawner.spawn(options)
        defer {
            kill(host, SIGKILL)
            _ = Spawner.reap(host)
        }
        while access(directory + "/streams.sock", F_OK) != 0 { try await Task.sleep(for: .milliseconds(10)) }
        try await Task.sleep(for: .milliseconds(200))

        let reasons = NIOLockedValueBox<[String: Int]>([:])
        var streams: [ResumableStream<AsyncFD>] = []
        var writers: [Int32] = []
        var relays: [Task<RelayReport, Never>] = []
        let policy = RedialPolicy(attempts: 100, interval: .milliseconds(50))
        for index in 0..<count {
            let pipe = try PipeEnds.make()
            let stream = GuestStreams.resumable(
                to: address, token: Array("s\(index)".utf8), secret: benchSecret(index), direction: .send, policy: policy,
                observer: { event in
                    if case .disconnected(let reason) = event { reasons.withLockedValue { $0[reason.rawValue, default: 0] += 1 } }
                })
            stream.slot.disconnect()
            let source = try AsyncFD(adopting: pipe.read)
            relays.append(Task { await Relay.output(from: source, to: stream) })
            streams.append(stream)
            writers.append(pipe.write)
        }
        let connectStart = ContinuousClock.now
        while streams.contains(where: { $0.slot.phase != .connected }) {
            try await Task.sleep(for: .milliseconds(20))
            if ContinuousClock.now - connectStart > .seconds(60) { throw ValidationError("streams did not all connect") }
        }
        // One small write through every stream, so each has allocated and released its ring.
        let chunk = [UInt8](repeating: 0x78, count: burst)
        for writer in writers { _ = chunk.withUnsafeBytes { write(writer, $0.baseAddress, $0.count) } }
        while streams.contains(where: { $0.statistics.acknowledged < UInt64(burst) }) { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .seconds(2))  // settle: timers of the last acks expire

        let dialsBefore = streams.reduce(UInt64(0)) { $0 + $1.slot.statistics.dialAttempts }
        let before = ProcessSample.read()
        let hostBefore = ProcessSample.read(pid: host)
        try await Task.sleep(for: .seconds(seconds))
        let after = ProcessSample.read()
        let hostAfter = ProcessSample.read(pid: host)
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let cpu = Double(after.cpuTicks - before.cpuTicks) / ticks
        let hostCPU = Double(hostAfter.cpuTicks - hostBefore.cpuTicks) / ticks
        let heldBlocks = streams.reduce(0) { $0 + $1.statistics.ringBlocks }
        let dialsDuring = streams.reduce(UInt64(0)) { $0 + $1.slot.statistics.dialAttempts } - dialsBefore

        let perStream = Double(after.rssKiB - baseline.rssKiB) / Double(count)
        let cpuPercent = cpu / Double(seconds) * 100
        let switches = after.voluntarySwitches - before.voluntarySwitches
        let rows: [(String, String)] = [
            ("guest process RSS before streams", "\(baseline.rssKiB / 1024) MiB"),
            ("guest process RSS with \(count) idle streams", "\(after.rssKiB / 1024) MiB (" + format(perStream) + " KiB per stream)"),
            ("guest process peak RSS", "\(after.peakKiB / 1024) MiB"),
            ("replay-ring blocks held while idle", "\(heldBlocks)"),
            ("dials while idle (should be 0)", "\(dialsDuring) (before: \(dialsBefore))"),
            ("guest threads", "\(after.threads)"),
            ("guest CPU over \(seconds) s idle", format(cpu) + " s (" + format(cpuPercent) + " %)"),
            ("guest voluntary context switches over \(seconds) s", "\(switches)"),
            ("host process CPU over \(seconds) s idle", format(hostCPU) + " s"),
        ]
        print("idle resumable streams: \(count), connected over Unix sockets, each with a relay parked on its pipe")
        print("| measure | value |")
        print("|---|---:|")
        for (name, value) in rows { print("| \(name) | \(value) |") }
        print("disconnects by reason: \(reasons.withLockedValue { $0 })")
        try await Task.sleep(for: .milliseconds(1100))

        for writer in writers { close(writer) }
        for stream in streams { stream.close() }
        for relay in relays { _ = await relay.value }
    }
}

struct IdleHost: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The host end for idle-streams (internal).")

    @Option var listen: String
    @Option var count: Int

    func run() async throws {
        raiseDescriptorLimit()
        let server = try StreamServer(listeningOn: try SocketAddress(parsing: listen))
        var drains: [Task<Void, Never>] = []
        let reasons = NIOLockedValueBox<[String: Int]>([:])
        for index in 0..<count {
            let stream = try server.open(
                token: Array("s\(index)".utf8), direction: .receive, secret: benchSecret(index),
                observer: { event in
                    if case .disconnected(let reason) = event { reasons.withLockedValue { $0[reason.rawValue, default: 0] += 1 } }
                })
            drains.append(Task {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
                defer { buffer.deallocate() }
                while true {
                    await stream.waitReceivable()
                    if await stream.receive(into: buffer) == 0 { return }
                }
            })
        }
        server.start()
        Task {
            while true {
                try? await Task.sleep(for: .seconds(1))
                let stats = server.statistics
                let line = "idle-host: accepted \(stats.accepted) refused \(stats.refused) accept errors \(stats.acceptErrors) handshaking \(stats.handshaking) disconnects \(reasons.withLockedValue { $0 })\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
            }
        }
        for drain in drains { await drain.value }
        _ = Memory.self
    }
}
