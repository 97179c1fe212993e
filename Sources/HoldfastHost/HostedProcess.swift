import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Which daemon runs a process: a hello with another pair means that daemon is gone.
struct GuestIdentity: Sendable, Equatable {
    var bootID: String
    var instanceID: String?

    init(_ hello: BridgeHello) {
        bootID = hello.bootID
        instanceID = hello.instanceID
    }

    /// Why a process this daemon ran is lost, if `newer` is another daemon.
    func loss(to newer: GuestIdentity, process: String) -> LostProcess? {
        if newer.bootID != bootID {
            return LostProcess(
                reason: .guestRebooted,
                message: "the guest rebooted (boot id \(bootID.prefix(8)) -> \(newer.bootID.prefix(8))): process \(process) is gone, its exit unknown")
        }
        if let old = instanceID, let new = newer.instanceID, old != new {
            return LostProcess(
                reason: .daemonRestarted,
                message: "the guest's daemon restarted (instance \(old.prefix(8)) -> \(new.prefix(8))): process \(process) is gone, its exit unknown")
        }
        return nil
    }
}

/// One process started with `host run`, from the create to the moment its outcome and output
/// are handed over; then host serve forgets it (keeping only the outcome, for a late `wait`).
final class HostedProcess: Sendable {
    enum Phase: Sendable {
        /// The create is on its way; `guest` unknown yet.
        case starting
        case running
        /// The outcome is known; output streams still drain (each may go the drain timeout
        /// without a byte before it is ended).
        case ending(HostWaitResponse, since: ContinuousClock.Instant)
        case finished(HostWaitResponse)
    }

    struct State: Sendable {
        var phase = Phase.starting
        var guest: GuestIdentity?
        /// The list poll round current when the create returned: only a list sent after it may
        /// prove the process gone.
        var createdInRound: UInt64 = .max
        var drainTimeout: Duration
        var waiters: [UInt64: CheckedContinuation<HostWaitResponse?, Never>] = [:]
        var nextWaiter: UInt64 = 0
    }

    let id: String
    let outputs: [OutputRelay]
    let input: InputRelay?
    let state: NIOLockedValueBox<State>

    init(id: String, outputs: [OutputRelay], input: InputRelay?, drainTimeout: Duration) {
        self.id = id
        self.outputs = outputs
        self.input = input
        self.state = NIOLockedValueBox(State(drainTimeout: drainTimeout))
    }

    var outlets: [String: Outlet] {
        var all: [String: Outlet] = [:]
        if let input { all["stdin"] = input.outlet }
        for output in outputs { all[output.kind] = output.outlet }
        return all
    }

    var isUnresolved: Bool {
        state.withLockedValue {
            switch $0.phase {
            case .starting, .running: return true
            case .ending, .finished: return false
            }
        }
    }

    /// The outcome is known: stdin is of no use any more, and the outputs start their drain
    /// watch. Returns false if an outcome was already known (the first one stands).
    func end(with outcome: HostWaitResponse) -> Bool {
        let first = state.withLockedValue { s -> Bool in
            switch s.phase {
            case .starting, .running:
                s.phase = .ending(outcome, since: .now)
                return true
            case .ending, .finished:
                return false
            }
        }
        guard first else { return false }
        input?.close()
        Task { await watchDrain() }
        return true
    }

    /// Ends an output stream that went the drain timeout without a byte while waiting for the
    /// guest, once the outcome is known. The guest reports an exit only after its own drain, so
    /// by then nothing more is coming on a stream that has not ended; this only bounds the wait.
    private func watchDrain() async {
        while true {
            let (since, timeout) = state.withLockedValue { s -> (ContinuousClock.Instant?, Duration) in
                if case .ending(_, let since) = s.phase { return (since, s.drainTimeout) }
                return (nil, s.drainTimeout)
            }
            guard let since else { return }
            let now = ContinuousClock.now
            var next = now + min(timeout, .milliseconds(500))
            for output in outputs {
                guard let idleSince = output.waitingForGuestSince else { continue }
                let deadline = max(idleSince, since) + timeout
                if deadline <= now {
                    output.endByHost()
                } else {
                    next = min(next, deadline)
                }
            }
            try? await Task.sleep(until: next)
        }
    }

