import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

extension Supervisor {
    /// Serves the local control socket (mode 0600: root only): status, launch, signal, wait.
    func serveControl(_ listener: Listener) async {
        // Clients a live upgrade parked in the previous image (connected during its switch,
        // nothing read from them yet): served here from their first request.
        for fd in resumption?.state.descriptors.parkedControl ?? [] {
            guard let connection = try? AsyncFD(adopting: fd) else { continue }
            Task { await serveControlPeer(FDChannel(connection)) }
        }
        var failures = LogPacer<Int>(interval: .seconds(10))
        while !Task.isCancelled {
            guard let connection = await listener.nextConnection(failed: { error in
                guard let unsaid = failures.note(0) else { return }
                logger.warning("control socket: accept failed; the connection waits and is accepted again", metadata: [
                    "error": "\(error)", "unsaid": "\(unsaid)",
                ])
            }) else { return }
            // While a live upgrade is under way a new client is not read from: its connection
            // goes to the next image with the listener (or back to this one's service if the
            // upgrade fails), so what it asks is answered by the binary that runs on.
            if session.withLockedValue({ $0.upgrading }), let fd = connection.detach() {
                parkedControl.withLockedValue { $0.append(fd) }
                // A failed upgrade's undo may have served the parked clients between the look
                // above and the append: this one would wait for the next upgrade. Served now if
                // so (the list is taken whole, so no client is served twice).
                if !session.withLockedValue({ $0.upgrading }) { serveParkedControlClients() }
                continue
            }
            Task { await serveControlPeer(FDChannel(connection)) }
        }
    }

    /// The clients parked during a live upgrade that did not happen: served now.
    func serveParkedControlClients() {
        for fd in parkedControl.withLockedValue({ parked in defer { parked = [] }; return parked }) {
            guard let connection = try? AsyncFD(adopting: fd) else {
                close(fd)
                continue
            }
            Task { await serveControlPeer(FDChannel(connection)) }
        }
    }

    /// One client of the control socket; its requests run concurrently (a `wait` must not hold
    /// up a `status`).
    private func serveControlPeer(_ channel: FDChannel) async {
        defer { channel.close() }
        _ = await RPCServer.serve(channel, as: SupervisorRequest.self, inFlight: 64) { [self] request, _ async throws(HoldfastError) -> RPCReply in
            try await handle(request)
        }
    }

    /// A status report that fits one frame: the counts by state always, then as many processes
    /// and streams as fit, and how many were left out.
    static func fitted(_ full: StatusReport) -> StatusReport {
        var counted = full
        var states: [String: Int] = [:]
        for stream in full.streams { states[stream.state.rawValue, default: 0] += 1 }
        counted.streamStates = states
        // Processes whose exit says output was lost first: a report cut short keeps them.
        let lossy = { (process: ProcessStatus) in process.lost != nil || (process.undelivered != nil && process.outputCutShort != true) }
        let processes = full.processes.filter(lossy) + full.processes.filter { !lossy($0) }
        let (withProcesses, processesOmitted) = FrameBudget.fit(processes, budget: FrameBudget.bytes / 2) { processes in
            var report = counted
            report.processes = processes
            report.streams = []
            return report
        }
        // Those in trouble first: a report cut short keeps them (README "Operate").
        var (report, streamsOmitted) = FrameBudget.fit(full.streams.troubledFirst()) { streams in
            var report = withProcesses
            report.streams = streams
            return report
        }
        if processesOmitted > 0 { report.omittedProcesses = processesOmitted }
        if streamsOmitted > 0 { report.omittedStreams = streamsOmitted }
        return report
    }

    private func handle(_ request: SupervisorRequest) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .status: return RPCReply(Self.fitted(await status()))
        case .launch(let spec): return RPCReply(try await launch(spec))
        case .signal(let request):
            try await signal(request.id, request.signal, key: request.idempotencyKey)
            return .empty
        case .wait(let request): return RPCReply(try await wait(request.id))
        case .upgrade:
            // Returns only when the upgrade did not happen (it throws why).
            try await upgrade()
            return .empty
        }
    }
}
