import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The host end of the bridge (docs/PROTOCOL.md, "Bridge"): accepts the guest's bridge
/// connections — any number over time, the newest authenticated one replacing the last — and
/// offers the guest's requests as async calls and its exits as an async sequence.
///
/// A connection counts only once its peer has proved it holds the bridge key (docs/PROTOCOL.md,
/// "Bridge authentication") and said hello: until then it is sent nothing but the handshake,
/// it is read for nothing else, and it displaces nothing. A peer that fails is refused, and a
/// warning (rate-limited) says so.
///
/// Exits are delivered exactly once to `exits`: an exit the guest repeats (in a hello after a
/// reconnect, because our acknowledgement was lost with the connection) is acknowledged again
/// but not delivered again. Requests made while no guest is connected wait for one (bounded).
///
/// Hellos and exits are delivered in the order the guest sent them, across connections too: a
/// new connection's hello only after everything the connection it replaces delivered. A host
/// that must see them interleaved (an exit of the old daemon before the new daemon's hello)
/// passes an `observer`, which then receives both, in that order, instead of `hellos`/`exits`.
public final class BridgeServer: Sendable {
    public let address: SocketAddress
    /// Every guest hello, in order (boot id, live processes, pending exits); the newest
    /// `helloBacklog` kept while nobody reads (a guest that redials without end with 64 KiB
    /// hellos filled the memory of a host agent that never iterates this). Empty (finished at
    /// once) when an observer was given.
    public let hellos: AsyncStream<BridgeHello>
    public static let helloBacklog = 16
    /// Each process exit, once. Empty (finished at once) when an observer was given.
    public let exits: AsyncStream<ExitReport>

    /// Whether guests must prove they hold the bridge key.
    public enum Authentication: Sendable, CustomStringConvertible {
        /// The guest proves it holds this key, and we prove we do (HMAC-SHA256, both ways).
        case key(BridgeKey)
        /// Whoever dials is taken as the guest: any process in the guest can pose as the daemon.
        /// For a guest configured with `bridge.authentication: none`; warned about at start.
        case none

        public var description: String {
            switch self {
            case .key: BridgeAuthenticationMethod.hmacSHA256.rawValue
            case .none: BridgeAuthenticationMethod.none.rawValue
            }
        }
    }

    /// Unauthenticated connections in their handshake at once, from peers nothing vouches for;
    /// one more closes the oldest of them (a flood of silent connections costs bounded fds).
    public static let maxPendingHandshakes = 64
    /// The same for connections something vouches for, in two pools of this size apart: a
    /// challenge whose nonce carries the key's voucher (`BridgeHandshake.makeGuestNonce`; over
    /// any transport, a Unix socket fed by a VMM included), and, below it, a source port under
    /// 1024 without one (`ReservedPorts`: TCP or vsock; the guest's bridge worker dials from
    /// one, which is all that vouches for it with `authentication: none`). Each pool pushes out
    /// only its own: a flood from a guest process that has neither the privilege nor the key,
    /// however fast, never pushes out the daemon's handshake, and one that can bind a reserved
    /// port (a root container keeps CAP_NET_BIND_SERVICE by default) never pushes out one that
    /// holds the key. (With one pool, one process dialling as fast as it could kept the guest
    /// off the bridge for 15 s and more; with the port and the key in one, a reserved-port
    /// flood could.)
    public static let maxVouchedPendingHandshakes = 16
    /// Vouchers seen lately: one seen again (a recorded challenge replayed) vouches for nothing.
    /// Only connections that hold the key add to it, so a flood cannot wash a voucher out.
    public static let rememberedVouchers = 1024

    /// When an exit is acknowledged to the guest (which forgets it once it has the
    /// acknowledgement, and repeats it in every hello until then).
    public enum ExitAcknowledgement: Sendable, Equatable {
        /// As it is delivered (to `exits` or the observer): simple, but an exit delivered and
        /// not yet handled when the host agent dies (a crash, a restart) is gone — the guest
        /// was told the host had it.
        case onDelivery
        /// When the caller says it handled it (`acknowledgeExit`): until then the guest keeps it
        /// and repeats it in every hello, so a host agent that dies before handling an exit is
        /// given it again by the guest when it comes back (at least once across agent restarts,
        /// exactly once within one `BridgeServer`).
        case byCaller
    }

