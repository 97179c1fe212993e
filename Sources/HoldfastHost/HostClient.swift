import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast host run/ps/kill`: clients of `holdfast host serve`'s control socket.
public enum HostClient {
    /// The local fds a `run`/`attach` client wires to the process (its own stdio by default).
    public struct Stdio: Sendable {
        public var input: Int32
        public var output: Int32
        public var error: Int32
        public init(input: Int32, output: Int32, error: Int32) {
            self.input = input
            self.output = output
            self.error = error
        }
        public static let inherited = Stdio(input: 0, output: 1, error: 2)
    }

    /// Starts a process in the guest, wires `stdio` to its streams, and returns how it ended
    /// once its output has been delivered: its exit, or its loss (host serve learnt that the
    /// guest's daemon restarted, or that the process vanished). After the exit each output
    /// stream may go `drainTimeout` without a byte before host serve ends it, so this never
    /// waits for a stream that cannot end (an orphan holding it, a broker that died).
    public static func run(
        control: String, request: HostRunRequest, drainTimeout: Duration = HostDefaults.drainTimeout, stdio: Stdio = .inherited
    ) async throws(HoldfastError) -> HostRunOutcome {
        let client = try await connect(control)
        defer { client.close() }
        let reply = try await client.request(HostRequest.run(request).frameType, body: HostRequest.run(request).body)
        return try await wire(client, reply, tty: request.tty, drainTimeout: drainTimeout, stdio: stdio)
    }

    /// Re-attaches `stdio` to a process started with `host run` (whose client went away):
    /// output produced meanwhile waited and arrives now. Returns how it ended, like `run`.
    public static func attach(
        control: String, id: String, tty: Bool, drainTimeout: Duration = HostDefaults.drainTimeout, stdio: Stdio = .inherited
    ) async throws(HoldfastError) -> HostRunOutcome {
        let client = try await connect(control)
        defer { client.close() }
        let reply = try await client.request(HostRequest.attach(ProcessIDRequest(id: id)).frameType, body: HostRequest.attach(ProcessIDRequest(id: id)).body)
        return try await wire(client, reply, tty: tty, drainTimeout: drainTimeout, stdio: stdio)
    }

    /// Relays `stdio` to the sockets of a `run`/`attach` reply until the process's outcome.
    static func wire(
        _ client: ControlClient, _ reply: ControlClient.ReceivedFrame, tty: Bool, drainTimeout: Duration, stdio: Stdio
    ) async throws(HoldfastError) -> HostRunOutcome {
        let started: HostRunResponse
        do {
            started = try ControlJSON.decode(HostRunResponse.self, from: reply.frame.body, frameType: reply.frame.type)
        } catch {
            for fd in reply.descriptors { close(fd) }
            throw HoldfastError(.badReply, error.description)
        }
        guard reply.descriptors.count == started.streams.count else {
            for fd in reply.descriptors { close(fd) }
            throw HoldfastError(.badReply, "expected \(started.streams.count) stream sockets, got \(reply.descriptors.count)")
        }
        var rawTerminal: termios?
        if tty, isatty(stdio.input) != 0 {
            var saved = termios()
            if tcgetattr(stdio.input, &saved) == 0 {
                rawTerminal = saved
                try? Terminal.makeRaw(fd: stdio.input)
            }
        }
        defer {
            if var saved = rawTerminal { tcsetattr(stdio.input, TCSANOW, &saved) }
        }
        // Window changes follow the process: SIGWINCH → the terminal's new size → resize.
        var resizer: Task<Void, Never>?
        if tty, isatty(stdio.input) != 0, let winch = try? SignalPipe(signals: [SIGWINCH]) {
            let id = started.id
            let terminal = stdio.input
            resizer = Task {
                while await winch.next() != nil {
                    guard let size = try? Terminal.size(of: terminal) else { continue }
                    _ = try? await client.call(
                        HostRequest.resize(ProcessResizeRequest(id: id, rows: size.rows, columns: size.columns)), reply: [String: String].self)
                }
            }
        }
        defer { resizer?.cancel() }
        // Our stdin's file status flags: reading it through the reactor makes it non-blocking,
        // which the terminal (shared with the shell) must not keep after we are gone.
        let inputFlags = fcntl(stdio.input, F_GETFL)
        var input: AsyncFD?
        defer {
            input?.close()
            if inputFlags >= 0 { _ = fcntl(stdio.input, F_SETFL, inputFlags) }
        }
        var outputs: [Task<Void, Never>] = []
        var sockets = Array(reply.descriptors.reversed())
        defer { for fd in sockets { close(fd) } }
        do {
            for kind in started.streams {
                let fd = sockets.removeLast()
                let socket: AsyncFD
                do {
                    socket = try AsyncFD(adopting: fd)
                } catch {
                    close(fd)
                    throw error
                }
                switch kind {
                case "stdin":
                    // Our stdin → the guest; not awaited: a process may exit without reading it all.
                    let source = try AsyncFD(adopting: dup(stdio.input))
                    input = source
                    Task {
                        await copy(from: source, to: socket)
                        socket.shutdownWrite()
                        if let fd = source.detach() { close(fd) }
                        socket.close()
                    }
                case "stdout", "stderr":
                    let output = try AsyncFD(adopting: dup(kind == "stdout" ? stdio.output : stdio.error))
                    outputs.append(Task {
                        await copy(from: socket, to: output)
                        if let fd = output.detach() { close(fd) }
                        socket.close()
                    })
                default:
                    socket.close()
                }
            }
        } catch {
            throw HoldfastError(.localFailed, "\(error)")
        }
        // host serve answers once the outcome is known and it has closed our output sockets
        // after their last byte: what is left to copy is in the sockets, then end-of-file.
        let milliseconds = Int(drainTimeout.components.seconds * 1000 + drainTimeout.components.attoseconds / 1_000_000_000_000_000)
        let waited: Result<HostWaitResponse, HoldfastError>
        do {
            waited = .success(try await client.call(
                HostRequest.wait(HostWaitRequest(id: started.id, drainTimeoutMilliseconds: milliseconds)), reply: HostWaitResponse.self))
        } catch where error.code == .channelClosed {
            waited = .failure(HoldfastError(.hostServeGone, "host serve closed its control connection before the process's outcome was known (did it stop?); the process may still run in the guest"))
        } catch {
            waited = .failure(error)
        }
        for output in outputs { await output.value }
        return try waited.get().outcome
    }

    public static func list(control: String) async throws(HoldfastError) -> BridgeListResponse {
        let client = try await connect(control)
        defer { client.close() }
        return try await client.call(HostRequest.list, reply: BridgeListResponse.self)
    }

    public static func stats(control: String) async throws(HoldfastError) -> HostStats {
        let client = try await connect(control)
        defer { client.close() }
        return try await client.call(HostRequest.stats, reply: HostStats.self)
    }

    public static func signal(control: String, id: String, signal: Int32) async throws(HoldfastError) {
        let client = try await connect(control)
        defer { client.close() }
        _ = try await client.call(HostRequest.signal(SignalRequest(id: id, signal: signal)), reply: [String: String].self)
    }

    public static func migrate(control: String, blackout: Duration) async throws(HoldfastError) {
        let client = try await connect(control)
        defer { client.close() }
        let milliseconds = Int(blackout.components.seconds * 1000 + blackout.components.attoseconds / 1_000_000_000_000_000)
        _ = try await client.call(HostRequest.migrate(MigrateRequest(blackoutMilliseconds: milliseconds)), reply: [String: String].self)
    }

    /// `holdfast host ps` as text.
    public static func render(_ list: BridgeListResponse) -> String {
        guard !list.processes.isEmpty else { return "no processes" }
        return TextTable.lines(
            ["PROCESS", "PID", "STATE", "EXIT"],
            list.processes.map { [$0.id, String($0.pid), $0.state.rawValue, $0.exitCode.map(String.init) ?? "-"] }
        ).joined(separator: "\n")
    }

    static func connect(_ control: String) async throws(HoldfastError) -> ControlClient {
        do {
            return try await ControlClient.connect(to: control)
        } catch {
            throw HoldfastError(.noHostService, "cannot reach 'holdfast host serve' at \(control): \(error)")
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
