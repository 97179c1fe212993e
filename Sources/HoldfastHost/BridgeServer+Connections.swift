import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Accepting guests: the handshake (bounded in time and in number), choosing which connection is
/// the guest, serving it, and warning about refused connections without flooding the log.
extension BridgeServer {

    func guest(within timeout: Duration) async -> Connection? {
        if let connection = state.withLockedValue({ $0.connection }) { return connection }
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        let timer = TimeoutWheel.shared.schedule(after: timeout) { [self] in
            state.withLockedValue { $0.waitingForGuest.removeValue(forKey: id) }?.resume(returning: nil)
        }
        defer { TimeoutWheel.shared.cancel(timer) }
        return await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> Connection?? in
                if let connection = s.connection { return .some(connection) }
                if s.closed { return .some(nil) }
                s.waitingForGuest[id] = continuation
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// The next accepted connection; nil once the listener is closed. A failing `accept` (no fds
    /// left: EMFILE) is retried after a pause instead of ending the server.
    func nextConnection() async -> AsyncFD? {
        await listener.nextConnection(pause: .milliseconds(100))
    }

    /// One guest connection: the handshake and the hello first (bounded together), then replies
    /// and exits until it ends. Nothing is installed, displaced or sent before both succeed.
    /// `ticket` is its place among the pending handshakes (`admit`).
    func serve(_ socket: AsyncFD, ticket: UInt64) async {
        let peer = describePeer(socket)
        let authentication = state.withLockedValue { $0.authentication }
        let timedOut = NIOLockedValueBox(false)
        let first: ControlFrame
        do {
            first = try await withHandshakeTimeout(socket, timedOut: timedOut) {
                if case .key(let key) = authentication {
                    try await BridgeHandshake.authenticateGuest(on: socket, key: key) { [self] nonce in
                        vouch(ticket, nonce: nonce, key: key)
                    }
                }
                return try await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody)
            }
        } catch {
            let evicted = state.withLockedValue { $0.pendingHandshakes.removeValue(forKey: ticket) == nil && !$0.closed }
            socket.close()
            if let reason = refusalReason(error, timedOut: timedOut.withLockedValue { $0 }, evicted: evicted) {
                refused(peer: peer, reason)
            }
            return
        }
        let hello: BridgeHello
        do {
            guard first.type == BridgeMessageType.hello.rawValue else { throw HoldfastError(.badRequest, "its first frame is not a hello") }
            hello = try ControlJSON.decode(BridgeHello.self, from: first.body, frameType: first.type)
        } catch {
            state.withLockedValue { _ = $0.pendingHandshakes.removeValue(forKey: ticket) }
            socket.close()
            // Said with what did not decode: a guest newer than this host sends what it cannot
            // read, and "not a hello" left nobody a clue.
            refused(peer: peer, first.type == BridgeMessageType.hello.rawValue
                ? "its hello does not decode (a guest of a version this host does not know?): \(error)"
                : "its first frame is not a hello")
            return
        }
        let connection = Connection(socket, hello: hello, unansweredAge: unansweredRequestAge)
        // Authenticated: out of the pending handshakes (a flood can no longer push it out) and
        // in as the guest, in one step — unless it was pushed out or the server closed meanwhile.
        let installed = state.withLockedValue { s -> (previous: Connection?, waiters: [CheckedContinuation<Connection?, Never>])? in
            guard s.pendingHandshakes.removeValue(forKey: ticket) != nil, !s.closed else { return nil }
            let previous = s.connection
            s.connection = connection
            s.accepted += 1
            s.lastHello = hello
            defer { s.waitingForGuest.removeAll() }
            return (previous, Array(s.waitingForGuest.values))
        }
        guard let (previous, waiters) = installed else {
            connection.close()
            connection.markServed()
            return
        }
        previous?.close()
        // Everything the previous connection delivered comes first: an exit the old daemon sent
        // just before it died must not arrive after the new daemon's hello.
        await previous?.waitServed()
        if let observer { observer(.hello(hello)) } else { helloSink.yield(hello) }
        for report in hello.exits { deliver(report, on: connection) }
        for waiter in waiters { waiter.resume(returning: connection) }

        // Replies to our requests, and exits; a reply to nothing we asked is ignored. Out of
        // service before its requests fail: a caller told `bridge-lost` that asks again at once
        // waits for the next guest (handed this one, it failed again at once: the soak saw a
        // signal fail 30 times in a moment and give up).
        await connection.run(deliver: { [self] report in deliver(report, on: connection) }) { [self] in
            state.withLockedValue { if $0.connection === connection { $0.connection = nil } }
        }
        connection.close()
    }

