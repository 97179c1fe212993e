import ArgumentParser
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// 1,000 containers' worth of streams in one real daemon's broker while 100 of them stream at
/// full speed: aggregate throughput, per-stream fairness, the broker's RSS and CPU.
struct Scale: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A real daemon holding N processes × 3 streams while some stream at full speed (needs root).")

    @Option(help: "Processes (each with stdin, stdout and stderr streams).") var processes = 1000
    @Option(help: "How many of them write their stdout at full speed.") var busy = 100
    @Option(help: "Bytes each busy process writes.") var bytes = 32 << 20
    @Option(help: "The single-stream resumable relay's CPU seconds per GiB (bench/run.sh), to print the ratio against.")
    var referenceCpuPerGib: Double?

    func run() async throws {
        guard geteuid() == 0 else {
            print("holdfast-bench scale needs root (the daemon's broker runs as a uid of its own)")
            throw ExitCode(2)
        }
        raiseDescriptorLimit()
        let directory = "/tmp/holdfast-scale-\(getpid())"
        mkdir(directory, 0o755)
        chmod(directory, 0o755)
        defer { FileTree.remove(directory) }

        let streams = try StreamServer(
            listeningOn: .unix(path: directory + "/streams.sock"), unixMode: 0o666, maxConcurrentHandshakes: 8192)
        streams.start()
        let key = try BridgeKeyFile.loadOrCreate(directory + "/bridge.key").key
        let bridge = try BridgeServer(listeningOn: .unix(path: directory + "/bridge.sock"), authentication: .key(key), unixMode: 0o666)
        bridge.start()
        defer {
            streams.close()
            bridge.close()
        }
        let config = """
            run_directory: \(directory)
            bridge:
              address: "unix:{run}/bridge.sock"
              key_file: "{run}/bridge.key"
            broker:
              user: "uid:\(ReservedUIDs.unused())"
            streams:
              redial_attempts: 600
              redial_interval: 100ms
              connect_timeout: 5s
              drain_timeout: 60s
            shutdown:
              grace: 2s
              timeout: 20s
            """
        try WholeFile.write(directory + "/holdfast.yaml", Array(config.utf8))
        let executable = siblingExecutable("holdfast")
        var options = SpawnOptions(executable: executable, arguments: [executable, "daemon", "--config", directory + "/holdfast.yaml"])
        let log = open(directory + "/daemon.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        options.stdout = log
        options.stderr = log
        options.parentDeathSignal = SIGKILL
        let daemon = try Spawner.spawn(options)
        close(log)
        defer {
            kill(daemon, SIGKILL)
            _ = Spawner.reap(daemon)
        }
        var control: ControlClient?
        for _ in 0..<200 where control == nil {
            control = try? await ControlClient.connect(to: directory + "/control.sock")
            if control == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        guard let control else { throw ValidationError("the daemon did not start; see \(directory)/daemon.log") }
        defer { control.close() }
        var report = try await control.call(SupervisorRequest.status, reply: StatusReport.self)
        while report.roles.contains(where: { $0.pid == nil }) || report.bridge != .up {
            try await Task.sleep(for: .milliseconds(50))
            report = try await control.call(SupervisorRequest.status, reply: StatusReport.self)
        }
        guard let brokerPID = report.roles.first(where: { $0.name == "broker" })?.pid else { throw ValidationError("no broker") }
        let address = "unix:" + directory + "/streams.sock"
        let brokerBaseline = ProcessSample.read(pid: brokerPID)

        // Idle processes first: every stream connected and quiet.
        let idle = processes - busy
        let started = ContinuousClock.now
        for index in 0..<idle {
            let id = "idle\(index)"
            let out = try streams.open(token: Array("\(id)-out".utf8), direction: .receive)
            let err = try streams.open(token: Array("\(id)-err".utf8), direction: .receive)
            let input = try streams.open(token: Array("\(id)-in".utf8), direction: .send)
            _ = try await control.call(
                SupervisorRequest.launch(ProcessSpec(
                    id: id, argv: ["sleep", "3600"], stdin: input.streamSpec(at: address),
                    stdout: out.streamSpec(at: address), stderr: err.streamSpec(at: address))),
                reply: LaunchResponse.self)
        }
        let launched = ContinuousClock.now - started
        while true {
            let list = try await control.call(SupervisorRequest.status, reply: StatusReport.self)
            let states = list.streamStates ?? [:]
            if states["connected", default: 0] >= idle * 3 { break }
            if ContinuousClock.now - started > .seconds(300) {
                throw ValidationError("idle streams did not all connect: \(states) of \(idle * 3); see \(directory)/daemon.log")
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        let idleSample = ProcessSample.read(pid: brokerPID)

        // The busy ones, all at once: each writes `bytes` to stdout as fast as it can.
        let finish = NIOLockedValueBox<[(first: ContinuousClock.Instant, last: ContinuousClock.Instant, bytes: Int)]>([])
        var consumers: [Task<Void, Never>] = []
        var specs: [(stdin: StreamSpec, stdout: StreamSpec, stderr: StreamSpec)] = []
        for index in 0..<busy {
            let id = "busy\(index)"
            let output = try streams.open(token: Array("\(id)-out".utf8), direction: .receive)
            let err = try streams.open(token: Array("\(id)-err".utf8), direction: .receive)
            let input = try streams.open(token: Array("\(id)-in".utf8), direction: .send)
            specs.append((input.streamSpec(at: address), output.streamSpec(at: address), err.streamSpec(at: address)))
            consumers.append(Task {
                var first: ContinuousClock.Instant?
                var total = 0
                for await chunk in output.chunks() {
                    if first == nil { first = .now }
                    total += chunk.count
                }
                let done = ContinuousClock.now
                finish.withLockedValue { $0.append((first ?? done, done, total)) }
            })
        }
        let cpuBefore = ProcessSample.read(pid: brokerPID)
        let busyStart = ContinuousClock.now
        for index in 0..<busy {
            let id = "busy\(index)"
            _ = try await control.call(
                SupervisorRequest.launch(ProcessSpec(
                    id: id, argv: ["head", "-c", String(bytes), "/dev/zero"], stdin: specs[index].stdin,
                    stdout: specs[index].stdout, stderr: specs[index].stderr)),
                reply: LaunchResponse.self)
        }
        for consumer in consumers { await consumer.value }
        let busyEnd = ContinuousClock.now
        let cpuAfter = ProcessSample.read(pid: brokerPID)
        // The buffer pools give back what a burst no longer uses after two quiet trim intervals.
        try await Task.sleep(for: .seconds(5))
        let settled = ProcessSample.read(pid: brokerPID)

        let results = finish.withLockedValue { $0 }
        let total = results.reduce(0) { $0 + $1.bytes }
        let seconds = Double((busyEnd - busyStart).components.attoseconds) / 1e18 + Double((busyEnd - busyStart).components.seconds)
        // Each stream's own rate, first byte to last: launches are sequential, so a stream that
        // starts later is not counted as slower.
        let rates = results.map { result -> Double in
            let span = result.last - result.first
            return Double(result.bytes) / (Double(span.components.seconds) + Double(span.components.attoseconds) / 1e18)
        }
        let complete = results.filter { $0.bytes == bytes }.count
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let brokerCPU = Double(cpuAfter.cpuTicks - cpuBefore.cpuTicks) / ticks
        let brokerPerGiB = brokerCPU / (Double(total) / Double(1 << 30))
        let rows: [(String, String)] = [
            ("processes / streams in the broker", "\(processes) / \(processes * 3)"),
            ("launching \(idle) idle processes", format(Double(launched.components.seconds) + Double(launched.components.attoseconds) / 1e18) + " s"),
            ("busy streams complete (every byte)", "\(complete) of \(busy)"),
            ("bytes through busy streams", "\(total >> 20) MiB in " + format(seconds) + " s"),
            ("aggregate throughput", format(Double(total) / seconds / 1e9) + " GB/s"),
            ("per-stream throughput min / max", format((rates.min() ?? 0) / 1e6) + " / " + format((rates.max() ?? 0) / 1e6) + " MB/s"),
            ("fairness (min / max)", format((rates.min() ?? 0) / max(1, rates.max() ?? 1))),
            ("broker RSS: empty / \(idle * 3) idle streams / after the burst",
             "\(brokerBaseline.rssKiB / 1024) / \(idleSample.rssKiB / 1024) / \(cpuAfter.rssKiB / 1024) MiB"),
            ("broker RSS 5 s after the burst", "\(settled.rssKiB / 1024) MiB"),
            ("broker CPU during the burst", format(brokerCPU) + " s (" + format(brokerCPU / seconds * 100) + " % of one core)"),
            ("broker CPU per GiB relayed", format3(brokerPerGiB) + " s"),
            ("broker threads", "\(cpuAfter.threads)"),
        ]
        print("scale: a real daemon, \(processes) processes × 3 resumable streams over Unix sockets; \(busy) write \(bytes >> 20) MiB each at once")
        print("| measure | value |")
        print("|---|---:|")
        for (name, value) in rows { print("| \(name) | \(value) |") }
        if let reference = referenceCpuPerGib, reference > 0 {
            let ratio = brokerPerGiB / reference
            print(
                "broker CPU per GiB, \(busy) busy of \(processes * 3) streams / single-stream resumable relay's = "
                    + format(ratio) + "  (target <= 1.5) " + (ratio <= 1.5 ? "ok" : "MISS"))
        }
        kill(daemon, SIGTERM)
        _ = try? await Spawner.waitForExit(daemon)
        if complete != busy { throw ExitCode(1) }
    }
}

/// A program installed next to this one.
func siblingExecutable(_ name: String) -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let me = String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return me.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/") + "/" + name
}