    /// What the guest says, in order, for an observer.
    public enum Event: Sendable, Equatable {
        /// A guest connected: `hello.instanceID` and `hello.bootID` say whether it is the same
        /// daemon as before. Delivered before any exit or reply of that connection.
        case hello(BridgeHello)
        /// A process exit, once (a repeat of one already delivered is not).
        case exit(ExitReport)
    }

    let listener: Listener
    let helloSink: AsyncStream<BridgeHello>.Continuation
    let exitSink: AsyncStream<ExitReport>.Continuation
    let state: NIOLockedValueBox<State>
    let handshakeTimeout: Duration
    let warn: @Sendable (String) -> Void
    let observer: (@Sendable (Event) -> Void)?
    let exitAcknowledgement: ExitAcknowledgement
    /// How long the oldest of `Connection.maximumOutstanding` unanswered requests may wait before
    /// its connection is dropped.
    let unansweredRequestAge: Duration
    /// How many confirmed exits are remembered against late repeats (see `State.deliveredExits`).
    public static let rememberedConfirmedExits = 4096
    /// How many exits may wait for the guest's confirmation at once. A guest holds each exit
    /// until it is acknowledged, so a real one has no more than it has processes; one that sends
    /// exits of ids without end and never confirms grew this table for good (the oldest are
    /// forgotten past it: a late repeat of one would be delivered again).
    public static let maximumUnconfirmedExits = 65_536
    /// An exit's id is at most this long: the guest refuses longer ones at a create, so a longer
    /// one is not from a process it ran (ignored, said).
    public static let maximumIDLength = 256

    /// What vouches for a connection in its handshake: the pool it waits in.
    enum AdmissionTier: Sendable, Equatable {
        case ordinary
        case reservedPort
        case keyVouched
    }

    struct State {
        var authentication: Authentication
        var pendingHandshakes: [UInt64: (socket: AsyncFD, tier: AdmissionTier)] = [:]
        var nextHandshake: UInt64 = 0
        var refused = 0
        var vouchedAdmitted = 0
        var reservedPortAdmitted = 0
        var recentVouchers = RecentVouchers()
        var lastWarning: ContinuousClock.Instant?
        var warningsHeldBack = 0
        var connection: Connection?
        var waitingForGuest: [UInt64: CheckedContinuation<Connection?, Never>] = [:]
        var nextWaiter: UInt64 = 0
        /// Exits delivered (id → whether the guest confirmed our acknowledgement): a repeat of
        /// one of these is acknowledged again, not delivered again. A confirmed exit is gone from
        /// the guest's list, so only a copy already on its way can still come (a resend racing
        /// the acknowledgement); the newest `rememberedConfirmedExits` confirmed ids are kept for
        /// that, older ones forgotten, so memory does not grow with processes run.
        var deliveredExits: [String: Bool] = [:]
        /// Exits the caller said it handled (`acknowledgeExit`, `byCaller`) whose acknowledgement
        /// the guest has not confirmed yet: acknowledged on every connection that repeats them.
        var handledExits: Set<String> = []
        var confirmedOrder = IDQueue<String>()
        /// Deliveries not confirmed, oldest first, each with the generation of its delivery (an
        /// id created again is delivered again: its earlier entry here is stale, skipped), and
        /// how many are still unconfirmed.
        var unconfirmedOrder = IDQueue<(id: String, generation: UInt64)>()
        var deliveryGeneration: [String: UInt64] = [:]
        var nextGeneration: UInt64 = 0
        var unconfirmed = 0
        var ignoredExits = 0
        var lastIgnoredWarning: ContinuousClock.Instant?

        /// Whether `entry` is the unconfirmed delivery it names (not confirmed, forgotten or
        /// delivered again since).
        func isLive(_ entry: (id: String, generation: UInt64)) -> Bool {
            deliveredExits[entry.id] == false && deliveryGeneration[entry.id] == entry.generation
        }

