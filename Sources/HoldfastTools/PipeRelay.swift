import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The two ends of a single stream as command-line tools:
/// `holdfast pipe` relays stdin to an address (the guest side), `holdfast receive` listens and
/// writes what arrives to stdout (the host side). Raw mode works with any listener (socat);
/// resumable mode needs the other end to speak the protocol — `holdfast receive` does.
public enum StreamMode: String, Sendable, CaseIterable {
    case raw, resumable
}

public enum PipeRelay {
    public struct Options: Sendable {
        public var destination: SocketAddress
        public var mode: StreamMode
        public var token: String
        /// Resumable mode: the stream's secret (the receiver's `--secret-file`).
        public var secret: StreamSecret?
        public var policy: RedialPolicy
        public var bufferSize: Int
        public var pipeCapacity: Int?
        /// Where failed dials are reported (once per reason) and a connection after them.
        public var say: (@Sendable (String) -> Void)?

        public init(
            destination: SocketAddress, mode: StreamMode = .raw, token: String = "stdin", secret: StreamSecret? = nil,
            policy: RedialPolicy = .default, bufferSize: Int = 128 * 1024, pipeCapacity: Int? = nil,
            say: (@Sendable (String) -> Void)? = nil
        ) {
            self.say = say
            self.destination = destination
            self.mode = mode
            self.token = token
            self.secret = secret
            self.policy = policy
            self.bufferSize = bufferSize
            self.pipeCapacity = pipeCapacity
        }
    }

    /// A redial cycle (`policy.attempts` dials) ended without a connection: the relay stops.
    public struct GaveUp: Error, CustomStringConvertible {
        public var destination: String
        public var attempts: Int
        public var reason: String
        public var report: RelayReport

        public var description: String {
            "gave up after \(attempts) attempts to connect to \(destination): \(reason)"
                + (report.undelivered > 0 ? "; \(report.undelivered) bytes not delivered" : "")
        }
    }

    /// Runs until stdin ends; returns the relay's report (resumable: after the receiver
    /// acknowledged every byte, or the drain timeout). The relay runs on the reactor's thread.
    /// Throws `GaveUp` when a redial cycle found no listener.
    public static func run(_ options: Options) async throws -> RelayReport {
        try await withTaskExecutorPreference(Reactor.shared) { try await relay(options) }
    }

    private static func relay(_ options: Options) async throws -> RelayReport {
        let input = dup(0)
        guard input >= 0 else { throw SystemError.last("dup(stdin)") }
        if let capacity = options.pipeCapacity { PipeEnds.setCapacity(of: input, to: capacity) }
        let source = try AsyncFD(adopting: input)
        defer { source.close() }
        let pool = BufferPool(bufferSize: options.bufferSize, retained: 2)
        let watch = PipeDialWatch(destination: "\(options.destination)", attempts: options.policy.attempts, say: options.say)
        let report: RelayReport
        switch options.mode {
        case .raw:
            let slot = GuestStreams.raw(to: options.destination, name: "stdin", policy: options.policy) { watch.event($0) }
            watch.onGiveUp { slot.close() }
            slot.disconnect()  // starts the first dial
            report = await Relay.output(from: source, to: slot, pool: pool)
        case .resumable:
            guard let secret = options.secret else { throw SecretFile.Failure.missing("--secret-file") }
            let stream = GuestStreams.resumable(
                to: options.destination, token: Array(options.token.utf8), secret: secret, direction: .send, policy: options.policy
            ) { watch.event($0) }
            watch.onGiveUp { stream.close() }
            stream.slot.disconnect()
            report = await Relay.output(from: source, to: stream, pool: pool)
        }
        if let reason = watch.gaveUpReason {
            throw GaveUp(destination: "\(options.destination)", attempts: options.policy.attempts, reason: reason, report: report)
        }
        return report
    }
}

/// `pipe`'s dials: each new reason for a failed dial said once, and a redial cycle that gave up
/// ends the relay (there is no bridge-up to try again for it).
final class PipeDialWatch: Sendable {
    private struct State: Sendable {
        var lastReason: String?
        var failures = DialFailureReport()
        var gaveUp: String?
        var giveUp: (@Sendable () -> Void)?
    }