    /// Delivers an exit once, and acknowledges it every time the guest reports it — as it is
    /// delivered, or (`byCaller`) once the caller said it handled it. When the guest confirms the
    /// acknowledgement it has forgotten the exit (it will not repeat it), so we forget it too.
    func deliver(_ report: ExitReport, on connection: Connection) {
        guard (1...Self.maximumIDLength).contains(report.id.utf8.count) else {
            ignoredExit(report.id)
            return
        }
        let (first, handled) = state.withLockedValue { s -> (Bool, Bool) in
            let handled = s.handledExits.contains(report.id)
            guard s.deliveredExits[report.id] == nil else { return (false, handled) }
            s.delivered(report.id)
            return (true, handled)
        }
        if first {
            if let observer { observer(.exit(report)) } else { exitSink.yield(report) }
        }
        // A repeat of one already confirmed (a resend racing the acknowledgement) is
        // acknowledged again in either mode: the guest no longer waits for the caller.
        let confirmed = state.withLockedValue { $0.deliveredExits[report.id] == true }
        guard exitAcknowledgement == .onDelivery || handled || confirmed else { return }
        sendAcknowledgement(of: report.id, on: connection)
    }

    func withHandshakeTimeout<T: Sendable>(
        _ socket: AsyncFD, timedOut: NIOLockedValueBox<Bool>, _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        let timer = TimeoutWheel.shared.schedule(after: handshakeTimeout) {
            timedOut.withLockedValue { $0 = true }
            socket.close()
        }
        defer { TimeoutWheel.shared.cancel(timer) }
        return try await body()
    }

    /// Registers a connection in its handshake, among the vouched-for or the others
    /// (`maxVouchedPendingHandshakes`); past its pool's limit, the oldest of that pool is closed
    /// (its `serve` sees the failure and counts it refused). A challenge already waiting on the
    /// socket is looked at here, in the accept loop: a flood accepted before the connection's
    /// own task first ran must not push it out before its voucher was read.
    func admit(_ socket: AsyncFD) -> UInt64 {
        let privileged = ReservedPorts.peerIsPrivileged(socket)
        let key = state.withLockedValue { s -> BridgeKey? in
            if case .key(let key) = s.authentication { return key }
            return nil
        }
        // Looked at from a reserved port too: the key outranks the port, which a guest process
        // with CAP_NET_BIND_SERVICE (a root container's default) can dial from as well.
        let nonce = key.flatMap { key in Self.vouchedNonce(socket.peekNow(upTo: BridgeHandshakeWire.challengeSize), key: key) }
        let (ticket, tier, oldest) = state.withLockedValue { s -> (UInt64, AdmissionTier, (ticket: UInt64, socket: AsyncFD)?) in
            let tier: AdmissionTier =
                nonce.map({ s.recentVouchers.insertIfNew($0) }) == true ? .keyVouched : privileged ? .reservedPort : .ordinary
            s.nextHandshake &+= 1
            s.pendingHandshakes[s.nextHandshake] = (socket, tier)
            if tier != .ordinary { s.vouchedAdmitted += 1 }
            if privileged { s.reservedPortAdmitted += 1 }
            return (s.nextHandshake, tier, Self.pushOutOldest(tier: tier, &s))
        }
        if let oldest { pushOut(oldest, tier: tier, key: key) }
        return ticket
    }

    /// The nonce of a challenge (peeked) that vouches for its connection, or nil.
    static func vouchedNonce(_ challenge: [UInt8], key: BridgeKey) -> [UInt8]? {
        guard challenge.count == BridgeHandshakeWire.challengeSize,
            let nonce = (try? BridgeHandshakeWire.Challenge.decode(challenge))?.guestNonce,
            BridgeHandshake.nonceIsVouched(nonce, key: key)
        else { return nil }
        return nonce
    }

    /// The guest's nonce, read by the connection's own task: a voucher not seen at `admit` (it
    /// arrived later) moves the connection to the vouched pool, if it is still waiting.
    func vouch(_ ticket: UInt64, nonce: [UInt8], key: BridgeKey) {
        guard BridgeHandshake.nonceIsVouched(nonce, key: key) else { return }
        let oldest = state.withLockedValue { s -> (ticket: UInt64, socket: AsyncFD)?? in
            guard let pending = s.pendingHandshakes[ticket], pending.tier != .keyVouched else { return nil }
            return Self.moveToVouched(ticket, pending.socket, from: pending.tier, nonce: nonce, &s)
        }
        if let oldest = oldest ?? nil { pushOut(oldest, tier: .keyVouched, key: key) }
    }

    /// Closes the oldest connection of a full pool (already out of it). One of the others is
    /// looked at once more first: its challenge may have come since it was accepted, and one
    /// that vouches now joins the vouched instead (the others are back at their limit without
    /// it) — so a daemon's connection accepted a moment before its challenge arrived has the
    /// pool's whole turnover for it to come, not nothing.
    func pushOut(_ oldest: (ticket: UInt64, socket: AsyncFD), tier: AdmissionTier, key: BridgeKey?) {
        if tier != .keyVouched, let key, let nonce = Self.vouchedNonce(oldest.socket.peekNow(upTo: BridgeHandshakeWire.challengeSize), key: key),
            let next = state.withLockedValue({ Self.moveToVouched(oldest.ticket, oldest.socket, from: tier, nonce: nonce, &$0) })
        {
            if let next { pushOut(next, tier: .keyVouched, key: key) }
            return
        }
        oldest.socket.close()
    }

