import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

extension Supervisor {
    /// Serves the local control socket (mode 0600: root only): status, launch, signal, wait.
    func serveControl(_ listener: Listener) async {
        while !Task.isCancelled {
            guard let connection = try? await listener.accept() else { return }
            Task { await serveControlPeer(FDChannel(connection)) }
        }
    }

    private func serveControlPeer(_ channel: FDChannel) async {
        defer { channel.close() }
        while true {
            guard let message = try? await channel.receive(maxPayload: ControlFrame.headerSize + ControlFrame.defaultMaxBody) else {
                return
            }
            message.closeDescriptors()  // nothing here takes fds
            guard let frame = try? ControlFrame.decode(datagram: message.payload) else {
                await reply(channel, id: 0, error: HoldfastError(.badFrame, "not a control frame"))
                return
            }
            // Requests run concurrently: a `wait` must not hold up a `status`.
            Task {
                do throws(HoldfastError) {
                    let body = try await handleControl(frame)
                    try? await channel.send(ControlFrame(type: SupervisorMessageType.ok.rawValue, id: frame.id, body: body).encoded)
                } catch {
                    await reply(channel, id: frame.id, error: error)
                }
            }
        }
    }

    private func reply(_ channel: FDChannel, id: UInt64, error: HoldfastError) async {
        try? await channel.send(ControlFrame(type: SupervisorMessageType.error.rawValue, id: id, body: ControlJSON.encode(error)).encoded)
    }

    /// A status report that fits one frame: the counts by state always, then as many processes
    /// and streams as fit, and how many were left out.
    static func fitted(_ full: StatusReport) -> StatusReport {
        var counted = full
        var states: [String: Int] = [:]
        for stream in full.streams { states[stream.state.rawValue, default: 0] += 1 }
        counted.streamStates = states
        let (withProcesses, processesOmitted) = FrameBudget.fit(full.processes, budget: FrameBudget.bytes / 2) { processes in
            var report = counted
            report.processes = processes
            report.streams = []
            return report
        }
        var (report, streamsOmitted) = FrameBudget.fit(full.streams) { streams in
            var report = withProcesses
            report.streams = streams
            return report
        }
        if processesOmitted > 0 { report.omittedProcesses = processesOmitted }
        if streamsOmitted > 0 { report.omittedStreams = streamsOmitted }
        return report
    }

    private func handleControl(_ frame: ControlFrame) async throws(HoldfastError) -> [UInt8] {
        func decode<T: Decodable>(_: T.Type) throws(HoldfastError) -> T {
            do {
                return try ControlJSON.decode(T.self, from: frame.body, frameType: frame.type)
            } catch {
                throw HoldfastError(.badRequest, error.description)
            }
        }
        switch SupervisorMessageType(rawValue: frame.type) {
        case .status:
            return ControlJSON.encode(Self.fitted(await status()))
        case .launch:
            return ControlJSON.encode(try await launch(try decode(ProcessSpec.self)))
        case .signal:
            let request = try decode(SignalRequest.self)
            try await signal(request.id, request.signal)
            return ControlJSON.encode([String: String]())
        case .wait:
            return ControlJSON.encode(try await wait(try decode(WaitRequest.self).id))
        default:
            throw HoldfastError(.unknownType, "unknown request type 0x\(String(frame.type, radix: 16))")
        }
    }
}
