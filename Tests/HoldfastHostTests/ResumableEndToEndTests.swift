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

typealias FaultyServer = StreamServer<FaultyConnection<AsyncFD>>

/// 256 MiB, as the issue asks; HOLDFAST_STREAM_MIB overrides it for quick local runs.
let streamBytes: Int = {
    if let value = getenv("HOLDFAST_STREAM_MIB"), let mib = Int(String(cString: value)) { return mib << 20 }
    return 256 << 20
}()

/// A temp dir with a random file, its sha256 (from sha256sum), and the processes a test starts.
struct Rig {
    let directory: TemporaryDirectory
    let processes = TestProcesses()
    let dataPath: String
    let expectedDigest: String

    init(bytes: Int) async throws {
        directory = try TemporaryDirectory("holdfast-e2e")
        dataPath = directory.file("data")
        let out = open(dataPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let head = try processes.start(["head", "-c", String(bytes), "/dev/urandom"], stdout: out)
        close(out)
        // 256 MiB from urandom while other suites load the machine: seconds to a minute.
        #expect(try await processes.wait(head, timeout: .seconds(300)) == .exited(0))
        expectedDigest = try await Rig.sha256sum(dataPath, processes: processes, directory: directory)
    }

    static func sha256sum(_ path: String, processes: TestProcesses, directory: TemporaryDirectory) async throws -> String {
        let outPath = directory.file("sum.\(UInt64.random(in: 0..<UInt64.max))")
        let out = open(outPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let pid = try processes.start(["sha256sum", path], stdout: out)
        close(out)
        #expect(try await processes.wait(pid, timeout: .seconds(300)) == .exited(0))
        return String(decoding: readFile(outPath) ?? [], as: UTF8.self).split(separator: " ").first.map(String.init) ?? ""
    }

    func cleanUp() {
        processes.killAll()
        directory.remove()
    }
}

/// Forces `count` disconnects at random points of a transfer of `total` bytes, spread by
/// progress: mid-write (every connection dropped at once), mid-hello, a lost ack, and a
/// connection cut right after an ack. Returns how many of each it forced.
func forceDisconnects(
    count: Int, total: Int, seed: UInt64, plan: FaultPlan?, progress: @escaping @Sendable () -> UInt64,
    dropAll: @escaping @Sendable () -> Void
) async -> [String: Int] {
    var random = SeededRandom(seed: seed)
    var forced: [String: Int] = [:]
    for index in 1...count {
        // Spread over the first 90% so that every armed fault still meets a connection.
        let threshold = UInt64(Double(total) * 0.9 * Double(index) / Double(count + 1))
        while progress() < threshold {
            try? await Task.sleep(for: .milliseconds(1))
        }
        let choice = plan == nil ? "midWrite" : ["midWrite", "midHello", "lostAck", "afterAck"].randomElement(using: &random)!
        switch choice {
        case "midHello":
            plan?.arm(.midHello)
            dropAll()
        case "lostAck":
            plan?.arm(.lostAck)
        case "afterAck":
            plan?.arm(.afterAck)
        default:
            dropAll()
        }
        forced[choice, default: 0] += 1
    }
    return forced
}

/// Drains a host stream into a digest.
func digestOf(_ stream: some InboundStream) async -> (count: UInt64, hex: String) {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
    defer { buffer.deallocate() }
    var digest = StreamDigest()
    while true {
        await stream.waitReceivable()
        let count = await stream.receive(into: buffer)
        if count == 0 { break }
        digest.update(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
    }
    return (digest.count, digest.hex())
}

let e2ePolicy = RedialPolicy(attempts: 10_000, interval: .milliseconds(5), connectTimeout: .seconds(2))

@Suite("Resumable streams end to end: real processes, Unix sockets, forced disconnects", .timeLimit(.minutes(5)))
struct ResumableEndToEndTests {
    @Test func stdoutSurvivesFiftyDisconnectsExactlyOnce() async throws {
        let rig = try await Rig(bytes: streamBytes)
        defer { rig.cleanUp() }
        let plan = FaultPlan()
        let server = try FaultyServer(listeningOn: .unix(path: rig.directory.file("streams.sock"))) {
            FaultyConnection($0, plan: plan)
        }
        server.start()
        defer { server.close() }
        let host = try server.open(token: bytes("c1-stdout"), direction: .receive)
        let pipe = try PipeEnds.make()
        let cat = try rig.processes.start(["cat", rig.dataPath], stdout: pipe.write)
        close(pipe.write)
        let guest = GuestStreams.resumable(to: server.address, token: bytes("c1-stdout"), secret: host.secret, direction: .send, policy: e2ePolicy)
        guest.slot.disconnect()
        let source = try AsyncFD(adopting: pipe.read)
        let relay = Task { await Relay.output(from: source, to: guest) }
        let consumer = Task { await digestOf(host) }
        let seed = UInt64.random(in: 0..<UInt64.max)
        let forced = await forceDisconnects(
            count: 50, total: streamBytes, seed: seed, plan: plan, progress: { host.statistics.offset },
            dropAll: { server.dropAllConnections() })
        let report = try await withTimeout("the relay", .seconds(600)) { await relay.value }
        let received = await consumer.value
        print("stdout, seed \(seed): forced \(forced); \(report); replayed \(guest.statistics.replayedBytes) bytes; refused \(server.statistics.refused)")
        #expect(report == RelayReport(ending: .endOfStream, bytes: UInt64(streamBytes), undelivered: 0))
        #expect(received.count == UInt64(streamBytes), "nothing lost, nothing duplicated")
        #expect(received.hex == rig.expectedDigest)
        #expect(try await rig.processes.wait(cat) == .exited(0))
        #expect(forced.values.reduce(0, +) == 50)
        source.close()
    }

    @Test func stdinSurvivesFiftyDisconnectsExactlyOnce() async throws {
        let rig = try await Rig(bytes: streamBytes)
        defer { rig.cleanUp() }
        let plan = FaultPlan()
        let server = try FaultyServer(listeningOn: .unix(path: rig.directory.file("streams.sock"))) {
            FaultyConnection($0, plan: plan)
        }
        server.start()
        defer { server.close() }
        let host = try server.open(token: bytes("c1-stdin"), direction: .send)
        let pipe = try PipeEnds.make()
        let sumPath = rig.directory.file("stdin.sum")
        let sumOut = open(sumPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let sha = try rig.processes.start(["sha256sum"], stdin: pipe.read, stdout: sumOut)
        close(pipe.read)
        close(sumOut)
        let guest = GuestStreams.resumable(to: server.address, token: bytes("c1-stdin"), secret: host.secret, direction: .receive, policy: e2ePolicy)
        guest.slot.disconnect()
        let sink = try AsyncFD(adopting: pipe.write)
        let relay = Task { () -> RelayReport in
            let report = await Relay.input(from: guest, to: sink)
            sink.close()  // the process sees end-of-file only now, at the explicit end
            _ = await guest.waitEndEchoed(timeout: .seconds(30))
            return report
        }
        let producer = Task { () -> UInt64 in
            let file = try AsyncFD(adopting: open(rig.dataPath, O_RDONLY | O_CLOEXEC))
            defer { file.close() }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { buffer.deallocate() }
            while true {
                let count = try await file.read(into: buffer)
                if count == 0 { break }
                try await host.send(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            }
            return await host.finish()
        }
        let seed = UInt64.random(in: 0..<UInt64.max)
        let forced = await forceDisconnects(
            count: 50, total: streamBytes, seed: seed, plan: plan, progress: { host.statistics.acknowledged },
            dropAll: { server.dropAllConnections() })
        let undelivered = try await withTimeout("the host's send", .seconds(600)) { try await producer.value }
        let report = await relay.value
        #expect(try await rig.processes.wait(sha) == .exited(0))
        let digest = String(decoding: readFile(sumPath) ?? [], as: UTF8.self).split(separator: " ").first.map(String.init)
        print("stdin, seed \(seed): forced \(forced); \(report); replayed \(host.statistics.replayedBytes) bytes")
        #expect(undelivered == 0)
        #expect(report == RelayReport(ending: .endOfStream, bytes: UInt64(streamBytes), undelivered: 0))
        #expect(digest == rig.expectedDigest, "the process read every byte once, and no false end-of-file")
        guest.close()
    }

    @Test func ttyOutputSurvivesFiftyDisconnectsExactlyOnce() async throws {
        let rig = try await Rig(bytes: streamBytes)
        defer { rig.cleanUp() }
        let plan = FaultPlan()
        let server = try FaultyServer(listeningOn: .unix(path: rig.directory.file("streams.sock"))) {
            FaultyConnection($0, plan: plan)
        }
        server.start()
        defer { server.close() }
        let host = try server.open(token: bytes("c1-tty"), direction: .receive)
        let terminal = try PseudoTerminal.open(size: WindowSize(rows: 24, columns: 80))
        try Terminal.makeRaw(fd: terminal.slave)  // bytes pass unchanged, as `stty raw -echo`
        let cat = try rig.processes.start(["cat", rig.dataPath], stdout: terminal.slave)
        close(terminal.slave)
        let guest = GuestStreams.resumable(to: server.address, token: bytes("c1-tty"), secret: host.secret, direction: .send, policy: e2ePolicy)
        guest.slot.disconnect()
        let master = try AsyncFD(adopting: terminal.master)
        let relay = Task { await Relay.output(from: master, to: guest) }
        let consumer = Task { await digestOf(host) }
        let seed = UInt64.random(in: 0..<UInt64.max)
        let forced = await forceDisconnects(
            count: 50, total: streamBytes, seed: seed, plan: plan, progress: { host.statistics.offset },
            dropAll: { server.dropAllConnections() })
        let report = try await withTimeout("the relay", .seconds(600)) { await relay.value }
        let received = await consumer.value
        print("tty, seed \(seed): forced \(forced); \(report)")
        #expect(report.undelivered == 0)
        #expect(received.count == UInt64(streamBytes))
        #expect(received.hex == rig.expectedDigest)
        #expect(try await rig.processes.wait(cat) == .exited(0))
        master.close()
    }

    @Test func rawModeUnderTheSameScheduleLosesBytesAndSaysHowMany() async throws {
        let rig = try await Rig(bytes: streamBytes)
        defer { rig.cleanUp() }
        let address = SocketAddress.unix(path: rig.directory.file("raw.sock"))
        let listener = try Listener(binding: address)
        defer { listener.close() }
        let received = NIOLockedValueBox<UInt64>(0)
        let current = NIOLockedValueBox<AsyncFD?>(nil)
        let original = try SourceMatcher(path: rig.dataPath)
        let host = Task {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
            defer { buffer.deallocate() }
            while let connection = try? await listener.accept() {
                current.withLockedValue { $0 = connection }
                original.connectionStarted()
                while let count = try? await connection.read(into: buffer), count > 0 {
                    original.check(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
                    received.withLockedValue { $0 += UInt64(count) }
                }
                connection.close()
            }
        }
        let pipe = try PipeEnds.make()
        let cat = try rig.processes.start(["cat", rig.dataPath], stdout: pipe.write)
        close(pipe.write)
        let guest = GuestStreams.raw(to: address, policy: e2ePolicy)
        guest.disconnect()
        let source = try AsyncFD(adopting: pipe.read)
        let relay = Task { await Relay.output(from: source, to: guest) }
        let seed = UInt64.random(in: 0..<UInt64.max)
        let forced = await forceDisconnects(
            count: 50, total: streamBytes, seed: seed, plan: nil, progress: { received.withLockedValue { $0 } },
            dropAll: { current.withLockedValue { $0 }?.close() })
        let report = try await withTimeout("the relay", .seconds(600)) { await relay.value }
        try await Task.sleep(for: .milliseconds(200))
        listener.close()
        host.cancel()
        original.finished()
        let got = received.withLockedValue { $0 }
        let lost = UInt64(streamBytes) - got
        print("raw mode, same schedule, seed \(seed): forced \(forced); sent \(streamBytes), received \(got), LOST \(lost) bytes (\(String(format: "%.1f", Double(lost) / 1024)) KiB, \(guest.statistics.bytesUnconfirmed) bytes were accepted by dying connections)")
        // What raw mode promises: what arrives is the stream in order, each connection a
        // contiguous piece of it after the last one's end (gaps, never a byte twice or out of
        // place); and the loss it reports (bytes a failed write had handed to a dying connection)
        // is at most the real loss.
        #expect(original.mismatches == 0, "every connection carried a contiguous, in-order piece of the stream")
        #expect(original.connectionsSeen > 1, "the disconnects happened")
        #expect(got + original.skipped == UInt64(streamBytes), "received + the gaps between pieces = the stream")
        #expect(guest.statistics.bytesUnconfirmed <= lost, "the loss raw mode counts is never more than the real loss")
        #expect(report.ending == .endOfStream)
        #expect(try await rig.processes.wait(cat) == .exited(0))
        source.close()
    }
}

/// Checks a raw stream's arrivals against the file it came from: each connection's bytes must be
/// one contiguous piece of the file, starting at or after where the previous connection's
/// piece ended (what raw mode loses is whole runs of bytes between connections, nothing else).
final class SourceMatcher: Sendable {
    private struct State {
        var position: UInt64 = 0
        /// A new connection's first bytes, until there are enough to find where they start.
        var pending: [UInt8]? = nil
        var mismatches = 0
        var skipped: UInt64 = 0
        var connections = 0
    }

    /// Bytes that locate a piece: 64 bytes of urandom occur in one place only.
    static let probe = 64
    private let fd: Int32
    private let state = NIOLockedValueBox(State())

    init(path: String) throws {
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.last("open(\(path))") }
    }

    deinit { close(fd) }

    var mismatches: Int { state.withLockedValue { $0.mismatches } }
    var skipped: UInt64 { state.withLockedValue { $0.skipped } }
    var connectionsSeen: Int { state.withLockedValue { $0.connections } }

    /// A new connection: its first bytes may start after a gap.
    func connectionStarted() {
        state.withLockedValue { s in
            finishPending(&s)
            s.pending = []
            s.connections += 1
        }
    }

    /// The last connection ended: what it left pending is checked as it is.
    func finished() {
        state.withLockedValue { finishPending(&$0) }
    }

    func check(_ bytes: UnsafeRawBufferPointer) {
        state.withLockedValue { s in
            if var pending = s.pending {
                pending += bytes
                s.pending = pending
                if pending.count >= Self.probe { finishPending(&s) }
                return
            }
            compare(Array(bytes), &s)
        }
    }

    private func finishPending(_ s: inout State) {
        guard let pending = s.pending else { return }
        s.pending = nil
        guard !pending.isEmpty else { return }
        // Where this connection's piece starts: at or after the previous piece's end (16 MiB of
        // the file searched, far more than a disconnect loses).
        guard let start = find(Array(pending.prefix(Self.probe)), from: s.position, within: 16 << 20) else {
            s.mismatches += 1
            return
        }
        s.skipped += start - s.position
        s.position = start
        compare(pending, &s)
    }

    private func compare(_ bytes: [UInt8], _ s: inout State) {
        var expected = [UInt8](repeating: 0, count: bytes.count)
        let got = expected.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(s.position)) }
        let equal = expected.withUnsafeBytes { e in bytes.withUnsafeBytes { b in memcmp(e.baseAddress!, b.baseAddress!, b.count) == 0 } }
        if got != bytes.count || !equal { s.mismatches += 1 }
        s.position += UInt64(bytes.count)
    }

    private func find(_ needle: [UInt8], from position: UInt64, within limit: Int) -> UInt64? {
        var window = [UInt8](repeating: 0, count: limit + needle.count)
        let count = window.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(position)) }
        guard count >= needle.count else { return nil }
        return window.withUnsafeBytes { haystack -> UInt64? in
            needle.withUnsafeBytes { needle -> UInt64? in
                // memchr for the first byte, memcmp for the rest (Glibc does not export memmem).
                let base = haystack.baseAddress!
                var index = 0
                while index <= count - needle.count {
                    guard let hit = memchr(base + index, Int32(needle[0]), count - needle.count + 1 - index) else { return nil }
                    index = base.distance(to: UnsafeRawPointer(hit))
                    if memcmp(hit, needle.baseAddress!, needle.count) == 0 { return position + UInt64(index) }
                    index += 1
                }
                return nil
            }
        }
    }
}
