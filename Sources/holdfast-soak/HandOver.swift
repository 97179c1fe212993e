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
        /// The process's stdio was taken back midway (`release`).
        var released = false
        /// Releases whose broker went away before answering, asked again of the next one.
        var releasesAskedAgain = 0
    }

    /// A process taken back midway (`Plan.releaseAfterStep`): it stops itself; once the host
    /// has every byte it wrote before (`delivered`), the soak asks for its fds back, checks they
    /// are its own pipes, continues it and reads the rest (`rest`, per stream) itself.
    struct Release: Sendable {
        var delivered: @Sendable () -> Bool
        var rest: [(name: String, expected: [Piece])]
    }

    /// How many times a request is sent again, 200 ms apart, while its broker is gone (a kill's
    /// restart back-off, an upgrade): a minute in all.
    static let attempts = 300
    static let pause = Duration.milliseconds(200)

    /// Runs `plan`'s command with its stdout (and stderr) on pipes the broker relays to
    /// `streams`, in that order.
    static func run(
        _ plan: Plan, streams: [(kind: StreamKind, spec: StreamSpec)], socket: String, aim: HandoffAim, release: Release? = nil
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
        // Which pipes these are: a release must give back these very ones.
        let identities = reads.map(identity)
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
        var readers: [Task<String?, Never>] = []
        if let release {
            // Continued whatever happens: a process left stopped would hold the soak's end.
            defer { kill(pid, SIGCONT) }
            let taken = try await takeBack(pid, release)
            outcome.released = true
            outcome.releasesAskedAgain = taken.askedAgain
            readers = taken.readers
        }
        do {
            outcome.status = try await Spawner.waitForExit(pid)
        } catch {
            throw Failure("waiting for pid \(pid): \(error)")
        }
        // What it wrote after the release, read here: each stream exact.
        var problems: [String] = []
        for reader in readers {
            if let problem = await reader.value { problems.append(problem) }
        }
        if !problems.isEmpty { throw Failure(problems.joined(separator: "; ")) }
        // A released process is the broker's no more: nothing to tell it.
        if release == nil { try await exited(plan.id) }
        return outcome

        /// Waits for the process to stop itself and the host to have its bytes so far, asks for
        /// its fds back (again, of the next broker, when its broker went away before answering),
        /// checks they are its pipes, continues it and starts reading the rest.
        func takeBack(_ pid: pid_t, _ release: Release) async throws(Failure) -> (askedAgain: Int, readers: [Task<String?, Never>]) {
            let deadline = ContinuousClock.now + .seconds(Int(plan.expectedSeconds * 3) + 300)
            while !isStopped(pid) {
                guard ContinuousClock.now < deadline else { throw Failure("never stopped itself for its release") }
                try? await Task.sleep(for: .milliseconds(10))
            }
            while !release.delivered() {
                guard ContinuousClock.now < deadline else { throw Failure("the host never had its bytes before the release") }
                try? await Task.sleep(for: .milliseconds(10))
            }
            let request = BrokerRequest.release(process: plan.id)
            var askedAgain = 0
            let reply = try await untilAnswered("release") { attempt -> RPCClient.RPCResponse? in
                if attempt > 1 { askedAgain += 1 }
                return try await send(request, aimed: (aim, .release))
            }
            var fds = reply.descriptors
            defer { for fd in fds where fd >= 0 { close(fd) } }
            let answer: ReleaseResponse
            do {
                answer = try ControlJSON.decode(ReleaseResponse.self, from: reply.frame.body, frameType: reply.frame.type)
            } catch {
                throw Failure("release: \(error)")
            }
            guard answer.streams.count == streams.count, fds.count == streams.count else {
                throw Failure("release gave back \(answer.streams.count) streams and \(fds.count) fds for \(streams.count)")
            }
            for (index, stream) in answer.streams.enumerated() {
                guard stream.kind == streams[index].kind, stream.fd == index else {
                    throw Failure("release gave back \(stream.kind) as fd \(stream.fd) where \(streams[index].kind) was adopted as \(index)")
                }
                guard let got = identity(fds[index]), got == identities[index] else {
                    throw Failure("release gave back another file as \(stream.kind) than the pipe handed over")
                }
            }
            kill(pid, SIGCONT)
            var readers: [Task<String?, Never>] = []
            for (index, rest) in release.rest.enumerated() {
                let fd = fds[index]
                fds[index] = -1
                readers.append(Task { await readToTheEnd(fd, rest.name, rest.expected) })
            }
            return (askedAgain, readers)
        }

        func adopt(_ request: AdoptRequest, descriptors: [Int32]) async throws(Failure) -> Int {
            let adopt = BrokerRequest.adopt(request)
            var settled = 0
            return try await untilAnswered("adopt") { attempt in
                do {
                    let reply = try await send(adopt, descriptors: descriptors, aimed: (aim, .adopt))
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
        func send(
            _ request: BrokerRequest, descriptors: [Int32] = [], aimed: (aim: HandoffAim, request: HandoffAim.Request)? = nil
        ) async throws -> RPCClient.RPCResponse {
            let client: RPCClient
            do {
                client = try await ControlClient.connect(to: socket, timeout: .seconds(10))
            } catch {
                throw HoldfastError(.channelClosed, "connect(\(socket)): \(error)")
            }
            defer { client.close() }
            // A broker kill waiting for this kind of request fires now, as it goes out.
            if let aimed { aimed.aim.going(aimed.request) }
            return try await client.request(request.frameType, body: request.body, descriptors: descriptors)
        }
    }

    /// Reads `fd` (a pipe given back by a release) to its end: nil when it carried exactly
    /// `expected`, else what differed.
    private static func readToTheEnd(_ fd: Int32, _ name: String, _ expected: [Piece]) async -> String? {
        let check = StreamCheck(name: name, expected: expected)
        let reader: AsyncFD
        do {
            reader = try AsyncFD(adopting: fd)
        } catch {
            close(fd)
            return "\(name): \(error)"
        }
        defer { reader.close() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 1)
        defer { buffer.deallocate() }
        while true {
            let count: Int
            do {
                count = try await reader.read(into: buffer)
            } catch {
                return "\(name): read: \(error)"
            }
            if count == 0 { break }
            check.feed(Array(buffer[..<count]))
        }
        check.ended()
        let result = check.result()
        guard !result.passed else { return nil }
        return "\(name) (read after the release): received \(result.received) of \(result.expected) bytes, first difference at \(result.firstDifference.map(String.init) ?? "-")"
    }

    /// The pipe an fd names (device and inode), nil when fstat fails.
    private static func identity(_ fd: Int32) -> [UInt64]? {
        var info = stat()
        guard fstat(fd, &info) == 0 else { return nil }
        return [UInt64(info.st_dev), UInt64(info.st_ino)]
    }

    /// Whether the process is stopped (state `T` in /proc/PID/stat).
    private static func isStopped(_ pid: pid_t) -> Bool {
        guard let bytes = WholeFile.read("/proc/\(pid)/stat"), let close = bytes.lastIndex(of: UInt8(ascii: ")")) else { return false }
        // ") T ...": the state follows the command's closing parenthesis and a space.
        return bytes.count > close + 2 && bytes[close + 2] == UInt8(ascii: "T")
    }

    private static func closeEnd(_ fd: Int32, in ends: inout [Int32]) {
        close(fd)
        if let index = ends.firstIndex(of: fd) { ends[index] = -1 }
    }
}

/// A broker kill aimed at an adopt or a release (`Chaos.killBroker`): the kill waits for a
/// `handed-over` process's request to be on its way, then lands a moment later — before,
/// inside or just after the broker handles it. An adopt it lands inside is settled through the
/// next broker's `list` (`Outcome.adoptsSettled`), a release asked again of the next broker
/// (`Outcome.releasesAskedAgain`); kills at random times almost never land there.
final class HandoffAim: Sendable {
    enum Request: String, Sendable {
        case adopt
        case release
    }

    private struct Waiter {
        var request: Request
        var continuation: CheckedContinuation<Bool, Never>
        /// Killed by the runtime's own task as the request goes out, before it is written.
        var killAtOnce: pid_t?
    }

    private let waiter = NIOLockedValueBox<Waiter?>(nil)
    private let timer = NIOLockedValueBox<Task<Void, Never>?>(nil)

    /// Waits up to `limit` for the next `request` to go out: true if one did. `killAtOnce`:
    /// SIGKILLed then, before the request is written (a kill a moment after it, by the caller,
    /// can come after a fast answer).
    func next(_ request: Request, within limit: Duration, killAtOnce: pid_t? = nil) async -> Bool {
        let aimed = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            waiter.withLockedValue { $0 = Waiter(request: request, continuation: continuation, killAtOnce: killAtOnce) }
            timer.withLockedValue {
                $0 = Task {
                    // Cancelled: the request went out (a cancelled sleep returns at once).
                    guard (try? await Task.sleep(for: limit)) != nil else { return }
                    self.fire(nil)
                }
            }
        }
        timer.withLockedValue { $0 }?.cancel()
        return aimed
    }

    /// `request` is going out (the runtime's side); a kill waiting for one fires.
    func going(_ request: Request) { fire(request) }

    /// Resumes the waiter: with true when `request` is what it waits for, with false when
    /// `request` is nil (its time is up); another request leaves it waiting.
    private func fire(_ request: Request?) {
        guard
            let waiting = waiter.withLockedValue({ w -> Waiter? in
                guard let waiting = w, request == nil || request == waiting.request else { return nil }
                w = nil
                return waiting
            })
        else { return }
        if request != nil, let pid = waiting.killAtOnce { kill(pid, SIGKILL) }
        waiting.continuation.resume(returning: request != nil)
    }
}
