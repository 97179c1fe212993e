import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// What the host asks over the bridge, and the exits the supervisor owes it.
extension Supervisor {
    /// A host request, forwarded by the bridge worker.
    /// A request of the bridge worker: the hello for a new bridge connection, or one the host
    /// sent (decoded and checked by the worker, decoded again at this boundary).
    func handle(_ request: WorkerRequest) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .hello:
            // The hello must fit one frame: the oldest exits first (every exit not in it is pushed
            // again once the bridge is up), then as many live processes as fit.
            let live = processStatuses().filter { $0.state != .done }
            let (withExits, _) = FrameBudget.fit(table.withLockedValue { $0.unacknowledgedExits }, budget: FrameBudget.bytes / 2) {
                BridgeHello(bootID: "", processes: [], exits: $0)
            }
            let upgrades = session.withLockedValue { s in
                s.exitsInLastHello = Set(withExits.exits.map(\.id))
                return s.upgrades
            }
            let (hello, _) = FrameBudget.fit(live) {
                BridgeHello(
                    bootID: "", processes: $0, exits: withExits.exits, instanceID: instanceID, daemonVersion: HoldfastVersion.string,
                    upgrades: upgrades > 0 ? upgrades : nil, keyedSignals: true)
            }
            return RPCReply(hello)
        case .host(let request):
            return try await handle(request)
        }
    }

    /// What the host asked, over the bridge.
    func handle(_ request: BridgeRequest) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .create(let spec):
            return RPCReply(try await launch(spec, viaBridge: true))
        case .signal(let request):
            try await signal(request.id, request.signal, key: request.idempotencyKey)
            return .empty
        case .resize(let request):
            try refuseUnlessTheHosts(request.id)
            try await brokerRequest(.resize(ResizeRequest(process: request.id, rows: request.rows, columns: request.columns)), for: request.id)
            return .empty
        case .closeStdin(let request):
            try await closeStdin(request.id)
            return .empty
        case .list(let request):
            // Sorted by id, so that `processesAfter` pages through them.
            var list = processStatuses().sorted { $0.id.utf8.lexicographicallyPrecedes($1.id.utf8) }
            if let after = request.processesAfter { list.removeAll { !after.utf8.lexicographicallyPrecedes($0.id.utf8) } }
            guard request.streams ?? true else {
                // The processes alone: the broker is not asked (its listing of every stream, every
                // second a host polls for processes gone), and they have the whole frame.
                let (processesFit, processesOmitted) = FrameBudget.fit(list) { BridgeListResponse(processes: $0, streams: []) }
                var reply = processesFit
                if processesOmitted > 0 { reply.omittedProcesses = processesOmitted }
                return RPCReply(reply)
            }
            // A broker that does not answer (stopped, or not finishing dying) costs the list its
            // streams, not its answer; the list says so.
            let streams = await brokerStreams()
            if let offset = request.streamsOffset {
                // A page of the streams in the broker's order (by process): a host can read
                // every stream, not only those that fit one reply.
                let all = streams ?? []
                let page = Array(all.dropFirst(max(0, offset)))
                let (reply, omitted) = FrameBudget.fit(page) { BridgeListResponse(processes: [], streams: $0) }
                var fitted = reply
                if omitted > 0 { fitted.omittedStreams = omitted }
                if streams == nil { fitted.streamsUnavailable = brokerUnavailableExplanation() }
                return RPCReply(fitted)
            }
            let (processesFit, processesOmitted) = FrameBudget.fit(list, budget: FrameBudget.bytes / 2) { $0 }
            // Those in trouble first, so that a list cut short keeps them (PROTOCOL.md `list`).
            let (reply, omitted) = FrameBudget.fit((streams ?? []).troubledFirst()) {
                BridgeListResponse(processes: processesFit, streams: $0)
            }
            var fitted = reply
            if omitted > 0 || processesOmitted > 0 {
                fitted.omittedStreams = omitted
                fitted.omittedProcesses = processesOmitted
            }
            if streams == nil { fitted.streamsUnavailable = brokerUnavailableExplanation() }
            return RPCReply(fitted)
        case .stats:
            // Bounded like every host request the broker answers, with an overdue mark of its
            // own (the upgrade's stuck-thread check asks for stats too, and must not be answered
            // "overdue" because of the host's).
            switch try await boundedBrokerRequest(.stats, key: "host-stats", bound: Self.brokerAnswerBound) {
            case .answered(let frame):
                do {
                    return RPCReply(try ControlJSON.decode(BrokerStats.self, from: frame.body, frameType: frame.type))
                } catch {
                    throw HoldfastError(.badReply, "the broker's stats: \(error.description)")
                }
            case .failed(let error):
                throw Self.brokerRequestError(error)
            case .notAnswered(let overdue):
                throw notAnswered("stats", overdue: overdue, bound: Self.brokerAnswerBound)
            }
        case .acknowledgeExit(let request):
            acknowledgeExit(request.id)
            return .empty
        }
    }

    /// Asks the broker for the host (a resize), through `boundedBrokerRequest` keyed by the
    /// request's kind and process.
    func brokerRequest(_ request: BrokerRequest, for process: String) async throws(HoldfastError) {
        // A process whose create was answered before the broker took it: not before it has.
        guard await lateAdoptDone(process, within: Self.brokerRequestBound) else {
            throw HoldfastError(.brokerUnavailable, "the broker has not taken the process's stdio yet (\(brokerUnavailableExplanation())): ask again once it has")
        }
        switch try await boundedBrokerRequest(request, key: "\(request.frameType):\(process)", bound: Self.brokerRequestBound) {
        case .answered: return
        case .failed(let error): throw Self.brokerRequestError(error)
        case .notAnswered(let overdue): throw notAnswered("the request", overdue: overdue, bound: Self.brokerRequestBound)
        }
    }

    /// What became of a host request sent to the broker.
    enum BrokerRequestOutcome {
        case answered(ControlFrame)
        case failed(HoldfastError)
        /// No answer within the bound (`overdue: false`), or not sent because the last request
        /// of its key is still unanswered (`overdue: true`).
        case notAnswered(overdue: Bool)
    }

    /// `boundedRequest` to the broker, waiting for one that is restarting (as a create does)
    /// rather than failing while it is. Without the bound, a broker stopped or held in a
    /// debugger kept each host request that needs it — and the bridge worker's permit it holds —
    /// for as long as it stayed stopped, and 32 of them (a terminal's resizes) stopped the worker
    /// reading the host's connection: signals, stops, exits' acknowledgements and, after a
    /// migration, the next connection's hello waited too. Throws only when no broker came
    /// within `brokerWait`.
    func boundedBrokerRequest(_ request: BrokerRequest, key: String, bound: Duration) async throws(HoldfastError) -> BrokerRequestOutcome {
        guard let broker = await brokerClient.wait(timeout: Self.brokerWait) else {
            throw HoldfastError(.brokerUnavailable, "the broker has not been running for \(Self.describe(Self.brokerWait))")
        }
        return await boundedRequest(request, to: broker, key: key, bound: bound)
    }

    /// Sends `request` to `broker` and waits for its answer at most `bound`. A request past its
    /// bound stays with the broker (the channel takes no cancellation) and is carried out if it
    /// goes on; while it does, another of the same `key` is not sent (`.notAnswered(overdue:
    /// true)` at once), so a broker stopped for an hour is left one request per key, not one per
    /// try (a monitor polling `status`, a scraper, a resizing terminal). The key is marked only
    /// once overdue: requests of a key sent together to a broker that answers all go.
    func boundedRequest(_ request: BrokerRequest, to broker: ControlClient, key: String, bound: Duration) async -> BrokerRequestOutcome {
        guard !overdueRequests.withLockedValue({ $0.contains(key) }) else { return .notAnswered(overdue: true) }
        let call = Task { () async -> BrokerRequestOutcome in
            do throws(HoldfastError) {
                let response = try await broker.request(request.frameType, body: request.body)
                for fd in response.descriptors { close(fd) }  // none is sent with these answers
                return .answered(response.frame)
            } catch {
                return .failed(error)
            }
        }
        if let outcome = await call.value(within: bound) { return outcome }
        overdueRequests.withLockedValue { _ = $0.insert(key) }
        Task { [overdueRequests] in
            _ = await call.value
            overdueRequests.withLockedValue { _ = $0.remove(key) }
        }
        return .notAnswered(overdue: false)
    }

    /// A broker's failure as the host reads it: `channel-closed` would read as the host's own
    /// connection's end (`bridge-lost`).
    static func brokerRequestError(_ error: HoldfastError) -> HoldfastError {
        guard error.code == .channelClosed else { return error }
        return HoldfastError(.brokerUnavailable, "the broker died during the request: ask again (it is restarted)", cause: error)
    }

    /// `broker-unavailable` for a request the broker did not answer in time.
    func notAnswered(_ what: String, overdue: Bool, bound: Duration) -> HoldfastError {
        let why = brokerUnavailableExplanation()
        return overdue
            ? HoldfastError(.brokerUnavailable, "the broker has not answered the last such request yet (\(why)): it is carried out when the broker goes on")
            : HoldfastError(.brokerUnavailable, "the broker did not answer \(what) within \(Self.describe(bound)) (\(why)): it stays with it, carried out if it goes on")
    }

    /// How long a host request the broker carries out (a resize, a close of stdin) waits for
    /// its answer: longer than a loaded broker takes, shorter than the host's own timeout (10 s
    /// by default), so the host reads why.
    static let brokerRequestBound: Duration = .seconds(5)

    /// The host's `close-stdin`. Our copy of the pipe closes first, then the broker's: the
    /// process reads end-of-file once both are closed, and a broker that dies at any instant
    /// of it cannot undo it. Before, the broker closed its copy and then told us; one killed in
    /// between left ours open, the next broker was handed the stdin again, and the process
    /// never read end-of-file (the host had been told `channel-closed`).
    func closeStdin(_ id: String) async throws(HoldfastError) {
        try refuseUnlessTheHosts(id)
        let closedHere = entry(id) != nil && stdio.withLockedValue { !$0.isHandoff(id) && $0.holdsInput(id) }
        if closedHere { stdinEnded(id, endedByHost: false) }
        // A process whose create was answered before the broker took it: the broker's copy
        // comes with the adopt, and is closed once it is taken (`lateAdoptFinished`).
        guard await lateAdoptDone(id, within: Self.brokerRequestBound) else {
            var error = HoldfastError(.brokerUnavailable, "the broker has not taken the process's stdio yet (\(brokerUnavailableExplanation()))")
            if closedHere { error.message += "; the supervisor's copy of the pipe is closed, the broker's is closed once it takes it: the process then reads end-of-file" }
            throw error
        }
        // The broker's copy too — also a broker restarted meanwhile, whose copy was made before
        // ours closed.
        let request = BrokerRequest.closeStdin(process: id)
        switch try await boundedBrokerRequest(request, key: "\(request.frameType):\(id)", bound: Self.brokerRequestBound) {
        case .answered:
            return
        case .failed(let error) where closedHere && [.channelClosed, .brokerUnavailable, .noSuchProcess, .noStdin].contains(error.code):
            return  // its copy died with it, or it was never handed one: ours was the last
        case .failed(let error):
            throw Self.brokerRequestError(error)
        case .notAnswered(let overdue):
            // Not done: the broker's copy stays open, and the process reads end-of-file only once
            // the broker goes on and closes it (or dies). Said, not answered as done.
            var error = notAnswered("the close", overdue: overdue, bound: Self.brokerRequestBound)
            if closedHere { error.message += "; the supervisor's copy of the pipe is closed: the process reads end-of-file once the broker's is" }
            throw error
        }
    }

    /// The host's requests reach its own processes alone: a process a runtime handed over on
    /// the handoff socket shares the broker's ids, and the broker (asked by the supervisor, which
    /// may manage any process) would have closed its stdin or resized it, its runtime never told.
    func refuseUnlessTheHosts(_ id: String) throws(HoldfastError) {
        guard entry(id) == nil else { return }
        let handedOver = stdio.withLockedValue { $0.isHandoff(id) }
        throw HoldfastError(.noSuchProcess, handedOver ? "no process '\(id)' of the host's (a runtime handed over a process of that id)" : "no process '\(id)'")
    }

    /// The host has an exit: forget it, and the process with it.
    func acknowledgeExit(_ id: String) {
        table.withLockedValue { $0.acknowledgeExit(id) }
        changes.notify()
    }

    /// Every path that ends a process comes here once: waiters are woken, and an exit the host
    /// asked for is kept until the host acknowledges it (sent now if the bridge is up, and in
    /// every hello until then). It is queued for the host before anyone waiting hears of it: a
    /// stop that waits for the processes and then for the acknowledgements finds it there.
    func complete(_ id: String, _ report: ExitReport) {
        guard let (waiters, viaBridge, cgroup) = table.withLockedValue({ t -> ([CheckedContinuation<ExitReport?, Never>], Bool, String?)? in
            guard let waiters = t.finish(id, report) else { return nil }
            return (waiters, t[id]?.viaBridge ?? false, t[id]?.cgroup)
        }) else { return }
        releaseStdio(id)
        // Its cgroup goes once it is empty: now, or when what the process left running ends.
        if let cgroup { cgroups?.release(cgroup) }
        if viaBridge, let channel = session.withLockedValue({ $0.bridgeChannel }) {
            let frame = ControlFrame(type: BridgeMessageType.exit.rawValue, id: 0, body: ControlJSON.encode(report))
            Task {
                // Not sent: the worker's channel ends, and its successor's hello carries the exit
                // (it stays queued until the host acknowledges it), instead of the next redial.
                do { try await channel.send(frame.encoded) } catch { channel.close() }
            }
        }
        for waiter in waiters { waiter.resume(returning: report) }
        changes.notify()
    }

    /// Exits the hello had no room for (thousands ended during one blackout) go out now, one
    /// frame each; the host acknowledges repeats, so sending one twice is harmless. Which those
    /// are is what the hello recorded it carried: fitting the list again here cut it elsewhere
    /// when an acknowledgement (of the connection before, still queued) took an exit out of it
    /// in between, and the first exit past the hello's cut was neither in it nor sent.
    func resendExitsLeftOutOfTheHello() {
        let (carried, channel) = session.withLockedValue { ($0.exitsInLastHello, $0.bridgeChannel) }
        let rest = table.withLockedValue { $0.unacknowledgedExits }.filter { !carried.contains($0.id) }
        guard !rest.isEmpty, let channel else { return }
        Task {
            for report in rest {
                let frame = ControlFrame(type: BridgeMessageType.exit.rawValue, id: 0, body: ControlJSON.encode(report))
                try? await channel.send(frame.encoded)
            }
        }
    }

    func broker() -> ControlClient? { brokerClient.current }

    /// Every process by id, with creates still in progress as `starting` (pid 0), and a
    /// finished one's loss from its exit report (`ProcessStatus.undelivered`; the host's `list`
    /// carries it too).
    func processStatuses() -> [ProcessStatus] { table.withLockedValue { $0.statuses } }

    /// `processStatuses` with each direct process's CPU time and process count from its cgroup,
    /// and each runc container process's OOM kills so far (`status`; the host's `list` and hello
    /// go without them).
    func processStatusesWithUsage() -> [ProcessStatus] {
        var statuses = processStatuses()
        let entries = table.withLockedValue { t in Dictionary(t.entries.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a }) }
        for index in statuses.indices {
            guard let entry = entries[statuses[index].id] else { continue }
            // Exited: the count its exit report took (its cgroup may be gone by now).
            statuses[index].oomKills =
                entry.oomCounter == nil ? nil : entry.report.map { $0.oomKills ?? 0 } ?? entry.oomCounter?.killsSinceStart()
            guard statuses[index].state != .done, let cgroups, let name = entry.cgroup, let usage = cgroups.usage(name) else { continue }
            statuses[index].cpuSeconds = usage.cpuSeconds
            statuses[index].tasks = usage.tasks
        }
        return statuses
    }
}
