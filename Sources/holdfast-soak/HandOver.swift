import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A container runtime's side of a `handed-over` process: the soak starts the command itself,
/// on pipes whose read ends it hands to the broker over the public handoff socket (`adopt`),
/// waits for its exit and tells the broker (`process-exited`) — what a runtime that keeps its own
/// processes does (README, "Handing stdio to Holdfast from another runtime"). Broker kills and
/// live upgrades land in the middle of these as they come: an adopt the broker died inside is
/// settled by asking the next broker (`list`), as `examples/handoff.py` does, and every request
/// is sent again on a new connection when its broker went away before answering.
enum HandOver {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// What happened, for the soak's figures.
    struct Outcome {
        var status: ExitStatus
        /// Adopts whose broker died before answering, settled through the next broker's `list`.
        var adoptsSettled = 0
    }

    /// How many times a request is sent again, 200 ms apart, while its broker is gone (a kill's
    /// restart back-off, an upgrade): a minute in all.
    static let attempts = 300
    static let pause = Duration.milliseconds(200)

    /// Runs `plan`'s command with its stdout (and stderr) on pipes the broker relays to
    /// `streams`, in that order.
    static func run(
        _ plan: Plan, streams: [(kind: StreamKind, spec: StreamSpec)], socket: String, aim: AdoptAim
    ) async throws(Failure) -> Outcome {
        var ends: [Int32] = []
        defer { for fd in ends where fd >= 0 { close(fd) } }
        var reads: [Int32] = []
        var writes: [Int32] = []
        for _ in streams {
            // The size the daemon gives its own processes' outputs.
            guard let pipe = try? PipeEnds.make(capacity: 1 << 20) else { throw Failure("pipe2: errno \(errno)") }
            ends += [pipe.read, pipe.write]
            reads.append(pipe.read)
            writes.append(pipe.write)
        }
        let request = AdoptRequest(
            process: plan.id,
            streams: streams.enumerated().map { index, stream in
                StreamDescription(
                    kind: stream.kind, fd: index, address: stream.spec.address, mode: .resumable, token: stream.spec.token,
                    secret: stream.spec.secret)
            })
        var outcome = Outcome(status: .exited(-1))
        outcome.adoptsSettled = try await adopt(request, descriptors: reads)
        // The broker has its own copies: a reader left here would hold the pipes open after the exit.
        for fd in reads { closeEnd(fd, in: &ends) }

        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        guard null >= 0 else { throw Failure("open(/dev/null): errno \(errno)") }
        ends.append(null)
        var options = SpawnOptions(executable: "/bin/sh", arguments: plan.argv)
        options.stdin = null
        options.stdout = writes[0]
        options.stderr = writes.count > 1 ? writes[1] : null
        options.newSession = true
        let pid: pid_t
        do {
            pid = try Spawner.spawn(options)
        } catch {
            throw Failure("spawn: \(error)")
        }
        for fd in writes { closeEnd(fd, in: &ends) }
        do {
            outcome.status = try await Spawner.waitForExit(pid)
        } catch {
            throw Failure("waiting for pid \(pid): \(error)")
        }
        try await exited(plan.id)
        return outcome

        func adopt(_ request: AdoptRequest, descriptors: [Int32]) async throws(Failure) -> Int {
            let adopt = BrokerRequest.adopt(request)
            var settled = 0
            return try await untilAnswered("adopt") { attempt in
                do {
                    let reply = try await send(adopt, descriptors: descriptors, aimed: aim)
                    let answer = try ControlJSON.decode(AdoptResponse.self, from: reply.frame.body, frameType: reply.frame.type)
                    // Every stream here is resumable and the supervisor answers at once: a
                    // process the next broker crash would lose is a failure.
                    guard answer.survivesBrokerCrash else { throw Failure("adopted without crash-survival: \(answer.reason ?? "no reason")") }
                    return settled
                } catch let error as HoldfastError where error.code == .channelClosed {
                    // The broker went away inside the adopt: the next one says whether it took it.
                    settled += 1
                    return try await listed(request.process) ? settled : nil
                } catch let error as HoldfastError where error.code == .processExists && attempt > 1 {
                    return settled  // an earlier attempt got in after all
                }
            }
        }

        func listed(_ process: String) async throws(Failure) -> Bool {
            let list = BrokerRequest.list(ListRequest())
            return try await untilAnswered("list") { _ in
                let reply = try await send(list)
                return try ControlJSON.decode(ListResponse.self, from: reply.frame.body, frameType: reply.frame.type).streams.contains {
                    $0.process == process
                }
            }
        }

        func exited(_ process: String) async throws(Failure) {
            let request = BrokerRequest.processExited(ProcessExitedRequest(process: process))
            try await untilAnswered("process-exited") { attempt in
                do {
                    _ = try await send(request)
                } catch let error as HoldfastError where error.code == .noSuchProcess && attempt > 1 {
                    // An earlier attempt reached a broker: it (or the next) drained the process.
                }
                return ()
            }
        }

        /// `body` tried until it returns a value: again, after a pause, when it returns nil or
        /// its broker went away (`channelClosed`); any other error is the failure of `what`.
        func untilAnswered<T>(_ what: String, _ body: (_ attempt: Int) async throws -> T?) async throws(Failure) -> T {
            for attempt in 1...attempts {
                do {
                    if let value = try await body(attempt) { return value }
                } catch let error as HoldfastError where error.code == .channelClosed {
                    // Sent again below, on a new connection.
                } catch let failure as Failure {
                    throw failure
                } catch {
                    throw Failure("\(what): \(error)")
                }
                try? await Task.sleep(for: pause)
            }
            throw Failure("\(what): no broker answered in \(attempts) attempts")
        }

        /// One request on a connection of its own; a connection refused or cut counts as `channelClosed`.
        func send(_ request: BrokerRequest, descriptors: [Int32] = [], aimed aim: AdoptAim? = nil) async throws -> RPCClient.RPCResponse {
            let client: RPCClient
            do {
                client = try await ControlClient.connect(to: socket, timeout: .seconds(10))
            } catch {
                throw HoldfastError(.channelClosed, "connect(\(socket)): \(error)")
            }
            defer { client.close() }
            // A broker kill waiting for an adopt fires now, as the request goes out.
            aim?.adoptGoing()
            return try await client.request(request.frameType, body: request.body, descriptors: descriptors)
        }
    }

