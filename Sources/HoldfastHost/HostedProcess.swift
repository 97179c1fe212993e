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

    init(bootID: String, instanceID: String?) {
        self.bootID = bootID
        self.instanceID = instanceID
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
/// are handed over; then host serve forgets it (keeping its outcome, and its log, for a late
/// `wait`, `ps -a` or `logs`).
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
        /// The guest's pid, once the create returned.
        var pid: Int32?
        /// Waiters for the outcome with its output handed over (`untilExit` false), or for the
        /// outcome alone (true).
        var waiters: [UInt64: (continuation: CheckedContinuation<HostWaitResponse?, Never>, untilExit: Bool)] = [:]
        var nextWaiter: UInt64 = 0
        /// The control client whose sockets carry the streams now (`run` or `attach`), and the
        /// waits of such clients for another to take its place (`waitUntilDisplaced`).
        var attachedClient: UInt64?
        /// The last clients that had the sockets before it (a few: a client asks within moments
        /// of its attach, or not at all).
        var formerClients: [UInt64] = []
        var displacementWaiters: [UInt64: (client: UInt64, continuation: CheckedContinuation<Bool, Never>)] = [:]
    }

    let id: String
    let outputs: [OutputRelay]
    let input: InputRelay?
    /// What host serve keeps of its output (`host logs`).
    let log: ProcessLog
    /// The command, for `host ps`.
    let command: String
    let tty: Bool
    /// Where its record, output and outcome are kept across a restart of host serve (nil
    /// without a state directory).
    let files: ProcessFiles?
    let state: NIOLockedValueBox<State>

    init(
        id: String, outputs: [OutputRelay], input: InputRelay?, log: ProcessLog, command: String, tty: Bool, drainTimeout: Duration,
        files: ProcessFiles? = nil
    ) {
        self.id = id
        self.files = files
        self.outputs = outputs
        self.input = input
        self.log = log
        self.command = command
        self.tty = tty
        self.state = NIOLockedValueBox(State(drainTimeout: drainTimeout))
    }

    /// The outcome, once known (the output may still be on its way).
    var knownOutcome: HostWaitResponse? {
        state.withLockedValue {
            switch $0.phase {
            case .starting, .running: return nil
            case .ending(let outcome, _), .finished(let outcome): return outcome
            }
        }
    }

    /// For `host ps`.
    var info: HostProcessInfo {
        state.withLockedValue { s in
            switch s.phase {
            case .starting: return HostProcessInfo(id: id, pid: s.pid, state: .starting, exitCode: nil, command: command)
            case .running: return HostProcessInfo(id: id, pid: s.pid, state: .running, exitCode: nil, command: command)
            case .ending(let outcome, _), .finished(let outcome):
                return HostProcessInfo(
                    id: id, pid: s.pid, state: outcome.exit == nil ? .lost : .exited, exitCode: outcome.exit?.exitCode, command: command,
                    oomKilled: outcome.exit?.wasLikelyOOMKilled == true ? true : nil)
            }
        }
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
        let (first, exitWaiters) = state.withLockedValue { s -> (Bool, [CheckedContinuation<HostWaitResponse?, Never>]) in
            switch s.phase {
            case .starting, .running:
                s.phase = .ending(outcome, since: .now)
                let waiting = s.waiters.filter { $0.value.untilExit }
                for id in waiting.keys { s.waiters.removeValue(forKey: id) }
                return (true, waiting.values.map(\.continuation))
            case .ending, .finished:
                return (false, [])
            }
        }
        guard first else { return false }
        for waiter in exitWaiters { waiter.resume(returning: outcome) }
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
            return (outcome, s.waiters.values.map(\.continuation))
        }
        for waiter in waiters { waiter.resume(returning: response) }
        return response
    }

    /// Waits for the outcome with the output handed over — or, `untilExit`, for the outcome
    /// alone (nil if host serve closed first). Cancelling the waiting task (its client went
    /// away) forgets the waiter.
    func waitForOutcome(untilExit: Bool = false) async -> HostWaitResponse? {
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let done = state.withLockedValue { s -> HostWaitResponse?? in
                    if case .finished(let outcome) = s.phase { return .some(outcome) }
                    if untilExit, case .ending(let outcome, _) = s.phase { return .some(outcome) }
                    if Task.isCancelled { return .some(nil) }
                    s.waiters[id] = (continuation, untilExit)
                    return .none
                }
                if let done { continuation.resume(returning: done) }
            }
        } onCancel: {
            state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.continuation.resume(returning: nil)
        }
    }

    /// Control client `client` now has the streams' sockets: a client that had them is told,
    /// through its `waitUntilDisplaced`.
    func attached(by client: UInt64) {
        let displaced = state.withLockedValue { s -> [CheckedContinuation<Bool, Never>] in
            if let previous = s.attachedClient, previous != client {
                s.formerClients.append(previous)
                if s.formerClients.count > 16 { s.formerClients.removeFirst() }
            }
            s.formerClients.removeAll { $0 == client }
            s.attachedClient = client
            let gone = s.displacementWaiters.filter { $0.value.client != client }
            for key in gone.keys { s.displacementWaiters.removeValue(forKey: key) }
            return gone.values.map(\.continuation)
        }
        for waiter in displaced { waiter.resume(returning: true) }
    }

    /// Whether control client `client` has the streams' sockets now.
    func isAttached(_ client: UInt64) -> Bool { state.withLockedValue { $0.attachedClient == client } }

    /// Whether control client `client` had the sockets and another client took them: its
    /// `wait` is answered `attached-elsewhere` (whenever it comes: a wait sent just after its
    /// attach can arrive after the next client's), and its `detach` is refused (it would let go
    /// of the new client's output).
    func wasDisplaced(_ client: UInt64) -> Bool {
        state.withLockedValue { $0.attachedClient != client && $0.formerClients.contains(client) }
    }

    /// Returns true once another client attached in place of `client`; false if cancelled first.
    func waitUntilDisplaced(_ client: UInt64) async -> Bool {
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let done = state.withLockedValue { s -> Bool? in
                    if s.attachedClient != client { return true }
                    if Task.isCancelled { return false }
                    s.displacementWaiters[id] = (client, continuation)
                    return nil
                }
                if let done { continuation.resume(returning: done) }
            }
        } onCancel: {
            state.withLockedValue { $0.displacementWaiters.removeValue(forKey: id) }?.continuation.resume(returning: false)
        }
    }

    /// The outcome, waiting at most `timeout` for it; nil when it did not come in time.
    func waitForExit(within timeout: Duration) async -> HostWaitResponse? {
        await withTaskGroup(of: HostWaitResponse?.self) { group in
            group.addTask { await self.waitForOutcome(untilExit: true) }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
    }

    /// host serve is closing: every stream and waiter goes.
    func abandon() {
        input?.close()
        for output in outputs {
            output.endByHost()
            output.outlet.close()
        }
        log.endAll()
        let waiters = state.withLockedValue { s -> [CheckedContinuation<HostWaitResponse?, Never>] in
            defer { s.waiters.removeAll() }
            return s.waiters.values.map(\.continuation)
        }
        for waiter in waiters { waiter.resume(returning: nil) }
    }
}