    private let destination: String
    private let attempts: Int
    private let say: (@Sendable (String) -> Void)?
    private let state = NIOLockedValueBox(State())

    init(destination: String, attempts: Int, say: (@Sendable (String) -> Void)?) {
        self.destination = destination
        self.attempts = attempts
        self.say = say
    }

    func onGiveUp(_ action: @escaping @Sendable () -> Void) {
        state.withLockedValue { $0.giveUp = action }
    }

    var gaveUpReason: String? { state.withLockedValue { $0.gaveUp } }

    func event(_ event: SlotEvent) {
        switch event {
        case .dialFailed(let attempt, let reason):
            let new = state.withLockedValue { s -> Bool in
                s.lastReason = reason
                return s.failures.failed(reason)
            }
            if new { say?("holdfast pipe: cannot connect to \(destination): \(reason) (attempt \(attempt) of \(attempts); retrying)") }
        case .connected:
            let recovered = state.withLockedValue { s -> Bool in
                s.lastReason = nil
                return s.failures.connected() != nil  // a dial failed since the last connection
            }
            if recovered { say?("holdfast pipe: connected to \(destination)") }
        case .gaveUp:
            let action = state.withLockedValue { s -> (@Sendable () -> Void)? in
                s.gaveUp = s.lastReason ?? "no connection"
                return s.giveUp
            }
            // Not from inside the slot's own event: the close runs on its own.
            if let action { Task { action() } }
        case .dialing, .disconnected, .closed, .abandoned:
            break
        }
    }
}

public enum StreamReceiver {
    /// Where `receive` writes what arrives.
    public enum Destination: Sendable, Equatable {
        case standardOutput
        /// A file, made or emptied first.
        case file(String)
        /// A file this stream was being received into by an earlier `receive` that died or was
        /// stopped (resumable mode): the stream resumes after the bytes it holds.
        case resumingFile(String)
    }

    /// The stream ended with offsets the sender no longer had (a relay that crashed without
    /// its ring, a host end that acknowledged bytes it then did not keep): what was written
    /// lacks them.
    public struct Gaps: Error, CustomStringConvertible {
        public var bytes: UInt64
        public var offsets: String
        public var received: UInt64
        public var description: String {
            "\(bytes) bytes of the stream are missing from what was written (offsets \(offsets)): the sender no longer had them"
        }
    }

    /// Writing the stream failed before its end (a full disk, a closed pipe): `written` bytes
    /// were written (and acknowledged); the sender still has the rest.
    public struct Unfinished: Error, CustomStringConvertible {
        public var written: UInt64
        public var resumable: Bool
        public var description: String {
            "writing the stream failed after \(written) bytes; the sender still holds the rest"
                + (resumable ? " (run the same command with --resume once there is room)" : "")
        }
    }

    /// `receive --resume` could not go on from its file.
    public struct CannotOpenOutput: Error, CustomStringConvertible {
        public var description: String
    }

    /// Listens on `address` and writes the stream to `destination` until it ends: in resumable
    /// mode at the sender's END; in raw mode when a connection ends after `connections`
    /// connections (0: keep accepting forever). Returns the byte count (with a resumed file:
    /// the bytes this run received).
    /// With `discard`, received bytes are only counted (for measuring the transport alone).
    public static func run(
        listen address: SocketAddress, mode: StreamMode, token: String, secret: StreamSecret? = nil, connections: Int = 1,
        discard: Bool = false, destination: Destination = .standardOutput
    ) async throws -> UInt64 {
        try await withTaskExecutorPreference(Reactor.shared) {
            try await receive(
                listen: address, mode: mode, token: token, secret: secret, connections: connections, discard: discard,
                destination: destination)
        }
    }

    /// Whether `fd` is a regular file (one `--resume` can go on in).
    private static func isRegularFile(_ fd: Int32) -> Bool {
        var info = stat()
        return fstat(fd, &info) == 0 && info.st_mode & S_IFMT == S_IFREG
    }