        /// Records a first delivery of `id`, forgetting the oldest unconfirmed past the bound.
        mutating func delivered(_ id: String) {
            nextGeneration &+= 1
            deliveredExits[id] = false
            deliveryGeneration[id] = nextGeneration
            unconfirmed += 1
            unconfirmedOrder.append((id, nextGeneration))
            while unconfirmed > BridgeServer.maximumUnconfirmedExits, let oldest = unconfirmedOrder.popFirst() {
                guard isLive(oldest) else { continue }
                deliveredExits.removeValue(forKey: oldest.id)
                deliveryGeneration.removeValue(forKey: oldest.id)
                handledExits.remove(oldest.id)
                unconfirmed -= 1
            }
            // Stale entries stay in the queue until they are popped: dropped when they outnumber
            // the live ones, so the queue stays within twice the table.
            if unconfirmedOrder.count > 2 * unconfirmed + 1024 {
                let live = unconfirmedOrder.remaining.filter { isLive($0) }
                unconfirmedOrder = IDQueue(items: Array(live))
            }
        }

        /// Forgets `id`'s exit (its id is created again).
        mutating func forgetExit(_ id: String) {
            if deliveredExits.removeValue(forKey: id) == false { unconfirmed -= 1 }
            deliveryGeneration.removeValue(forKey: id)
        }
        var refusing = false
        var closed = false
        var accepted = 0
        var lastHello: BridgeHello?
        var repeatedCreates = 0
        var repeatedSignals = 0
    }

    /// One guest connection: its writer and the requests waiting for a reply on it.
    final class Connection: Sendable {
        let hello: BridgeHello
        let frames: StreamFrames<AsyncFD>
        /// Requests to the guest, replies matched by id; its reader hands exits (id 0) on.
        let rpc: RPCClient
        private let onExit = NIOLockedValueBox<(@Sendable (ExitReport) -> Void)?>(nil)
        /// Set once this connection's reader has stopped delivering (its last exit is out).
        private let served = NIOLockedValueBox<(done: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

        init(_ socket: AsyncFD, hello: BridgeHello, unansweredAge: Duration) {
            self.unansweredAge = unansweredAge
            self.hello = hello
            frames = StreamFrames(socket, maxBody: BridgeProtocol.maxBody)
            let onExit = self.onExit
            rpc = RPCClient(transport: frames, closeDescriptors: { _ in }) { frame in
                guard frame.type == BridgeMessageType.exit.rawValue,
                    let report = try? ControlJSON.decode(ExitReport.self, from: frame.body, frameType: frame.type)
                else { return }
                onExit.withLockedValue { $0 }?(report)
            }
        }

        /// Reads replies and exits until the connection ends; `deliver` gets each exit.
        /// `ended` runs once the connection has ended and before its requests fail `bridge-lost`.
        func run(deliver: @escaping @Sendable (ExitReport) -> Void, ended: () -> Void) async {
            onExit.withLockedValue { $0 = deliver }
            await rpc.run(beforeFailingPending: ended)
            markServed()
        }

        func markServed() {
            let waiters = served.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                s.done = true
                defer { s.waiters.removeAll() }
                return s.waiters
            }
            for waiter in waiters { waiter.resume() }
        }

        /// Waits until the reader has stopped (after `close()`, promptly: its read fails).
        func waitServed() async {
            await withCheckedContinuation { continuation in
                let done = served.withLockedValue { s -> Bool in
                    if s.done { return true }
                    s.waiters.append(continuation)
                    return false
                }
                if done { continuation.resume() }
            }
        }

        /// Requests sent on it and not answered yet, by a number of their own, with when each
        /// was sent.
        private let outstanding = NIOLockedValueBox<(next: UInt64, sent: [UInt64: ContinuousClock.Instant])>((0, [:]))
        /// A guest that leaves this many requests unanswered, the oldest for longer than
        /// `unansweredAge`, has stopped serving this connection (a bug, or a guest that reads and
        /// never answers): it is dropped, failing them, and the guest redials. Kept open, each
        /// timed-out request left its waiter and frame behind for as long as the connection
        /// lasted, and every poll and acknowledgement added more. A burst alone drops nothing:
        /// the guest takes 32 requests at a time, and a fleet's creates, or the acknowledgements
        /// of 2,000 exits a hello brings, wait their turn.
        static let maximumOutstanding = 1024
        let unansweredAge: Duration

