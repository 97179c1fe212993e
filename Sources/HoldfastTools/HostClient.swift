import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast host run/ps/kill`: clients of `holdfast host serve`'s control socket.
public enum HostClient {
    /// Starts a process in the guest, wires this process's stdin/stdout/stderr to its streams,
    /// and returns its exit code once its output has been delivered.
    public static func run(control: String, request: HostRunRequest) async throws -> Int32 {
        let client = try await connect(control)
        defer { client.close() }
        let reply = try await client.request(HostMessageType.run.rawValue, body: ControlJSON.encode(request))
        return try await wire(client, reply, tty: request.tty)
    }

    /// Re-attaches this terminal to a process started with `host run` (whose client went away):
    /// output produced meanwhile waited and arrives now. Returns its exit code.
    public static func attach(control: String, id: String, tty: Bool) async throws -> Int32 {
        let client = try await connect(control)
        defer { client.close() }
        let reply = try await client.request(HostMessageType.attach.rawValue, body: ControlJSON.encode(ProcessIDRequest(id: id)))
        return try await wire(client, reply, tty: tty)
    }

    /// Relays our stdio to the sockets of a `run`/`attach` reply until the process's exit.
    static func wire(_ client: ControlClient, _ reply: ControlClient.ReceivedFrame, tty: Bool) async throws -> Int32 {
        let started = try ControlJSON.decode(HostRunResponse.self, from: reply.frame.body, frameType: reply.frame.type)
        guard reply.descriptors.count == started.streams.count else {
            for fd in reply.descriptors { close(fd) }
            throw ErrorBody(code: "bad-reply", message: "expected \(started.streams.count) stream sockets, got \(reply.descriptors.count)")
        }
        var rawTerminal: termios?
        if tty, isatty(0) != 0 {
            var saved = termios()
            if tcgetattr(0, &saved) == 0 {
                rawTerminal = saved
                try? Terminal.makeRaw(fd: 0)
            }
        }
        defer {
            if var saved = rawTerminal { tcsetattr(0, TCSANOW, &saved) }
        }
        // Window changes follow the process: SIGWINCH → the terminal's new size → resize.
        var resizer: Task<Void, Never>?
        if tty, isatty(0) != 0, let winch = try? SignalPipe(signals: [SIGWINCH]) {
            let id = started.id
            resizer = Task {
                while await winch.next() != nil {
                    guard let size = try? Terminal.size(of: 0) else { continue }
                    _ = try? await client.call(
                        HostMessageType.resize.rawValue, ProcessResizeRequest(id: id, rows: size.rows, columns: size.columns),
                        reply: [String: String].self)
                }
            }
        }
        defer { resizer?.cancel() }
        var outputs: [Task<Void, Never>] = []
        for (kind, fd) in zip(started.streams, reply.descriptors) {
            let socket = try AsyncFD(adopting: fd)
            switch kind {
            case "stdin":
                // Our stdin → the guest; not awaited: a process may exit without reading it all.
                let input = try AsyncFD(adopting: dup(0))
                Task {
                    await copy(from: input, to: socket)
                    socket.shutdownWrite()
                    if let fd = input.detach() { close(fd) }  // detach restores blocking mode on our stdin
                }
            case "stdout", "stderr":
                let output = try AsyncFD(adopting: dup(kind == "stdout" ? 1 : 2))
                outputs.append(Task {
                    await copy(from: socket, to: output)
                    if let fd = output.detach() { close(fd) }
                    socket.close()
                })
            default:
                close(fd)
            }
        }
        let exit = try await client.call(HostMessageType.wait.rawValue, WaitRequest(id: started.id), reply: ExitReport.self)
        for output in outputs { await output.value }
        return exit.exitCode
    }

    public static func list(control: String) async throws -> BridgeListResponse {
        let client = try await connect(control)
        defer { client.close() }
        return try await client.call(HostMessageType.list.rawValue, [String: String](), reply: BridgeListResponse.self)
    }

    public static func signal(control: String, id: String, signal: Int32) async throws {
        let client = try await connect(control)
        defer { client.close() }
        _ = try await client.call(HostMessageType.signal.rawValue, SignalRequest(id: id, signal: signal), reply: [String: String].self)
    }

    public static func migrate(control: String, blackout: Duration) async throws {
        let client = try await connect(control)
        defer { client.close() }
        let milliseconds = Int(blackout.components.seconds * 1000 + blackout.components.attoseconds / 1_000_000_000_000_000)
        _ = try await client.call(HostMessageType.migrate.rawValue, MigrateRequest(blackoutMilliseconds: milliseconds), reply: [String: String].self)
    }

    /// `holdfast host ps` as text.
    public static func render(_ list: BridgeListResponse) -> String {
        guard !list.processes.isEmpty else { return "no processes" }
        return StatusPrinter.table(
            ["PROCESS", "PID", "STATE", "EXIT"],
            list.processes.map { [$0.id, String($0.pid), $0.state, $0.exitCode.map(String.init) ?? "-"] }
        ).joined(separator: "\n")
    }

    static func connect(_ control: String) async throws -> ControlClient {
        do {
            return try await ControlClient.connect(to: control)
        } catch {
            throw ErrorBody(code: "no-host-service", message: "cannot reach 'holdfast host serve' at \(control): \(error)")
        }
    }

    static func copy(from source: AsyncFD, to sink: AsyncFD) async {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        while let count = try? await source.read(into: buffer), count > 0 {
            do {
                try await sink.write(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            } catch {
                return
            }
        }
    }
}