    private static func closeEnd(_ fd: Int32, in ends: inout [Int32]) {
        close(fd)
        if let index = ends.firstIndex(of: fd) { ends[index] = -1 }
    }
}

/// A broker kill aimed at an adopt (`Chaos.killBroker`): the kill waits for a `handed-over`
/// process's adopt to be on its way, then lands a moment later — before, inside or just after
/// the broker handles it. One inside is settled through the next broker's `list` (counted in
/// `Outcome.adoptsSettled`); kills at random times almost never land there.
final class AdoptAim: Sendable {
    private let waiter = NIOLockedValueBox<CheckedContinuation<Bool, Never>?>(nil)
    private let timer = NIOLockedValueBox<Task<Void, Never>?>(nil)

    /// Waits up to `limit` for the next adopt to go out: true if one did.
    func nextAdopt(within limit: Duration) async -> Bool {
        let aimed = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            waiter.withLockedValue { $0 = continuation }
            timer.withLockedValue {
                $0 = Task {
                    try? await Task.sleep(for: limit)
                    self.fire(false)
                }
            }
        }
        timer.withLockedValue { $0 }?.cancel()
        return aimed
    }

    /// An adopt is going out (the runtime's side); a kill waiting for one fires.
    func adoptGoing() { fire(true) }

    private func fire(_ aimed: Bool) {
        waiter.withLockedValue { w in
            defer { w = nil }
            return w
        }?.resume(returning: aimed)
    }
}