        /// Sends a request; the guest's reply, or `bridge-lost` if the connection ends first.
        func request(_ request: BridgeRequest) async throws(HoldfastError) -> ControlFrame {
            let now = ContinuousClock.now
            let (number, stalled) = outstanding.withLockedValue { state -> (UInt64, Bool) in
                if state.sent.count >= Self.maximumOutstanding, let oldest = state.sent.values.min(), now - oldest > unansweredAge {
                    return (0, true)
                }
                state.next &+= 1
                state.sent[state.next] = now
                return (state.next, false)
            }
            guard !stalled else {
                close()
                throw HoldfastError(
                    .bridgeLost,
                    "the guest left \(Self.maximumOutstanding) requests on its bridge connection unanswered, the oldest for over \(unansweredAge): the connection was dropped (the guest redials)")
            }
            defer { outstanding.withLockedValue { _ = $0.sent.removeValue(forKey: number) } }
            do throws(HoldfastError) {
                return try await rpc.request(request.frameType, body: request.body).frame
            } catch {
                guard error.code == .channelClosed else { throw error }
                throw HoldfastError(.bridgeLost, "the bridge connection was lost before the guest replied", cause: error)
            }
        }

        func close() { frames.close() }
    }

    /// `authentication` has no default: a host must say whether it checks the guest's key.
    /// `handshakeTimeout` bounds a connection's handshake and hello together; `warn` receives
    /// the warnings (refused peers, unauthenticated mode), by default on standard error.
    /// - Parameter observer: receives hellos and exits in order, synchronously on the
    ///   connection's reader (keep it short: no waiting); `hellos` and `exits` then stay empty,
    ///   so nothing accumulates there unread.
    public init(
        listeningOn address: SocketAddress, authentication: Authentication, unixMode: mode_t? = nil,
        handshakeTimeout: Duration = .seconds(5), warn: @escaping @Sendable (String) -> Void = BridgeServer.warnOnStandardError,
        observer: (@Sendable (Event) -> Void)? = nil, exitAcknowledgement: ExitAcknowledgement = .onDelivery,
        unansweredRequestAge: Duration = .seconds(30)
    ) throws {
        self.unansweredRequestAge = unansweredRequestAge
        self.address = address
        self.handshakeTimeout = handshakeTimeout
        self.warn = warn
        self.observer = observer
        self.exitAcknowledgement = exitAcknowledgement
        state = NIOLockedValueBox(State(authentication: authentication))
        listener = try Listener(binding: address, unixMode: unixMode)
        (hellos, helloSink) = AsyncStream<BridgeHello>.makeStream(bufferingPolicy: .bufferingNewest(Self.helloBacklog))
        (exits, exitSink) = AsyncStream<ExitReport>.makeStream()
        if observer != nil {
            helloSink.finish()
            exitSink.finish()
        }
        if case .none = authentication {
            warn("bridge \(address): authentication none: any process in the guest that can dial this address is taken as the guest")
        }
    }