    /// Called by each output relay when it is done: the last one finishes the process.
    /// Returns the outcome when this call finished it.
    func outputFinished() -> HostWaitResponse? {
        guard outputs.allSatisfy(\.isFinished) else { return nil }
        return finishIfEnding()
    }

    /// Moves `ending` to `finished` once every output is done, and wakes the waiters.
    func finishIfEnding() -> HostWaitResponse? {
        guard outputs.allSatisfy(\.isFinished) else { return nil }
        let endedByHost = outputs.filter(\.wasEndedByHost).map(\.kind)
        let (response, waiters) = state.withLockedValue { s -> (HostWaitResponse?, [CheckedContinuation<HostWaitResponse?, Never>]) in
            guard case .ending(var outcome, _) = s.phase else { return (nil, []) }
            if !endedByHost.isEmpty { outcome.endedByHost = endedByHost }
            s.phase = .finished(outcome)
            defer { s.waiters.removeAll() }
            return (outcome, Array(s.waiters.values))
        }
        for waiter in waiters { waiter.resume(returning: response) }
        return response
    }

    /// Waits for the outcome (nil if host serve closed first). Cancelling the waiting task
    /// (its client went away) forgets the waiter.
    func waitForOutcome() async -> HostWaitResponse? {
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let done = state.withLockedValue { s -> HostWaitResponse?? in
                    if case .finished(let outcome) = s.phase { return .some(outcome) }
                    if Task.isCancelled { return .some(nil) }
                    s.waiters[id] = continuation
                    return .none
                }
                if let done { continuation.resume(returning: done) }
            }
        } onCancel: {
            state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
        }
    }

    /// host serve is closing: every stream and waiter goes.
    func abandon() {
        input?.close()
        for output in outputs {
            output.endByHost()
            output.outlet.close()
        }
        let waiters = state.withLockedValue { s -> [CheckedContinuation<HostWaitResponse?, Never>] in
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for waiter in waiters { waiter.resume(returning: nil) }
    }
}

/// Guest output (stdout, stderr, a tty's output) → the attached client. A client that goes away
/// does not lose the output: the chunk waits for the next `attach`. The stream's end — the
/// guest's END, or host serve ending it — closes the client's socket after the last byte.
final class OutputRelay: Sendable {
    let kind: String
    let token: [UInt8]
    let stream: ResumableStream<AsyncFD>
    let outlet = Outlet()
    private let server: StreamServer<AsyncFD>
    private let state = NIOLockedValueBox<(waitingSince: ContinuousClock.Instant?, finished: Bool, endedByHost: Bool)>((nil, false, false))

    /// Opens the host stream (with a new secret); refused if the token is open already.
    init(kind: String, token: [UInt8], server: StreamServer<AsyncFD>) throws(StreamServerError) {
        self.kind = kind
        self.token = token
        self.server = server
        self.stream = try server.open(token: token, direction: .receive)
    }

    /// Since when the relay has been waiting for the guest's next byte; nil while it is
    /// delivering to the client (a slow client is not a silent guest).
    var waitingForGuestSince: ContinuousClock.Instant? { state.withLockedValue { $0.finished ? nil : $0.waitingSince } }
    var isFinished: Bool { state.withLockedValue { $0.finished } }
    var wasEndedByHost: Bool { state.withLockedValue { $0.endedByHost } }

    /// Ends the stream here: what it received is still delivered, then the client reads EOF.
    func endByHost() {
        let first = state.withLockedValue { s -> Bool in
            guard !s.finished, !s.endedByHost else { return false }
            s.endedByHost = true
            return true
        }
        if first { stream.close() }
    }