/// Guest output (stdout, stderr, a tty's output) → the process's log and the attached client.
/// A *held* output (a process started in the foreground) does not lose anything when its client
/// goes away unannounced (killed): the chunk waits for the next `attach` (back-pressure up to
/// the guest). A client that detaches on purpose (its keys, Ctrl-C) says so first (`detach`),
/// and the output is then let go of: it goes on as a detached one's. An output
/// that is not held (a process started with `--detach`) goes on into the log while no client
/// is attached, as conmon's does, and an `attach` follows it from then on. The stream's end —
/// the guest's END, or host serve ending it — closes the client's socket after the last byte.
final class OutputRelay: Sendable {
    let kind: String
    let token: [UInt8]
    let stream: ResumableStream<AsyncFD>
    let outlet: Outlet
    private let log: ProcessLog
    private let server: StreamServer<AsyncFD>
    /// Where each byte is kept before the guest is told it arrived (a state directory): a
    /// restart of host serve resumes at the file's end.
    private let file: OutputLogFile?
    /// Where the stream's end is written down before the guest hears it arrived (the END echo
    /// is held until then): a new host serve does not wait for an output that had ended.
    private let files: ProcessFiles?
    private let say: @Sendable (String) -> Void
    private let state = NIOLockedValueBox<(waitingSince: ContinuousClock.Instant?, finished: Bool, endedByHost: Bool)>((nil, false, false))

