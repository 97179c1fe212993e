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

/// Attacks on the bridge against a real daemon (docs/PROTOCOL.md, "Bridge authentication"):
/// a guest process posing as the daemon, without the key, with another key, or replaying a
/// recorded handshake; an impostor host; a daemon without a usable key. Each time the real
/// guest keeps the bridge and a victim process's bytes and exit arrive exactly. One test at a
/// time: each runs a daemon and an attacker at full tilt, which would starve the others.
@Suite("Bridge authentication against a real daemon", .serialized, .timeLimit(.minutes(5)))
struct BridgeAuthenticationTests {
    /// A process created over the bridge printing `lines` lines: its stdout, collected.
    static func startVictim(_ daemon: DaemonFixture, id: String, lines: Int = 300) async throws -> Task<[UInt8], Never> {
        let output = collect(try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: id, argv: counterCommand(lines, prefix: id, pause: "0.01"),
            stdout: daemon.spec("\(id)-out")))
        return output
    }

    /// Every byte a connection receives until it is closed (bounded; a reset counts as the end).
    static func everythingReceived(_ connection: AsyncFD) async throws -> [UInt8] {
        try await withTimeout("the connection to be closed") {
            var received: [UInt8] = []
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
            defer { buffer.deallocate() }
            while let count = try? await connection.read(into: buffer), count > 0 { received += buffer[..<count] }
            return received
        }
    }

    enum ImpostorGuest: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// Dials and says a daemon's hello, as a guest process that read docs/PROTOCOL.md would.
        case saysAHelloWithoutTheKey
        /// Runs the handshake with a key of its own, then says the hello.
        case provesAnotherKey
        /// Replays the real guest's handshake and hello, recorded off the wire.
        case replaysARecordedHandshake

        var testDescription: String { rawValue }
    }

    /// An impostor dials the host's bridge listener every 50 ms while the guest is connected and
    /// a victim prints; creates keep going to the real daemon. Each impostor connection gets
    /// nothing but the handshake's own messages; the real guest's connection is never replaced
    /// (no new accepted connection, the same hello); the victim's bytes arrive exactly, every
    /// exit once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to the user 'nobody'"), arguments: ImpostorGuest.allCases)
    func anImpostorGuestGetsNothingAndNeverDisplacesTheGuest(_ impostor: ImpostorGuest) async throws {
        let daemon = try await DaemonFixture(bridgeThroughProxy: true)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        #expect(await daemon.bridge.waitForGuest(timeout: .seconds(30)))
        let accepted = daemon.bridge.acceptedConnections
        let hello = try #require(daemon.bridge.lastHello)
        // The guest's handshake and hello as they went over the wire (on a starved machine an
        // earlier connection may have been given up on before its hello).
        let connections = try #require(daemon.proxy?.recordings.count)
        let withHello = daemon.proxy?.recordings.last { $0.guestToHost.count > BridgeHandshakeWire.challengeSize + BridgeHandshakeWire.proofSize }
        let recorded = try #require(withHello, "a connection that carried the hello is recorded")
        let listener = SocketAddress.unix(path: daemon.directory.file("real-bridge.sock"))
        let victim = try await Self.startVictim(daemon, id: "victim")

        let attempts = 40
        let attack = Task { () -> [(answer: [UInt8], after: [UInt8])] in
            var seen: [(answer: [UInt8], after: [UInt8])] = []
            for _ in 0..<attempts {
                guard let connection = try? await Dialer.connect(to: listener) else { continue }
                defer { connection.close() }
                var answer: [UInt8] = []
                switch impostor {
                case .saysAHelloWithoutTheKey:
                    let frame = ControlFrame(type: BridgeMessageType.hello.rawValue, id: 0, body: ControlJSON.encode(hello))
                    try? await send(connection, frame.encoded)
                case .provesAnotherKey:
                    let nonce = BridgeHandshake.makeNonce()
                    try? await send(connection, BridgeHandshakeWire.Challenge(guestNonce: nonce).encoded)
                    answer = (try? await readExactly(connection, BridgeHandshakeWire.answerSize)) ?? []
                    if answer.count == BridgeHandshakeWire.answerSize {
                        let hostNonce = Array(answer[8..<40])
                        let proof = BridgeHandshake.guestProof(key: BridgeKey.generate(), hostNonce: hostNonce, guestNonce: nonce)
                        let frame = ControlFrame(type: BridgeMessageType.hello.rawValue, id: 0, body: ControlJSON.encode(hello))
                        try? await send(connection, proof + frame.encoded)
                    }
                case .replaysARecordedHandshake:
                    let challenge = Array(recorded.guestToHost.prefix(BridgeHandshakeWire.challengeSize))
                    try? await send(connection, challenge)
                    answer = (try? await readExactly(connection, BridgeHandshakeWire.answerSize)) ?? []
                    try? await send(connection, Array(recorded.guestToHost.dropFirst(BridgeHandshakeWire.challengeSize)))
                }
                seen.append((answer, (try? await Self.everythingReceived(connection)) ?? []))
                try? await Task.sleep(for: .milliseconds(50))
            }
            return seen
        }
        // Meanwhile the host keeps creating processes in the guest.
        var jobs: [(String, Task<[UInt8], Never>)] = []
        for number in 1...5 {
            let id = "job\(number)"
            let output = collect(try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive))
            _ = try await daemon.bridge.create(ProcessSpec(
                id: id, argv: ["sh", "-c", "echo \(id) ran"],
                stdout: daemon.spec("\(id)-out")))
            jobs.append((id, output))
            try await Task.sleep(for: .milliseconds(200))
        }
        let seen = try await withTimeout("the attack", .seconds(120)) { await attack.value }

        #expect(seen.count == attempts, "every impostor connection was accepted by the listener and answered")
        let refused = BridgeHandshakeWire.Verdict.refused.encoded
        for (answer, after) in seen {
            #expect(refused.starts(with: after), "the impostor got \(after.count) bytes beyond a refusal")
            if impostor != .saysAHelloWithoutTheKey {
                #expect(answer.count == BridgeHandshakeWire.answerSize && Array(answer.prefix(4)) == BridgeHandshakeWire.magic)
            }
            if impostor == .replaysARecordedHandshake {
                #expect(Array(answer[8..<40]) != Array(recorded.hostToGuest[8..<40]), "a fresh host nonce every time")
            }
        }
        try await eventually("every impostor refused") { daemon.bridge.refusedConnections == attempts }
        for (id, output) in jobs {
            #expect(await output.value == bytes("\(id) ran\n"))
        }
        #expect(await victim.value == expectedLines(300, prefix: "victim"), "every victim line once, in order")
        try await eventually("every exit") { exits.count("victim") == 1 && jobs.allSatisfy { exits.count($0.0) == 1 } }
        #expect(exits.all.count == 6, "no exit twice: \(exits.all.map(\.id))")
        #expect(daemon.bridge.acceptedConnections == accepted, "the guest's connection was never replaced")
        #expect(daemon.bridge.isConnected && daemon.bridge.lastHello == hello)
        #expect(daemon.proxy?.recordings.count == connections, "the real guest never had to reconnect")
        let warnings = daemon.hostWarnings.withLockedValue { $0 }
        #expect(!warnings.isEmpty && warnings.count <= attempts, "\(warnings)")
        let expectedReason = impostor == .saysAHelloWithoutTheKey ? "does not start with the authentication handshake" : "authentication failed"
        #expect(warnings.first?.contains(expectedReason) == true, "\(warnings)")
        #expect(try await daemon.status().roles.allSatisfy { $0.restarts == 0 })
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The guest meets an impostor host (its connection diverted): one that replays the real
    /// host's recorded answer, and one that answers with another key. The guest sends it
    /// nothing after its challenge — no proof, no hello, no process list — and comes back to
    /// the real host afterwards; the victim's bytes and exit arrive exactly.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to the user 'nobody'")) func anImpostorHostGetsNothingFromTheGuest() async throws {
        let daemon = try await DaemonFixture(bridgeThroughProxy: true)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        #expect(await daemon.bridge.waitForGuest(timeout: .seconds(30)))
        let proxy = try #require(daemon.proxy)
        let recordedAnswer = Array(try #require(proxy.recordings.last).hostToGuest.prefix(BridgeHandshakeWire.answerSize))
        try #require(recordedAnswer.count == BridgeHandshakeWire.answerSize)
        let accepted = daemon.bridge.acceptedConnections
        let victim = try await Self.startVictim(daemon, id: "victim")

        let heard = NIOLockedValueBox<[(challenge: [UInt8], after: [UInt8])]>([])
        proxy.impersonate { guest in
            guard let challenge = try? await readExactly(guest, BridgeHandshakeWire.challengeSize),
                challenge.count == BridgeHandshakeWire.challengeSize
            else { return }
            let replay = heard.withLockedValue { $0.count } % 2 == 0
            if replay {
                try? await send(guest, recordedAnswer)
            } else {
                let guestNonce = Array(challenge.suffix(BridgeHandshakeWire.nonceSize))
                let hostNonce = BridgeHandshake.makeNonce()
                let proof = BridgeHandshake.hostProof(key: BridgeKey.generate(), guestNonce: guestNonce, hostNonce: hostNonce)
                try? await send(guest, BridgeHandshakeWire.Answer(hostNonce: hostNonce, hostProof: proof).encoded)
            }
            // Whatever the guest says before it hangs up (bounded: it waits for no one).
            let after = (try? await readAll(guest, limit: 1 << 16)) ?? []
            heard.withLockedValue { $0.append((challenge, after)) }
        }
        try await Task.sleep(for: .milliseconds(300))  // the victim is printing
        proxy.dropAll()
        try await eventually("the guest to meet the impostor four times") { heard.withLockedValue { $0.count } >= 4 }
        proxy.impersonate(nil)
        try await eventually("the guest back with the real host") {
            daemon.bridge.acceptedConnections > accepted && daemon.bridge.isConnected
        }

        let met = heard.withLockedValue { $0 }
        for (challenge, after) in met {
            #expect(after.isEmpty, "the guest sent an impostor \(after.count) bytes after its challenge")
            #expect(Array(challenge.prefix(8)) == [0x48, 0x46, 0x42, 0x41, 1, 1, 0, 0])
        }
        #expect(Set(met.map(\.challenge)).count == met.count, "a fresh guest nonce every time")
        #expect(await victim.value == expectedLines(300, prefix: "victim"), "every victim line once, in order")
        try await eventually("the victim's exit") { exits.count("victim") == 1 }
        #expect(exits.all.count == 1)
        try await daemon.waitForLog("the host failed authentication")
        #expect(try await daemon.status().roles.allSatisfy { $0.restarts == 0 })
        #expect(try await daemon.stop() == .exited(0))
    }

    enum KeyFileFault: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case missing
        case readableByOthers
        case writableByGroup
        case ownedByAnotherUser
        case notHexDigits
        case tooShort

        var testDescription: String { rawValue }

        /// Words the daemon's message must contain.
        var reason: String {
            switch self {
            case .missing: "no such file"
            case .readableByOthers: "mode 0644: group or other can read it"
            case .writableByGroup: "mode 0620: group or other can write it"
            case .ownedByAnotherUser: "owned by uid 65534"
            case .notHexDigits: "byte 0 is not a hex digit"
            case .tooShort: "the key is 20 bytes, shorter than 32"
            }
        }
    }

    /// A daemon whose key file is unsafe or malformed does not start: exit code 2, a message that
    /// names the key, the file and what is wrong (never the key), and nothing listening. One
    /// whose key is not there yet starts with the bridge down, says so, and dials once the key
    /// is written (a key provisioned after boot: before, exit 2 left the daemon down for good).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to the user 'nobody'"), arguments: KeyFileFault.allCases)
    func aDaemonWithoutAUsableKeyDoesNotStart(_ fault: KeyFileFault) async throws {
        let directory = try TemporaryDirectory("holdfast-nokey")
        defer { directory.remove() }
        chmod(directory.path, 0o755)
        let keyPath = directory.file("bridge.key")
        let secret = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2"
        switch fault {
        case .missing: break
        case .readableByOthers: try writeFile(keyPath, bytes(secret + "\n"), mode: 0o644)
        case .writableByGroup:
            try writeFile(keyPath, bytes(secret + "\n"), mode: 0o600)
            chmod(keyPath, 0o620)
        case .ownedByAnotherUser:
            try writeFile(keyPath, bytes(secret + "\n"), mode: 0o600)
            #expect(chown(keyPath, 65534, 65534) == 0)
        case .notHexDigits: try writeFile(keyPath, bytes("open sesame, " + secret + "\n"), mode: 0o600)
        case .tooShort: try writeFile(keyPath, bytes(String(secret.prefix(40)) + "\n"), mode: 0o600)
        }
        let config = directory.file("holdfast.yaml")
        try writeFile(config, bytes("""
            run_directory: \(directory.path)
            bridge:
              address: "unix:{run}/host-bridge.sock"
              key_file: "{run}/bridge.key"
            broker:
              user: "uid:\(ReservedUIDs.unused())"
            """))
        let processes = TestProcesses()
        defer { processes.killAll() }
        let logPath = directory.file("daemon.log")
        let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start([holdfastExecutable(), "daemon", "--config", config], stdout: log, stderr: log)
        close(log)
        func logText() -> String { String(decoding: readFile(logPath) ?? [], as: UTF8.self) }
        if fault == .missing {
            try await eventually("the daemon up, saying the bridge waits for its key") {
                logText().contains("no usable bridge key: the bridge stays down") && logText().contains("daemon ready")
            }
            #expect(logText().contains("\(config): bridge.key_file: \(keyPath): \(fault.reason)"), "\(logText())")
            #expect(logText().contains("bridge.authentication: none"), "says how to do without")
            // The bridge worker's own look first: under load it may start after the key is
            // written, find it at once, and have nothing to say (a loaded full suite did so).
            try await eventually("the bridge worker to miss the key", timeout: .seconds(60)) {
                logText().contains("cannot use the bridge key; not dialling until it is usable")
            }
            // The key arrives: the worker finds it before its next dial (the host is not there).
            try writeFile(keyPath, bytes(secret + "\n"), mode: 0o600)
            try await eventually("the key found", timeout: .seconds(60)) { logText().contains("the bridge key is usable now: dialling") }
            #expect(!logText().contains("5ec2e7"), "the key is never shown")
            #expect(kill(pid, SIGTERM) == 0)
            #expect(try await processes.wait(pid, timeout: .seconds(30)) == .exited(0))
            return
        }
        #expect(try await processes.wait(pid, timeout: .seconds(30)) == .exited(2))
        let text = logText()
        #expect(text.contains("\(config): bridge.key_file: \(keyPath): \(fault.reason)"), "\(text)")
        #expect(!text.contains("5ec2e7"), "the key is never shown")
        #expect(access(directory.file("control.sock"), F_OK) != 0, "nothing started")
    }

    /// `bridge.authentication: none` on both ends: it works, and both ends warn at start.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to the user 'nobody'")) func withoutAuthenticationTheBridgeWorksAndBothEndsWarn() async throws {
        let daemon = try await DaemonFixture(authenticated: false)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let victim = try await Self.startVictim(daemon, id: "plain", lines: 50)
        #expect(await victim.value == expectedLines(50, prefix: "plain"))
        try await eventually("the exit") { exits.count("plain") == 1 }
        try await daemon.waitForLog("bridge.authentication is none")
        try await daemon.waitForLog("bridge authentication is off")
        #expect(daemon.hostWarnings.withLockedValue { $0 }.contains { $0.contains("authentication none") })
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Rotation: the VM's key file is replaced (written aside, renamed over) and the host takes
    /// the new key; the guest connected with the old one stays, and the next connection (here:
    /// a migration) proves the new one: the worker reads the file before every dial. The
    /// victim's bytes arrive exactly.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to the user 'nobody'")) func aRotatedKeyIsUsedFromTheNextConnection() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        #expect(await daemon.bridge.waitForGuest(timeout: .seconds(30)))
        let victim = try await Self.startVictim(daemon, id: "victim")
        let accepted = daemon.bridge.acceptedConnections

        let newKey = BridgeKey.generate()
        try writeFile(daemon.directory.file("bridge.key.new"), newKey.fileContents, mode: 0o600)
        #expect(rename(daemon.directory.file("bridge.key.new"), daemon.directory.file("bridge.key")) == 0)
        daemon.bridge.setAuthentication(.key(newKey))
        #expect(daemon.bridge.isConnected, "the connected guest stays")
        blackout(daemon)
        lightsOn(daemon)
        try await eventually("the guest back with the new key") {
            daemon.bridge.acceptedConnections > accepted && daemon.bridge.isConnected
        }
        #expect(daemon.bridge.refusedConnections == 0, "the worker did not try the old key")
        #expect(await victim.value == expectedLines(300, prefix: "victim"))
        try await eventually("the victim's exit") { exits.count("victim") == 1 }
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// `holdfast host serve` and the bridge key: the development flow.
@Suite("host serve provisions the development bridge key", .timeLimit(.minutes(5)))
struct HostServeKeyTests {
    func serve(_ arguments: [String], runDirectory: String, processes: TestProcesses) throws -> (pid: pid_t, log: String) {
        let logPath = runDirectory + "/serve-\(UInt32.random(in: 0..<UInt32.max)).log"
        let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(log) }
        let pid = try processes.start(
            [holdfastExecutable(), "host", "serve"] + arguments, stdout: log, stderr: log,
            environment: SpawnOptions.inheritedEnvironment() + ["HOLDFAST_RUN_DIR=\(runDirectory)"])
        return (pid, logPath)
    }

    func text(_ path: String) -> String { String(decoding: readFile(path) ?? [], as: UTF8.self) }

    /// The first start creates `{run}/bridge.key` (0600, 64 hex digits) and says where; the next
    /// start uses the same key; `--key-file` names another, which must exist.
    @Test func hostServeCreatesTheKeyOnceAndSaysWhereItIs() async throws {
        let directory = try TemporaryDirectory("holdfast-serve-key")
        defer { directory.remove() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let keyPath = directory.file("bridge.key")

        let first = try serve([], runDirectory: directory.path, processes: processes)
        try await eventually("host serve to start") { text(first.log).contains("holdfast host: bridge unix:") }
        #expect(text(first.log).contains("holdfast host: bridge key \(keyPath) (new)"), "\(text(first.log))")
        var info = stat()
        #expect(stat(keyPath, &info) == 0 && info.st_mode & 0o777 == 0o600 && info.st_uid == geteuid())
        let key = try BridgeKeyFile.load(keyPath)
        kill(first.pid, SIGTERM)
        _ = try await processes.wait(first.pid, timeout: .seconds(30))

        let second = try serve([], runDirectory: directory.path, processes: processes)
        try await eventually("host serve to start again") { text(second.log).contains("holdfast host: bridge unix:") }
        #expect(text(second.log).contains("holdfast host: bridge key \(keyPath)\n"), "no (new): \(text(second.log))")
        #expect(try BridgeKeyFile.load(keyPath) == key, "the key is kept")
        kill(second.pid, SIGTERM)
        _ = try await processes.wait(second.pid, timeout: .seconds(30))

        let missing = try serve(["--key-file", directory.file("elsewhere.key")], runDirectory: directory.path, processes: processes)
        #expect(try await processes.wait(missing.pid, timeout: .seconds(30)) != .exited(0))
        #expect(text(missing.log).contains("\(directory.file("elsewhere.key")): no such file"), "\(text(missing.log))")
        #expect(access(directory.file("elsewhere.key"), F_OK) != 0, "a named key file is never created")
    }
}