    /// Relays until the stream ends; then `finished` is called once, and the stream is closed
    /// and forgotten (after making sure the guest has our END echo, bounded by `endEchoTimeout`).
    func run(endEchoTimeout: @escaping @Sendable () -> Duration, finished: @escaping @Sendable () -> Void) async {
        var chunks = stream.chunks().makeAsyncIterator()
        relaying: while true {
            state.withLockedValue { $0.waitingSince = .now }
            guard let chunk = await chunks.next() else { break }
            state.withLockedValue { $0.waitingSince = nil }
            while true {
                guard let socket = await outlet.current() else { break relaying }
                do {
                    try await chunk.withUnsafeBytesAsync { try await socket.write($0) }
                    break
                } catch {
                    outlet.detach(socket)
                }
            }
        }
        let endedByGuest = stream.statistics.ended
        outlet.close()
        state.withLockedValue { $0.finished = true }
        finished()
        // The guest closes its connection once it holds our END echo; until then the stream
        // stays, so a connection lost with the echo unread is answered again on the next one.
        if endedByGuest { _ = await stream.closeAfterEndDelivered(timeout: endEchoTimeout()) }
        server.close(stream)
    }

    /// For a relay that never ran (its process could not be started).
    func discard() {
        outlet.close()
        server.close(stream)
    }
}

/// The attached client's input → guest stdin. Its end-of-file is the explicit end of stdin.
/// Closed when the process's outcome is known (nothing reads it any more).
final class InputRelay: Sendable {
    let token: [UInt8]
    let stream: ResumableStream<AsyncFD>
    let outlet = Outlet()
    private let server: StreamServer<AsyncFD>

    /// Opens the host stream (with a new secret); refused if the token is open already.
    init(token: [UInt8], server: StreamServer<AsyncFD>) throws(StreamServerError) {
        self.token = token
        self.server = server
        self.stream = try server.open(token: token, direction: .send)
    }

    func run() async {
        defer { outlet.close() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        while let socket = await outlet.current() {
            let count: Int
            do {
                count = try await socket.read(into: buffer)
            } catch {
                outlet.detach(socket)  // replaced by a newer client: read from that one
                continue
            }
            if count == 0 { break }
            do {
                try await stream.send(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            } catch {
                return
            }
        }
        _ = await stream.finish()
    }

    func close() {
        outlet.close()
        server.close(stream)
    }
}

/// Where one stream of a `host run` process meets the client attached now. With no client, the
/// stream's relay waits here (a suspended task).
final class Outlet: Sendable {
    private let state = NIOLockedValueBox<(socket: AsyncFD?, waiters: [CheckedContinuation<AsyncFD?, Never>], closed: Bool)>((nil, [], false))

    var isClosed: Bool { state.withLockedValue { $0.closed } }

    /// The attached client's socket, waiting for one; nil once closed.
    func current() async -> AsyncFD? {
        await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> AsyncFD?? in
                if s.closed { return .some(nil) }
                if let socket = s.socket { return .some(socket) }
                s.waiters.append(continuation)
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// A new client: the previous one's socket is closed. Returns false (and closes `socket`)
    /// if the outlet is closed already.
    @discardableResult
    func attach(_ socket: AsyncFD) -> Bool {
        let (previous, waiters, rejected) = state.withLockedValue { s -> (AsyncFD?, [CheckedContinuation<AsyncFD?, Never>], Bool) in
            if s.closed { return (nil, [], true) }
            let previous = s.socket
            s.socket = socket
            defer { s.waiters.removeAll() }
            return (previous, s.waiters, false)
        }
        if rejected { socket.close() }
        previous?.close()
        for waiter in waiters { waiter.resume(returning: socket) }
        return !rejected
    }

    /// The client on `socket` is gone.
    func detach(_ socket: AsyncFD) {
        let gone = state.withLockedValue { s -> Bool in
            guard s.socket === socket else { return false }
            s.socket = nil
            return true
        }
        if gone { socket.close() }
    }

    func close() {
        let (socket, waiters) = state.withLockedValue { s -> (AsyncFD?, [CheckedContinuation<AsyncFD?, Never>]) in
            s.closed = true
            defer {
                s.socket = nil
                s.waiters.removeAll()
            }
            return (s.socket, s.waiters)
        }
        socket?.close()
        for waiter in waiters { waiter.resume(returning: nil) }
    }
}

extension Array where Element == UInt8 {
    func withUnsafeBytesAsync(_ body: (UnsafeRawBufferPointer) async throws -> Void) async throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Swift.max(count, 1), alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: self)
        try await body(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
    }
}