    /// The fd to write to, and how many bytes of the stream it already holds.
    private static func openDestination(_ destination: Destination) throws -> (fd: Int32, holds: UInt64) {
        switch destination {
        case .standardOutput:
            let fd = dup(1)
            guard fd >= 0 else { throw SystemError.last("dup(stdout)") }
            return (fd, 0)
        case .file(let path):
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o666)
            guard fd >= 0 else { throw SystemError.last("open(\(path))") }
            return (fd, 0)
        case .resumingFile(let path):
            // Appending: every write lands after what the earlier run kept, whatever it was.
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o666)
            guard fd >= 0 else { throw SystemError.last("open(\(path))") }
            var info = stat()
            guard fstat(fd, &info) == 0 else {
                let error = SystemError.last("fstat(\(path))")
                close(fd)
                throw error
            }
            guard info.st_mode & S_IFMT == S_IFREG else {
                close(fd)
                throw CannotOpenOutput(description: "\(path) is not a regular file: a stream resumes only into a file that holds its beginning")
            }
            return (fd, UInt64(info.st_size))
        }
    }

    private static func receive(
        listen address: SocketAddress, mode: StreamMode, token: String, secret: StreamSecret?, connections: Int,
        discard: Bool, destination: Destination
    ) async throws -> UInt64 {
        let (output, holds) = try openDestination(destination)
        let stdout: AsyncFD
        do {
            stdout = try AsyncFD(adopting: output)
        } catch {
            close(output)
            throw error
        }
        defer { stdout.close() }
        let sink: any ByteWriter = discard ? Discard() : stdout
        switch mode {
        case .resumable:
            let server = try StreamServer(listeningOn: address)
            defer { server.close() }
            guard let secret else { throw SecretFile.Failure.missing("--secret-file") }
            // Only what is written is acknowledged (`Relay.input` confirms each write): a
            // receive killed at any instant leaves its file holding exactly what the guest may
            // forget, so the next one resumes at the file's size with nothing lost or repeated.
            var configuration = ResumableConfiguration()
            configuration.acknowledgeDelivered = true
            let resumed: UInt64? = if case .resumingFile = destination { holds } else { nil }
            let stream = try server.open(
                token: Array(token.utf8), direction: .receive, secret: secret, configuration: configuration, resumeAt: resumed)
            server.start()
            // A sender refused again and again (another token or secret; a file that holds more
            // than it ever sent) would leave this waiting in silence: said on stderr, at most
            // every 5 s.
            let refusals = Task {
                var said: UInt64 = 0
                var lastSaid: ContinuousClock.Instant?
                while !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(500))
                    let refused = server.statistics.refused
                    guard refused > said, lastSaid.map({ ContinuousClock.now - $0 >= .seconds(5) }) ?? true else { continue }
                    said = refused
                    lastSaid = .now
                    let line = "holdfast receive: refused a connection: \(server.lastRefusal ?? "no hello") (\(refused) so far)\n"
                    _ = line.utf8CString.withUnsafeBytes { write(2, $0.baseAddress, $0.count - 1) }
                }
            }
            defer { refusals.cancel() }
            let report = await Relay.input(from: stream, to: AnyWriter(sink), pool: BufferPool(bufferSize: 256 * 1024, retained: 2))
            // A write that failed (a full disk, a reader gone) ends the relay too: what was
            // written is short, and only an exit status says so to a script.
            guard report.ending == .endOfStream else {
                throw Unfinished(written: report.bytes, resumable: destination != .standardOutput && isRegularFile(output))
            }
            _ = await stream.waitEndEchoed(timeout: .seconds(5))
            let lost = stream.statistics.lost
            if lost.bytes > 0 { throw Gaps(bytes: lost.bytes, offsets: lost.summary, received: report.bytes) }
            return report.bytes
        case .raw:
            let listener = try Listener(binding: address)
            defer { listener.close() }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
            defer { buffer.deallocate() }
            var total: UInt64 = 0
            var served = 0
            while connections == 0 || served < connections {
                let connection = try await listener.accept()
                served += 1
                while let count = try? await connection.read(into: buffer), count > 0 {
                    try await sink.write(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
                    total += UInt64(count)
                }
                connection.close()
            }
            return total
        }
    }
}

/// A sink that only counts.
struct Discard: ByteWriter {
    func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {}
}

/// Erases a writer's type for the generic relay.
struct AnyWriter: ByteWriter {
    let inner: any ByteWriter
    init(_ inner: any ByteWriter) { self.inner = inner }
    func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) { try await inner.write(bytes) }
}
