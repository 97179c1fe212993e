import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A host connection whose reads can be held: while held, what the guest sends stays unread in
/// the socket (a reader already waiting checks again before it reads).
final class HeldReadsConnection: ByteConnection {
    let socket: AsyncFD
    private let gate = NIOLockedValueBox<(held: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    init(_ socket: AsyncFD) { self.socket = socket }

    func holdReads() { gate.withLockedValue { $0.held = true } }

    private func pass() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let open = gate.withLockedValue { g -> Bool in
                if !g.held { return true }
                g.waiters.append(continuation)
                return false
            }
            if open { continuation.resume() }
        }
    }

    private var held: Bool { gate.withLockedValue { $0.held } }

    func waitReadable() async throws {
        await pass()
        try await socket.waitReadable()
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        while true {
            await pass()
            try await socket.waitReadable()
            if held { continue }
            if let count = try socket.readNow(into: buffer) { return count }
        }
    }

    func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        held ? nil : try socket.readNow(into: buffer)
    }

    func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) { try await socket.write(bytes) }

    func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try await socket.write(header, body)
    }

    /// Closes the socket (with whatever is unread in it) and lets held readers find it closed.
    func close() {
        socket.close()
        let waiters = gate.withLockedValue { g -> [CheckedContinuation<Void, Never>] in
            g.held = false
            defer { g.waiters.removeAll() }
            return g.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}

/// A stream server on `held.sock` in the daemon's directory whose connections' reads can be held.
func heldReadsServer(in daemon: DaemonFixture) throws -> (StreamServer<HeldReadsConnection>, NIOLockedValueBox<[HeldReadsConnection]>, String) {
    let connections = NIOLockedValueBox<[HeldReadsConnection]>([])
    let path = daemon.directory.file("held.sock")
    let held = try StreamServer<HeldReadsConnection>(listeningOn: .unix(path: path), unixMode: 0o666) { socket in
        let connection = HeldReadsConnection(socket)
        connections.withLockedValue { $0.append(connection) }
        return connection
    }
    held.start()
    return (held, connections, path)
}

@Suite("Stdin's end survives a migration", .timeLimit(.minutes(5)))
struct StdinEndTests {
    /// Found by the soak (RELIABILITY.md): the host ends a process's stdin, the guest echoes the
    /// END — and a migration drops the connection before the host has read the echo. The broker
    /// used to close the stream as soon as the echo was written (and again when `cat` exited),
    /// so the host waited out its drain timeout for a reconnect that never came and reported
    /// every byte it had typed as undelivered, though `cat` had echoed them all. Now the broker
    /// keeps the stream, redials after the migration, echoes again, and closes once the host,
    /// done, closes the connection.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anEndEchoLostInAMigrationIsEchoedAgain() async throws {
        // The guest lingers up to its drain timeout for the host to have the echo; a long one,
        // so that a starved machine cannot make it give up before the host is back.
        try await withBridgeDaemon(drainTimeout: "60s") { daemon, exits in
            let (held, connections, path) = try heldReadsServer(in: daemon)
            defer { held.close() }
            let input = try held.open(token: bytes("e-in"), direction: .send, configuration: ResumableConfiguration(drainTimeout: .seconds(120)))
            let output = collect(try daemon.streams.open(token: bytes("e-out"), direction: .receive))
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "e", argv: ["cat"], stdin: input.streamSpec(at: "unix:" + path),
                stdout: daemon.spec("e-out")))
            try await eventually("stdin connected") { input.slot.phase == .connected }
            // From now on the host does not read what the guest sends on this connection.
            for connection in connections.withLockedValue({ $0 }) { connection.holdReads() }
            try await input.send(bytes("typed, then the host migrates\n"))
            let finished = Task { await input.finish() }
            // cat exits once its stdin ended: the guest had the END, and echoes it (unread here).
            try await eventually("cat's exit", timeout: .seconds(10)) { exits.count("e") == 1 }
            try await Task.sleep(for: .milliseconds(300))
            // The migration: the connection goes, the ACK and the echo unread in it.
            held.setRefusing(true)
            held.dropAllConnections()
            try await Task.sleep(for: .milliseconds(200))
            held.setRefusing(false)
            // Without a second echo the host would wait out its 120 s drain timeout.
            let undelivered = try await withTimeout("the END echoed again after the migration", .seconds(60)) { await finished.value }
            #expect(undelivered == 0, "every typed byte acknowledged")
            #expect(await output.value == bytes("typed, then the host migrates\n"))
            #expect(exits.all.first { $0.id == "e" }?.exitCode == 0)
            #expect(connections.withLockedValue { $0.count } >= 2, "the guest came back for the echo")
            #expect(try await daemon.stop() == .exited(0))
        }
    }

    /// Found by the soak (RELIABILITY.md): an input the host ended stays in the broker only to
    /// see its END echo home. When the host no longer knows the stream — it had the echo and
    /// closed, the connection cut before the broker saw that; or the host agent restarted —
    /// every redial is refused "unknown stream", and the broker went on redialling until its
    /// drain timeout, for nobody (the soak's end found such streams alive, and their memory).
    /// Now a second of such refusals, with no connection between, ends it (a host agent that
    /// restarts registers its streams again within that). Here the host agent restarts with the
    /// echo unread, and comes back without the stream.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anEndedInputTheHostForgotIsLetGoAfterASecondOfRefusals() async throws {
        try await withBridgeDaemon(drainTimeout: "300s") { daemon, exits in
            let restarted = try await catWhoseEndedStdinTheHostForgets(id: "f", text: "typed, then the host agent restarts\n", daemon, exits)
            defer { restarted.close() }
            let letGo = ContinuousClock.now
            try await eventually("the broker lets the forgotten input go (its drain timeout is 300 s)") {
                (try? await daemon.bridge.stats(timeout: .seconds(5)))?.liveStreamObjects == 0
            }
            print("an ended input the host forgot: let go after \(ContinuousClock.now - letGo)")
            #expect(try await daemon.stop() == .exited(0))
        }
    }

    /// `cat` under a daemon, its stdin from a host that holds its reads (the END echo stays
    /// unread): the host sends a line and ends the stdin, `cat` prints it and exits, then the
    /// host agent restarts — a new listener at the same address, knowing nothing of the stream.
    /// Returns that listener.
    func catWhoseEndedStdinTheHostForgets(
        id: String, text: String, _ daemon: DaemonFixture, _ exits: ExitLog
    ) async throws -> StreamServer<AsyncFD> {
        let (held, connections, path) = try heldReadsServer(in: daemon)
        let input = try held.open(token: bytes("\(id)-in"), direction: .send, configuration: ResumableConfiguration(drainTimeout: .seconds(300)))
        let output = collect(try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: id, argv: ["cat"], stdin: input.streamSpec(at: "unix:" + path), stdout: daemon.spec("\(id)-out")))
        try await eventually("stdin connected") { input.slot.phase == .connected }
        // The host reads nothing more on this connection: the echo stays unread.
        for connection in connections.withLockedValue({ $0 }) { connection.holdReads() }
        try await input.send(bytes(text))
        let finished = Task { await input.finish() }
        try await eventually("cat's exit", timeout: .seconds(10)) { exits.count(id) == 1 }
        #expect(await output.value == bytes(text))
        held.close()
        finished.cancel()
        unlink(path)
        let restarted = try StreamServer<AsyncFD>(listeningOn: .unix(path: path), unixMode: 0o666)
        restarted.start()
        return restarted
    }

    /// The kept stdin of the test below, when the host no longer knows it (it had the echo, or
    /// its agent restarted): the successor resumed at its END must let it go after a second of
    /// `unknown stream`, as a live stream does, not after the drain timeout. Found by the
    /// fresh-clone soak of the first version: a resumed ended stdin kept a stream object and its
    /// /dev/null in the broker past the quiet moment (drain timeout 300 s there).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aKeptStdinTheHostForgotIsLetGoByTheSuccessorAfterASecond() async throws {
        try await withBridgeDaemon(drainTimeout: "300s") { daemon, exits in
            let restarted = try await catWhoseEndedStdinTheHostForgets(id: "g", text: "typed, then the host forgets\n", daemon, exits)
            defer { restarted.close() }
            // The host agent restarted knowing nothing of "g-in"; now the broker is killed.
            let broker = try #require(try await daemon.rolePID("broker"))
            let killedBroker = ProcessIdentity(broker)
            kill(broker, SIGKILL)
            try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
            try await eventually("the successor resumed the kept stdin") {
                daemon.log.contains("resumed an ended stdin the previous broker held, for its END echo")
            }
            let letGo = ContinuousClock.now
            try await eventually("the successor lets the forgotten stdin go (its drain timeout is 300 s)", timeout: .seconds(30)) {
                (try? await daemon.bridge.stats(timeout: .seconds(5)))?.liveStreamObjects == 0
            }
            print("a kept stdin the host forgot: let go by the successor after \(ContinuousClock.now - letGo)")
            #expect(try await daemon.stop() == .exited(0))
        }
    }

    /// Found by the soak (RELIABILITY.md): the host ends a process's stdin during a migration's
    /// blackout; the broker writes the last bytes, closes the stdin — and is killed before the
    /// host is back for the ACK and the END echo. Its successor used to be handed only the
    /// streams the supervisor still held, not the ended stdin, so nobody acknowledged the bytes
    /// (which the process had read) and the host reported them undelivered. Now the successor
    /// resumes the ended stream (on /dev/null, from its checkpoint: at its END) to acknowledge
    /// and echo.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBrokerKilledBeforeTheHostHadItsEchoLeavesTheEchoToItsSuccessor() async throws {
        try await withBridgeDaemon(drainTimeout: "60s") { daemon, exits in
            let (held, connections, path) = try heldReadsServer(in: daemon)
            defer { held.close() }
            let input = try held.open(token: bytes("k-in"), direction: .send, configuration: ResumableConfiguration(drainTimeout: .seconds(120)))
            let output = collect(try daemon.streams.open(token: bytes("k-out"), direction: .receive))
            let catDone = daemon.directory.file("cat-done")
            let go = daemon.directory.file("go")
            // Alive after its stdin ended, until told: its streams are still the supervisor's to
            // hand over. (A `sleep 2` ended first on a loaded machine: the successor then had
            // only the ended stdin, and this test's log line never came.)
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "k", argv: ["sh", "-c", "cat; touch \(catDone); while [ ! -e \(go) ]; do sleep 0.05; done"],
                stdin: input.streamSpec(at: "unix:" + path), stdout: daemon.spec("k-out")))
            try await eventually("stdin connected") { input.slot.phase == .connected }
            // From now on the host reads nothing the guest sends: no ACK, no echo.
            for connection in connections.withLockedValue({ $0 }) { connection.holdReads() }
            try await input.send(bytes("typed, then the broker dies\n"))
            let finished = Task { await input.finish() }
            try await eventually("cat's end of file", timeout: .seconds(10)) { access(catDone, F_OK) == 0 }
            let broker = try #require(try await daemon.rolePID("broker"))
            let killedBroker = ProcessIdentity(broker)
            kill(broker, SIGKILL)
            held.dropAllConnections()
            try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
            // Without the successor's ACK and echo the host would wait out its 120 s drain timeout.
            let undelivered = try await withTimeout("the successor's ACK and END echo", .seconds(60)) { await finished.value }
            #expect(undelivered == 0, "every typed byte acknowledged")
            try writeFile(go, [])
            #expect(await output.value == bytes("typed, then the broker dies\n"), "read once by the process")
            try await eventually("the exit", timeout: .seconds(30)) { exits.count("k") == 1 }
            #expect(exits.all.first { $0.id == "k" }?.exitCode == 0)
            try await eventually("the resume logged") { daemon.log.contains("resumed streams the previous broker held") && daemon.log.contains("process=k ") }
            #expect(try await daemon.stop() == .exited(0))
        }
    }

    /// The same kill, after the process's exit was reported: its outputs drained while the
    /// host still held the stdin's ACK and echo unread. The supervisor released the process with
    /// the exit report, so its successor was handed nothing and the host waited out its drain
    /// timeout. Now a stdin the host ended stays in the fd store past the report, until the
    /// broker says its echo is home (`input-settled`), and a successor resumes it alone.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBrokerKilledAfterTheExitReportStillEchoesTheEndedStdin() async throws {
        try await withBridgeDaemon(drainTimeout: "60s") { daemon, exits in
            let (held, connections, path) = try heldReadsServer(in: daemon)
            defer { held.close() }
            let input = try held.open(token: bytes("e-in"), direction: .send, configuration: ResumableConfiguration(drainTimeout: .seconds(120)))
            let output = collect(try daemon.streams.open(token: bytes("e-out"), direction: .receive))
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "e", argv: ["cat"], stdin: input.streamSpec(at: "unix:" + path), stdout: daemon.spec("e-out")))
            try await eventually("stdin connected") { input.slot.phase == .connected }
            for connection in connections.withLockedValue({ $0 }) { connection.holdReads() }
            try await input.send(bytes("typed, the process gone, then the broker\n"))
            let finished = Task { await input.finish() }
            // cat saw its end of file, exited, and its output drained: the exit is reported.
            try await eventually("the exit", timeout: .seconds(30)) { exits.count("e") == 1 }
            #expect(exits.all.first { $0.id == "e" }?.exitCode == 0)
            #expect(await output.value == bytes("typed, the process gone, then the broker\n"), "read once by the process")
            let broker = try #require(try await daemon.rolePID("broker"))
            let killedBroker = ProcessIdentity(broker)
            kill(broker, SIGKILL)
            held.dropAllConnections()
            try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
            // Without the kept stdin the host would wait out its 120 s drain timeout.
            let undelivered = try await withTimeout("the successor's ACK and END echo", .seconds(60)) { await finished.value }
            #expect(undelivered == 0, "every typed byte acknowledged")
            // Logged after the stream started, which may send the echo home first.
            try await eventually("the successor's log line") { daemon.log.contains("resumed an ended stdin the previous broker held, for its END echo") }
            #expect(exits.count("e") == 1, "the exit reported once")
            #expect(try await daemon.stop() == .exited(0))
        }
    }
}

