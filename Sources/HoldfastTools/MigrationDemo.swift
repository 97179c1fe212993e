import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast demo` (and `make demo`): the whole path on one machine. A real `holdfast daemon`
/// (supervisor, seccomp-confined broker, bridge worker) and an in-process host peer on Unix
/// sockets in a temp dir; the host creates a heartbeat process over the bridge, performs
/// migrations (every connection dropped, nothing accepted for the blackout), prints the counter
/// as it arrives with a marker at each migration, and judges: every number once, in order, and
/// the exit reported once.
public enum MigrationDemo {
    public struct Verdict: Sendable, Equatable {
        public var received: [Int]
        public var expected: Int
        public var exitCode: Int32?
        public var exitsReported: Int
        public var duplicates: Int { received.count - Set(received).count }
        public var missing: Int { Set(1...expected).subtracting(received).count }
        public var inOrder: Bool { received == received.sorted() }
        public var passed: Bool { received == Array(1...expected) && exitCode == 0 && exitsReported == 1 }
    }

    public static func run(
        beats: Int = 60, interval: Duration = .milliseconds(50), migrations: Int = 3, blackout: Duration = .milliseconds(500),
        executable: String, say: @escaping @Sendable (String) -> Void
    ) async throws -> Verdict {
        guard geteuid() == 0 else {
            throw HoldfastError(.needsRoot, "the demo starts the daemon, which needs root (its broker runs as a uid of its own): run it as root, e.g. sudo make demo")
        }
        let directory = try makeTemporaryDirectory("holdfast-demo")
        chmod(directory, 0o755)  // the broker, unprivileged, dials the sockets in here
        defer { FileTree.remove(directory) }

        // The VM's bridge key, as a host agent provisions it: written before the guest starts.
        let key = try BridgeKeyFile.loadOrCreate(directory + "/bridge.key").key
        let service = try HostService(
            bridge: .unix(path: directory + "/host-bridge.sock"), bridgeKey: key,
            streams: .unix(path: directory + "/host-streams.sock"), control: directory + "/host.sock"
        ) { line in
            if line.hasPrefix("---") { say(line) }
        }
        defer { service.close() }
        let serving = Task { await service.run() }
        defer { serving.cancel() }

        let config = """
            run_directory: \(directory)
            bridge:
              address: "unix:{run}/host-bridge.sock"
              key_file: "{run}/bridge.key"
              reconnect_initial: 20ms
              reconnect_max: 200ms
            broker:
              user: "uid:\(ReservedUIDs.unused())"
            streams:
              redial_interval: 20ms
              redial_attempts: 500
            shutdown:
              grace: 1s
              timeout: 5s
            """
        try WholeFile.write(directory + "/holdfast.yaml", Array(config.utf8))
        let log = open(directory + "/daemon.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        var options = SpawnOptions(executable: executable, arguments: [executable, "daemon", "--config", directory + "/holdfast.yaml"])
        options.stdout = log
        options.stderr = log
        options.parentDeathSignal = SIGKILL
        let daemon = try Spawner.spawn(options)
        close(log)
        do {
            let verdict = try await drive(
                service: service, directory: directory, daemon: daemon, beats: beats, interval: interval, migrations: migrations,
                blackout: blackout, say: say)
            await stop(daemon, say: say)
            return verdict
        } catch {
            await stop(daemon, say: say)
            throw error
        }
    }

    /// SIGTERM and a bounded wait (the daemon shuts down gracefully), then SIGKILL.
    private static func stop(_ daemon: pid_t, say: @Sendable (String) -> Void) async {
        // The SIGKILL goes through a pidfd: sent by number after the waiter reaped the daemon
        // (the timer's sleep ending as it is cancelled), it reached whatever process the
        // kernel gave the number to next.
        let pidfd = PidFD.open(daemon)
        defer { if pidfd >= 0 { close(pidfd) } }
        kill(daemon, SIGTERM)
        let waiter = Task { try? await Spawner.waitForExit(daemon) }
        let timer = Task {
            guard (try? await Task.sleep(for: .seconds(10))) != nil else { return }
            // Without pidfds (before Linux 5.3): by number, the waiter not done yet.
            if pidfd >= 0 { _ = PidFD.send(SIGKILL, through: pidfd) } else { kill(daemon, SIGKILL) }
        }
        if let status = await waiter.value { say("demo: daemon stopped (\(status))") }
        timer.cancel()
        _ = await timer.value
    }

    private static func drive(
        service: HostService, directory: String, daemon: pid_t, beats: Int, interval: Duration, migrations: Int, blackout: Duration,
        say: @escaping @Sendable (String) -> Void
    ) async throws -> Verdict {
        say("demo: daemon pid \(daemon), host peer on Unix sockets in \(directory)")
        guard await service.bridge.waitForGuest(timeout: .seconds(20)) else {
            let tail = String(decoding: (WholeFile.read(directory + "/daemon.log") ?? []).suffix(2000), as: UTF8.self)
            throw HoldfastError(.noGuest, "the daemon never dialed the bridge; its log:\n\(tail)")
        }
        say("demo: guest connected over the bridge")

        let stream = try service.streams.open(token: Array("heartbeat-stdout".utf8), direction: .receive)
        let received = NIOLockedValueBox<[Int]>([])
        let reader = Task {
            var pending: [UInt8] = []
            for await chunk in stream.chunks() {
                pending += chunk
                while let newline = pending.firstIndex(of: 10) {
                    let line = String(decoding: pending[..<newline], as: UTF8.self)
                    pending.removeFirst(newline + 1)
                    say("host <- \(line)")
                    if let number = Int(line.split(separator: " ").last ?? "") { received.withLockedValue { $0.append(number) } }
                }
            }
        }
        let seconds = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
        _ = try await service.bridge.create(ProcessSpec(
            id: "heartbeat",
            argv: ["sh", "-c", "i=0; while [ $i -lt \(beats) ]; do i=$((i+1)); echo \"heartbeat $i\"; sleep \(seconds); done"],
            stdout: stream.streamSpec(at: service.streams.address.description)))
        say("demo: heartbeat started in the guest: a line every \(interval), \(migrations) migrations with \(blackout) blackouts")
        let total = interval * beats
        for _ in 1...migrations {
            try await Task.sleep(for: total / (migrations + 1))
            _ = await service.migrate(blackout: blackout)
        }
        let deadline = ContinuousClock.now + .seconds(30)
        while service.exitsSeen.isEmpty, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        let readerDone = Task {
            try? await Task.sleep(for: .seconds(5))
            reader.cancel()
        }
        await reader.value
        readerDone.cancel()
        try? await Task.sleep(for: .milliseconds(200))  // a repeated exit would show up by now
        let reports = service.exitsSeen
        if reports.isEmpty {
            let tail = String(decoding: (WholeFile.read(directory + "/daemon.log") ?? []).suffix(3000), as: UTF8.self)
            say("demo: no exit reported; the daemon's log ends with:\n\(tail)")
        }
        return Verdict(
            received: received.withLockedValue { $0 }, expected: beats,
            exitCode: reports.first { $0.id == "heartbeat" }?.exitCode, exitsReported: reports.filter { $0.id == "heartbeat" }.count)
    }
}