    /// Writes "holdfast bridge: WARNING" lines to standard error.
    public static let warnOnStandardError: @Sendable (String) -> Void = { message in
        var line = Array("holdfast bridge: warning: \(message)\n".utf8)
        _ = line.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress, $0.count) }
    }

    /// Uses another key (or none) for connections from now on; the connected guest stays (key
    /// rotation: README "Security").
    public func setAuthentication(_ authentication: Authentication) {
        state.withLockedValue { $0.authentication = authentication }
        if case .none = authentication {
            warn("bridge \(address): authentication none: any process in the guest that can dial this address is taken as the guest")
        }
    }

    /// The address actually bound (a TCP port 0 becomes the port the kernel chose).
    public var boundAddress: SocketAddress { listener.boundAddress }

    public func start() {
        Task { [self] in
            while let socket = await nextConnection() {
                // While refusing (a blackout) a new connection is held, unread, until the
                // blackout ends — like a host that is not there yet: the guest waits for it
                // instead of seeing a connection that opens and dies again and again.
                while true {
                    let generation = refusalChanges.generation
                    guard state.withLockedValue({ $0.refusing && !$0.closed }) else { break }
                    await refusalChanges.wait(since: generation, timeout: .seconds(1))
                }
                if state.withLockedValue({ $0.closed }) {
                    socket.close()
                    continue
                }
                // Admitted here, in accept order, not in the task: "the oldest" pushed out by a
                // flood must be the one that came first, not the one whose task ran last.
                let ticket = admit(socket)
                Task { await serve(socket, ticket: ticket) }
            }
        }
    }

    // MARK: Requests

    /// Creates a process in the guest; returns its pid there. Exactly once, across bridge
    /// drops: the create carries an idempotency key (a random one unless the spec names its
    /// own), and when the bridge is lost before the reply it is sent again on the next
    /// connection, until `timeout` — the guest answers a repeat with the first one's pid
    /// instead of starting the program again (docs/PROTOCOL.md, "Repeating a create").
    public func create(_ spec: ProcessSpec, timeout: Duration = .seconds(30)) async throws(HoldfastError) -> Int32 {
        try await createProcess(spec, timeout: timeout).pid
    }

    /// A process the guest started, and which daemon started it.
    public struct CreatedProcess: Sendable, Equatable {
        public var pid: Int32
        /// The hello of the connection that carried the reply: its `instanceID` is the daemon
        /// that runs the process (a later hello with another one means that daemon is gone).
        public var hello: BridgeHello
    }

    /// `create`, also saying which daemon (instance and boot) answered.
    public func createProcess(_ spec: ProcessSpec, timeout: Duration = .seconds(30)) async throws(HoldfastError) -> CreatedProcess {
        var keyed = spec
        if keyed.idempotencyKey == nil { keyed.idempotencyKey = RandomIdentifier.make() }
        let deadline = ContinuousClock.now + timeout
        try await settleEarlierExit(of: spec.id, deadline: deadline)
        // The id may be reused once its last exit was acknowledged: its next exit is news.
        // (Before the first attempt: an exit of this very create may arrive before a repeat's
        // reply, and must then not be delivered twice.)
        state.withLockedValue { $0.forgetExit(spec.id) }
        let (reply, hello) = try await repeatedWhileTheBridgeIsLost(
            .create(keyed), reply: LaunchResponse.self, timeout: max(.zero, deadline - ContinuousClock.now), counted: \.repeatedCreates)
        return CreatedProcess(pid: reply.pid, hello: hello)
    }

    /// An earlier exit of `id` that was delivered but whose acknowledgement the guest never
    /// confirmed (the connection that carried it was lost: a migration, a bridge worker's
    /// death, a live upgrade) may still be in the guest's list, and comes again in its next
    /// hello. Forgotten here before the id is created again, that copy would be delivered as
    /// the new process's exit, and the new process's own exit then taken for a repeat and
    /// dropped. So it is acknowledged first — on whichever connection comes, until the guest
    /// confirms (it answers even for an exit it no longer holds) — and only then forgotten.
    private func settleEarlierExit(of id: String, deadline: ContinuousClock.Instant) async throws(HoldfastError) {
        while state.withLockedValue({ $0.deliveredExits[id] == false }) {
            do {
                _ = try await call(
                    .acknowledgeExit(AcknowledgeExitRequest(id: id)), reply: [String: String].self,
                    timeout: max(.zero, deadline - ContinuousClock.now))
                confirmAcknowledgement(of: id)
            } catch where error.code == .bridgeLost && ContinuousClock.now < deadline {
                do {
                    try await Task.sleep(for: Self.repeatPause)
                } catch {
                    throw HoldfastError(.bridgeLost, "the bridge was lost while an earlier exit of '\(id)' was being acknowledged", cause: error)
                }
            }
        }
    }

    /// The guest confirmed our acknowledgement of `id`'s exit: it has forgotten that exit, and
    /// we keep the id only against a late copy, among the newest confirmed ones.
    /// The caller handled the exit of `id` (`exitAcknowledgement: .byCaller`): the guest is
    /// told now if a guest is connected, and on every connection that repeats the exit until it
    /// confirms. With `.onDelivery`, a no-op (it was acknowledged as it was delivered).
    public func acknowledgeExit(_ id: String) {
        guard exitAcknowledgement == .byCaller else { return }
        let connection = state.withLockedValue { s -> Connection? in
            guard s.deliveredExits[id] == false else { return nil }
            s.handledExits.insert(id)
            return s.connection
        }
        if let connection { sendAcknowledgement(of: id, on: connection) }
    }

    /// Acknowledges the exit of `id` on `connection`; the guest's answer confirms it.
    func sendAcknowledgement(of id: String, on connection: Connection) {
        Task { [self] in
            // Any reply means the guest processed the acknowledgement (it answers ok even for an
            // exit it no longer holds); no reply (the connection died) leaves it unconfirmed.
            do throws(HoldfastError) {
                _ = try await connection.request(.acknowledgeExit(AcknowledgeExitRequest(id: id)))
            } catch {
                if error.code == .bridgeLost { return }
            }
            confirmAcknowledgement(of: id)
        }
    }

    func confirmAcknowledgement(of id: String) {
        state.withLockedValue { s in
            s.handledExits.remove(id)
            guard s.deliveredExits[id] == false else { return }
            s.deliveredExits[id] = true
            s.unconfirmed -= 1
            s.confirmedOrder.append(id)
            while s.confirmedOrder.count > Self.rememberedConfirmedExits, let oldest = s.confirmedOrder.popFirst() {
                if s.deliveredExits[oldest] == true {
                    s.deliveredExits.removeValue(forKey: oldest)
                    s.deliveryGeneration.removeValue(forKey: oldest)
                }
            }
        }
    }

    /// Signals a process in the guest. Exactly once, across bridge drops, as `create`: the
    /// signal carries a random idempotency key and is sent again on the next connection when
    /// the bridge is lost before the reply, until `timeout`; the guest answers a repeat of a
    /// signal it sent (`{}`, even if the process has exited or been forgotten since) without
    /// signalling again (docs/PROTOCOL.md, "Repeating a signal"). Only to the same daemon, and
    /// one that says it knows repeats (`keyedSignals` in its hello): to an older daemon, or one
    /// that restarted meanwhile, a repeat could be a second signal, so the call ends
    /// `bridge-lost` instead (it may or may not have been delivered), as before.
    public func signal(_ id: String, _ signal: Int32, timeout: Duration = .seconds(10)) async throws(HoldfastError) {
        let request = SignalRequest(id: id, signal: signal, idempotencyKey: RandomIdentifier.make())
        _ = try await repeatedWhileTheBridgeIsLost(.signal(request), reply: [String: String].self, timeout: timeout, counted: \.repeatedSignals) { first, next in
            first.keyedSignals == true && next.keyedSignals == true && next.instanceID != nil && next.instanceID == first.instanceID
        }
    }

    /// Sends a keyed request (a repeat is answered without being carried out twice), again on
    /// the next connection whenever the bridge was lost before its reply, until `timeout`; each
    /// repeat counted in `counted`. A repeat goes only to a connection whose hello
    /// `repeatableOn` accepts, given the first attempt's: otherwise the loss is the answer. No
    /// guest within `timeout` is `no-guest` for the whole of it; once an attempt was lost, the
    /// loss is (it may have been carried out).
    private func repeatedWhileTheBridgeIsLost<Reply: Decodable>(
        _ request: BridgeRequest, reply: Reply.Type, timeout: Duration, counted: WritableKeyPath<State, Int>,
        repeatableOn: (_ first: BridgeHello, _ next: BridgeHello) -> Bool = { _, _ in true }
    ) async throws(HoldfastError) -> (reply: Reply, hello: BridgeHello) {
        let deadline = ContinuousClock.now + timeout
        var firstSentTo: BridgeHello?
        var lost: HoldfastError?
        var refused = false
        while true {
            do {
                return try await callReportingHello(request, reply: reply, timeout: max(.zero, deadline - ContinuousClock.now)) { hello throws(HoldfastError) in
                    guard let first = firstSentTo else {
                        firstSentTo = hello
                        return
                    }
                    guard repeatableOn(first, hello) else {
                        refused = true
                        throw HoldfastError(
                            .bridgeLost,
                            "the bridge was lost before the guest replied, and the daemon connected now \(hello.instanceID != first.instanceID ? "is another one (it restarted)" : "cannot tell a repeat (an older release)"): not sent again; it may or may not have been carried out",
                            cause: lost)
                    }
                    state.withLockedValue { $0[keyPath: counted] += 1 }
                }
            } catch where error.code == .noGuest {
                throw lost ?? Self.noGuest(at: address, within: timeout)
            } catch {
                guard !refused, error.code == .bridgeLost, ContinuousClock.now < deadline else { throw error }
                let loss = error
                lost = loss
                // The lost connection is out of service already (its requests fail after it is);
                // a moment's pause all the same, so that nothing can make this a busy loop.
                do {
                    try await Task.sleep(for: Self.repeatPause)
                } catch {
                    throw loss  // cancelled: the loss is the answer
                }
            }
        }
    }

    /// The pause before a request lost with the bridge is sent again.
    static let repeatPause: Duration = .milliseconds(20)

    public func resize(_ id: String, rows: UInt16, columns: UInt16, timeout: Duration = .seconds(10)) async throws(HoldfastError) {
        _ = try await call(.resize(ProcessResizeRequest(id: id, rows: rows, columns: columns)), reply: [String: String].self, timeout: timeout)
    }

    public func closeStdin(_ id: String, timeout: Duration = .seconds(10)) async throws(HoldfastError) {
        _ = try await call(.closeStdin(ProcessIDRequest(id: id)), reply: [String: String].self, timeout: timeout)
    }

    public func list(_ request: BridgeListRequest = BridgeListRequest(), timeout: Duration = .seconds(10)) async throws(HoldfastError) -> BridgeListResponse {
        try await call(.list(request), reply: BridgeListResponse.self, timeout: timeout)
    }

    public func stats(timeout: Duration = .seconds(10)) async throws(HoldfastError) -> BrokerStats {
        try await call(.stats, reply: BrokerStats.self, timeout: timeout)
    }

    /// Sends any request and decodes the reply. Waits up to `timeout` for a guest to be connected
    /// and to answer: no reply by then is the error `guest-not-answering` (a guest daemon that
    /// is stopped, traced or overloaded; before, the call waited for as long as the connection
    /// lived). A connection lost before the reply is the error `bridge-lost`. Either way the
    /// request may or may not have been carried out (`create` handles a lost connection itself
    /// by sending its keyed request again).
    public func call<Reply: Decodable>(
        _ request: BridgeRequest, reply: Reply.Type, timeout: Duration
    ) async throws(HoldfastError) -> Reply {
        try await callReportingHello(request, reply: reply, timeout: timeout).reply
    }

    /// `call`, also returning the hello of the connection that carried the reply. `sending`
    /// is told the hello of the connection the request is about to go out on, and may keep it
    /// from going (what it throws is the call's error).
    public func callReportingHello<Reply: Decodable>(
        _ request: BridgeRequest, reply: Reply.Type, timeout: Duration, sending: (BridgeHello) throws(HoldfastError) -> Void = { _ in }
    ) async throws(HoldfastError) -> (reply: Reply, hello: BridgeHello) {
        let deadline = ContinuousClock.now + timeout
        guard let connection = await guest(within: timeout) else { throw Self.noGuest(at: address, within: timeout) }
        try sending(connection.hello)
        // Bounded by what is left of `timeout`: the request's task goes on until the reply or the
        // connection's end (the channel does not take cancellation), its answer then unread.
        let exchange = Task { () -> Result<ControlFrame, HoldfastError> in
            do throws(HoldfastError) {
                return .success(try await connection.request(request))
            } catch {
                return .failure(error)
            }
        }
        guard let outcome = await exchange.value(within: max(.zero, deadline - ContinuousClock.now)) else {
            throw Self.notAnswering(request, within: timeout)
        }
        let frame = try outcome.get()
        do {
            return (try ControlJSON.decode(Reply.self, from: frame.body, frameType: frame.type), connection.hello)
        } catch {
            throw HoldfastError(.badReply, error.description)
        }
    }

    // MARK: Inspection and faults

    public var isConnected: Bool { state.withLockedValue { $0.connection != nil } }
    /// Connections that authenticated and said hello.
    public var acceptedConnections: Int { state.withLockedValue { $0.accepted } }
    /// Connections refused: a handshake that failed, timed out or was pushed out by newer ones.
    public var refusedConnections: Int { state.withLockedValue { $0.refused } }
    /// Connections admitted as vouched for (a reserved source port, or the key's voucher in the
    /// challenge: `maxVouchedPendingHandshakes`).
    public var vouchedConnections: Int { state.withLockedValue { $0.vouchedAdmitted } }
    /// Of those, the connections from a reserved source port (`ReservedPorts`).
    public var reservedPortConnections: Int { state.withLockedValue { $0.reservedPortAdmitted } }
    public var lastHello: BridgeHello? { state.withLockedValue { $0.lastHello } }
    /// Creates sent again because the bridge was lost before their reply.
    public var repeatedCreates: Int { state.withLockedValue { $0.repeatedCreates } }
    /// Signals sent again because the bridge was lost before their reply.
    public var repeatedSignals: Int { state.withLockedValue { $0.repeatedSignals } }
    /// Exits delivered whose acknowledgement the guest has not confirmed yet (bounded: a
    /// confirmed one is forgotten).
    public var unconfirmedExits: Int { state.withLockedValue { $0.deliveredExits.values.count { !$0 } } }
    /// Every exit id kept against repeats, confirmed or not (bounded).
    public var rememberedExits: Int { state.withLockedValue { $0.deliveredExits.count } }

    /// What a request the guest took and did not answer in time says.
    static func notAnswering(_ request: BridgeRequest, within timeout: Duration) -> HoldfastError {
        let what: String
        switch request {
        case .create(let spec):
            what = "the create of '\(spec.id)' (sending it again with the same id and idempotency key starts nothing twice)"
        case .signal(let signal): what = "the signal to '\(signal.id)'"
        case .resize(let resize): what = "the resize of '\(resize.id)'"
        case .closeStdin(let close): what = "the end of '\(close.id)''s stdin"
        case .list: what = "the list"
        case .stats: what = "the stats request"
        case .acknowledgeExit(let acknowledgement): what = "the acknowledgement of '\(acknowledgement.id)''s exit"
        }
        return HoldfastError(
            .guestNotAnswering,
            "the guest did not answer \(what) within \(timeout.spoken): its daemon may be stopped, traced or overloaded ('holdfast status' in the guest says which); the request may still be carried out when it goes on")
    }

    /// What a request that found no guest says: how long it waited, and what to check.
    static func noGuest(at address: SocketAddress, within timeout: Duration) -> HoldfastError {
        HoldfastError(
            .noGuest,
            "no guest connected to the bridge at \(address) within \(timeout.spoken): is 'holdfast daemon' running in the guest, with "
                + "bridge.address pointing here and the same bridge key? (its log says why it cannot connect)")
    }

    /// Waits (bounded) until a guest has said hello.
    public func waitForGuest(timeout: Duration) async -> Bool {
        await guest(within: timeout) != nil
    }

    /// Drops the current connection (a migration, a host agent restart); with `refusing`, new
    /// connections are closed at once until it is called again with `false`.
    /// Rings when `refusing` or `closed` changes (a held connection waits on it).
    let refusalChanges = ChangeSignal()

    public func drop(refusing: Bool) {
        let connection = state.withLockedValue { s -> Connection? in
            s.refusing = refusing
            defer { s.connection = nil }
            return s.connection
        }
        refusalChanges.notify()
        connection?.close()
    }

    public func close() {
        let (connection, waiters, pending) = state.withLockedValue {
            s -> (Connection?, [CheckedContinuation<Connection?, Never>], [AsyncFD]) in
            s.closed = true
            s.refusing = true
            defer {
                s.connection = nil
                s.waitingForGuest.removeAll()
                s.pendingHandshakes.removeAll()
            }
            return (s.connection, Array(s.waitingForGuest.values), s.pendingHandshakes.values.map(\.socket))
        }
        refusalChanges.notify()
        listener.close()
        for socket in pending { socket.close() }
        connection?.close()
        for waiter in waiters { waiter.resume(returning: nil) }
        helloSink.finish()
        exitSink.finish()
    }
}