/// The broker killed right after it wrote a stdin's END echo: the host, which has the echo, may
/// forget the stream at once, so the supervisor must know by then that the stdin ended.
@Suite("A broker killed right after a stdin's END echo", .timeLimit(.minutes(3)))
struct StdinEndEchoCrashTests {
    /// `cat` reads a line the host typed, then the host ends stdin; the broker is killed (a
    /// debug-build failpoint) the moment its END echo is written. The next broker is handed the
    /// stdin as ended, `cat` reads end-of-file and exits 0, reported once, its line exact. Before,
    /// the broker told the supervisor after the echo: killed in between, the supervisor held the
    /// stdin open and handed the next broker a live one, which redialled a host that had closed
    /// the stream; `cat` never read end-of-file and its exit never came.
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (its failpoint)"))
    func aBrokerKilledRightAfterTheEchoLeavesTheProcessItsEndOfFile() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerEndEchoed):stdin"])
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let brokerBefore = try await daemon.status().roles.first { $0.name == "broker" }?.pid
        let input = try daemon.streams.open(token: bytes("echoed-in"), direction: .send)
        let output = collect(try daemon.streams.open(token: bytes("echoed-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "echoed", argv: ["cat"], stdin: daemon.spec("echoed-in"), stdout: daemon.spec("echoed-out")))
        try await input.send(bytes("typed, then ended\n"))
        let undelivered = try await withTimeout("the END echoed", .seconds(30)) { await input.finish() }
        #expect(undelivered == 0)
        // The host has its echo: it forgets the stream, as a host may.
        daemon.streams.close(input)
        try await eventually("cat's exit after end-of-file", timeout: .seconds(30)) { exits.count("echoed") == 1 }
        #expect(exits.all.first { $0.id == "echoed" }?.exitCode == 0)
        #expect(await output.value == bytes("typed, then ended\n"))
        // The failpoint fired: the broker was killed and another serves.
        try await eventually("a new broker") {
            let broker = try await daemon.status().roles.first { $0.name == "broker" }
            return broker?.pid != nil && broker?.pid != brokerBefore && (broker?.restarts ?? 0) >= 1
        }
        #expect(try await daemon.stop() == .exited(0))
    }
}