    /// Puts a waiting connection among the vouched, unless its voucher was seen before (a
    /// replay: nil). Then the oldest vouched one if that pool is now past its limit, to be
    /// pushed out (`.some(nil)`: none).
    static func moveToVouched(
        _ ticket: UInt64, _ socket: AsyncFD, from tier: AdmissionTier, nonce: [UInt8], _ s: inout State
    ) -> (ticket: UInt64, socket: AsyncFD)?? {
        guard s.recentVouchers.insertIfNew(nonce) else { return nil }
        s.pendingHandshakes[ticket] = (socket, .keyVouched)
        if tier == .ordinary { s.vouchedAdmitted += 1 }
        return .some(pushOutOldest(tier: .keyVouched, &s))
    }

    /// Past the limit of `tier`'s pool, takes its oldest out of the pending handshakes and
    /// returns it to be closed. One pass, no copy (a flood calls this per accept).
    static func pushOutOldest(tier: AdmissionTier, _ s: inout State) -> (ticket: UInt64, socket: AsyncFD)? {
        let limit = tier == .ordinary ? maxPendingHandshakes : maxVouchedPendingHandshakes
        var count = 0
        var oldest: UInt64?
        for (key, pending) in s.pendingHandshakes where pending.tier == tier {
            count += 1
            if oldest.map({ key < $0 }) ?? true { oldest = key }
        }
        guard count > limit, let oldest, let pending = s.pendingHandshakes.removeValue(forKey: oldest) else { return nil }
        return (oldest, pending.socket)
    }

    /// Why a failed handshake is worth a warning, or nil: a peer that simply went away (the
    /// guest gave up on a connection held through a blackout) is not one.
    func refusalReason(_ error: any Error, timedOut: Bool, evicted: Bool) -> String? {
        if evicted { return "more connections in their handshake at once than allowed (\(Self.maxPendingHandshakes), or \(Self.maxVouchedPendingHandshakes) vouched for); the oldest was closed" }
        if timedOut { return "no handshake and hello within \(handshakeTimeout)" }
        switch error {
        case let failure as BridgeHandshake.Failure:
            switch failure {
            case .malformed(.notAHandshake): return "it does not start with the authentication handshake (a guest with bridge.authentication: none?)"
            case .malformed(let problem): return "\(problem)"
            case .wrongProof: return "authentication failed: its proof does not match the bridge key"
            case .refused, .connectionLost: return nil
            }
        case ControlFrameIO.ReadError.oversized:
            return "its hello is larger than \(BridgeProtocol.maxBody) bytes"
        default:
            return nil
        }
    }

    /// " from pid N (uid U)" for a Unix socket's peer (the kernel's record: it cannot lie), so
    /// an operator can find an impostor; "" otherwise.
    func describePeer(_ socket: AsyncFD) -> String {
        guard case .unix = address, let credentials = try? PeerCredentials.of(socket) else { return "" }
        return " from pid \(credentials.pid) (uid \(credentials.uid))"
    }

    /// An exit whose id no create could have made (empty, or past 256 bytes): not delivered nor
    /// acknowledged, and said at most once a second with how many since.
    func ignoredExit(_ id: String) {
        let now = ContinuousClock.now
        let count = state.withLockedValue { s -> Int? in
            s.ignoredExits += 1
            if let last = s.lastIgnoredWarning, now - last < .seconds(1) { return nil }
            s.lastIgnoredWarning = now
            defer { s.ignoredExits = 0 }
            return s.ignoredExits
        }
        guard let count else { return }
        warn("bridge \(address): ignored \(count) exit report\(count == 1 ? "" : "s") whose id is not 1 to \(Self.maximumIDLength) bytes (the last \(id.utf8.count) bytes): no create makes one")
    }

    /// Counts a refused connection and warns, at most once a second (an impostor dialling every
    /// 50 ms must not flood the log): the next warning says how many were held back.
    func refused(peer: String, _ reason: String) {
        let now = ContinuousClock.now
        let heldBack = state.withLockedValue { s -> Int? in
            s.refused += 1
            if let last = s.lastWarning, now - last < .seconds(1) {
                s.warningsHeldBack += 1
                return nil
            }
            s.lastWarning = now
            defer { s.warningsHeldBack = 0 }
            return s.warningsHeldBack
        }
        guard let heldBack else { return }
        let more = heldBack > 0 ? " (and \(heldBack) more refused since the last warning)" : ""
        warn("bridge \(address): refused a connection\(peer): \(reason)\(more)")
    }
}