    /// Opens the host stream (with a new secret, or the one a restart restores, resuming at
    /// `file`'s end); refused if the token is open already.
    init(
        kind: String, token: [UInt8], server: StreamServer<AsyncFD>, log: ProcessLog, held: Bool, secret: StreamSecret = .random(),
        file: OutputLogFile? = nil, files: ProcessFiles? = nil, resume: Bool = false, say: @escaping @Sendable (String) -> Void = { _ in }
    ) throws(StreamServerError) {
        self.kind = kind
        self.token = token
        self.server = server
        self.log = log
        self.file = file
        self.files = files
        self.say = say
        self.outlet = Outlet(holding: held)
        var configuration = ResumableConfiguration()
        configuration.acknowledgeDelivered = file != nil
        configuration.holdEndEcho = files != nil
        self.stream = try server.open(
            token: token, direction: .receive, secret: secret, configuration: configuration, resumeAt: resume ? file?.end : nil)
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
        defer { file?.close() }
        relaying: while true {
            state.withLockedValue { $0.waitingSince = .now }
            guard let chunk = await chunks.next() else { break }
            state.withLockedValue { $0.waitingSince = nil }
            if file != nil, Failpoint.fails(Failpoint.hostServeChunkReceived, process: "host-serve", passes: 20...20) {
                try? await Task.sleep(for: .milliseconds(500))
                Failpoint.pass(Failpoint.hostServeChunkReceived, process: "host-serve")
            }
            log.append(kind, chunk)
            if let file {
                // Kept before the guest hears it arrived. A write that cannot be done (a full
                // disk) is tried again each second, the rest of the chunk only: meanwhile the
                // guest holds the bytes, and its process waits once its buffers are full.
                var rest = chunk[...]
                var said = false
                keeping: while true {
                    switch file.append(rest) {
                    case .all, .closed:
                        break keeping
                    case .part(let written, let reason):
                        rest = rest.dropFirst(written)
                        if !said {
                            said = true
                            say("warning: \(kind) cannot be written to the state directory (\(reason)); it waits until it can (the guest holds it)")
                        }
                        try? await Task.sleep(for: .seconds(1))
                        if outlet.isClosed || wasEndedByHost { break keeping }
                    }
                }
                stream.delivered(chunk.count)
            }
            while true {
                let client: AsyncFD
                if outlet.isHolding {
                    guard let socket = await outlet.current() else {
                        if outlet.isClosed { break relaying }
                        continue  // let go of (the client detached): into the log only
                    }
                    client = socket
                } else {
                    if outlet.isClosed { break relaying }
                    guard let socket = outlet.attachedNow else { break }  // in the log only
                    client = socket
                }
                do {
                    try await chunk.withUnsafeBytesAsync { try await client.write($0) }
                    break
                } catch {
                    outlet.detach(client)
                }
            }
        }
        let endedByGuest = stream.statistics.ended
        if endedByGuest, let files {
            do throws(HoldfastError) {
                try files.markEnded(kind)
            } catch {
                say("warning: \(kind)'s end cannot be written down (\(error)): a restart of host serve now would wait for it a drain timeout")
            }
            stream.releaseEndEcho()
        }
        log.end(kind)
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
        file?.close()
        log.end(kind)
        outlet.close()
        server.close(stream)
    }
}

/// The attached client's input → guest stdin. A client going away (its socket's end-of-file
/// with no word before it) is not the end of stdin: the next `attach` takes over. The end is
/// explicit — the client's `closeStdin` after the last byte it wrote — and only then does the
/// guest's stdin end. Closed when the process's outcome is known (nothing reads it any more).
final class InputRelay: Sendable {
    let token: [UInt8]
    let stream: ResumableStream<AsyncFD>
    let outlet = Outlet()
    private let server: StreamServer<AsyncFD>
    /// The client said its stdin ended.
    private let endRequested = NIOLockedValueBox(false)
    /// Closed here (the process's outcome known, or host serve stopping): the loop's end is
    /// not the client's, whatever it asked — its socket may still hold bytes.
    private let closedHere = NIOLockedValueBox(false)
    /// With a state directory: the bytes handed to the stream, counted before each hand-over,
    /// and where the end is written down.
    private let offset: InputOffsetFile?
    private let files: ProcessFiles?
    private let say: @Sendable (String) -> Void

    /// How long the stdin's END waits for the guest without progress: as long as the process
    /// lives (the relay is closed at its outcome). The stream's usual 30 s gave the END up when
    /// the guest was away longer — a migration's blackout, a paused VM — and the host forgot the
    /// stream: the guest's redials were refused as an unknown stream, the process never read
    /// end-of-file and never exited, and nothing said so.
    static let endWait: Duration = .seconds(86_400 * 365)