/// The vouchers of the newest connections that carried one, oldest forgotten first.
struct RecentVouchers: Sendable {
    private var seen: Set<[UInt8]> = []
    private var order: [[UInt8]] = []
    private var next = 0

    /// Records `voucher`; false if it was already there (a replay).
    mutating func insertIfNew(_ voucher: [UInt8]) -> Bool {
        guard seen.insert(voucher).inserted else { return false }
        if order.count < BridgeServer.rememberedVouchers {
            order.append(voucher)
        } else {
            seen.remove(order[next])
            order[next] = voucher
            next = (next + 1) % order.count
        }
        return true
    }
}

/// A first-in first-out queue of ids: an array read from a moving head, compacted when the head
/// passes half of it (amortised O(1), no unbounded prefix kept).
struct IDQueue<Element: Sendable>: Sendable {
    var items: [Element] = []
    var head = 0

    /// What is still queued, oldest first.
    var remaining: ArraySlice<Element> { items[head...] }

    var count: Int { items.count - head }

    mutating func append(_ item: Element) { items.append(item) }

    mutating func popFirst() -> Element? {
        guard head < items.count else { return nil }
        let first = items[head]
        head += 1
        if head >= 1024, head * 2 >= items.count {
            items.removeFirst(head)
            head = 0
        }
        return first
    }
}