    /// Opens the host stream (with a new secret, or the one a restart restores, resuming at what
    /// `offset` counted: `ended` if the client had ended stdin); refused if the token is open
    /// already.
    init(
        token: [UInt8], server: StreamServer<AsyncFD>, secret: StreamSecret = .random(), offset: InputOffsetFile? = nil,
        files: ProcessFiles? = nil, resume: Bool = false, ended: Bool = false, say: @escaping @Sendable (String) -> Void = { _ in }
    ) throws(StreamServerError) {
        self.token = token
        self.server = server
        self.offset = offset
        self.files = files
        self.say = say
        self.stream = try server.open(
            token: token, direction: .send, secret: secret, configuration: ResumableConfiguration(drainTimeout: Self.endWait),
            resumeAt: resume ? offset?.value : nil)
        if ended {
            endRequested.withLockedValue { $0 = true }
            outlet.close()
        }
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
            if count == 0 {
                // This client is done writing: the end of stdin if it said so, else it went
                // away and the next client takes over. (Checked after the detach: a closeStdin
                // that comes later finds no client and ends the wait itself.)
                outlet.detach(socket)
                if endRequested.withLockedValue({ $0 }) { break }
                continue
            }
            // Counted first: a restart between the two leaves the count at or past what the
            // guest received, never below it (the difference is a gap, not a repeat). A count
            // that cannot be written (a full disk) holds the bytes back until it can: sent
            // uncounted, they would leave a restart below the guest, refused for good.
            if let offset {
                var said = false
                while !offset.advance(by: count) {
                    if !said {
                        said = true
                        say("warning: the stdin count cannot be written to the state directory; stdin waits until it can")
                    }
                    try? await Task.sleep(for: .seconds(1))
                    if outlet.isClosed { return }
                }
            }
            do {
                try await stream.send(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            } catch {
                return
            }
        }
        if endRequested.withLockedValue({ $0 }), !closedHere.withLockedValue({ $0 }) {
            // Written once the client's socket was read to its end: a restart before this
            // leaves stdin open (a later client may end it), never ends it short.
            try? files?.markStdinEnded()
            _ = await stream.finish()
        }
    }

    /// The client's stdin ended, after the last byte it wrote on its socket: once that socket
    /// has been read to its end, the guest's stdin ends.
    func endOfInput() {
        endRequested.withLockedValue { $0 = true }
        outlet.closeIfNoClient()
    }

    func close() {
        closedHere.withLockedValue { $0 = true }
        outlet.close()
        server.close(stream)
    }
}

/// Where one stream of a `host run` process meets the client attached now. With no client, the
/// stream's relay waits here (a suspended task).
final class Outlet: Sendable {
    private let state: NIOLockedValueBox<(socket: AsyncFD?, waiters: [CheckedContinuation<AsyncFD?, Never>], closed: Bool, holding: Bool)>

    /// `holding`: what comes waits for a client (a stdin always; a foreground process's output,
    /// until `letGoOfOutput`).
    init(holding: Bool = true) {
        state = NIOLockedValueBox((nil, [], false, holding))
    }

    var isClosed: Bool { state.withLockedValue { $0.closed } }

    /// Whether what comes waits for a client.
    var isHolding: Bool { state.withLockedValue { $0.holding } }

    /// The client detached on purpose (its keys, Ctrl-C): what comes goes on without waiting for
    /// the next one (into the log), as for a process started detached. One waiting for a
    /// client stops waiting.
    func letGoOfOutput() {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<AsyncFD?, Never>] in
            guard s.holding else { return [] }
            s.holding = false
            defer { s.waiters.removeAll() }
            return s.socket == nil ? s.waiters : []
        }
        for waiter in waiters { waiter.resume(returning: nil) }
    }

    /// The client attached now, without waiting for one.
    var attachedNow: AsyncFD? { state.withLockedValue { $0.socket } }

    /// Closes the outlet if no client is attached (the one waiting for a client stops waiting).
    func closeIfNoClient() {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<AsyncFD?, Never>] in
            guard s.socket == nil, !s.closed else { return [] }
            s.closed = true
            defer { s.waiters.removeAll() }
            return s.waiters
        }
        for waiter in waiters { waiter.resume(returning: nil) }
    }

    /// The attached client's socket, waiting for one while holding; nil once closed, or when
    /// there is none and it no longer holds.
    func current() async -> AsyncFD? {
        await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> AsyncFD?? in
                if s.closed { return .some(nil) }
                if let socket = s.socket { return .some(socket) }
                if !s.holding { return .some(nil) }
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
