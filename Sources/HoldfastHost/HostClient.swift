import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

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

    /// How a client lets go of its process without ending it (`holdfast host run/exec/attach`
    /// in a terminal): the detach keys typed on a terminal stdin, or `interrupted` returning
    /// (Ctrl-C). Either way the client returns `.detached`: the process runs on, its stdin
    /// open and its output waiting for `host attach ID`.
    public struct Interaction: Sendable {
        public var detachKeys: DetachKeys
        public var interrupted: (@Sendable () async -> Void)?
        /// Returns a signal the client was sent that the process is to be sent too (then the
        /// client lets go); nil when there will be none.
        public var passOn: (@Sendable () async -> Int32?)?
        /// Called once the process has started (or been attached to), before its streams are
        /// wired: until then there is nothing to detach from or pass a signal on to.
        public var started: (@Sendable () -> Void)?

        public init(
            detachKeys: DetachKeys = .default, interrupted: (@Sendable () async -> Void)? = nil,
            passOn: (@Sendable () async -> Int32?)? = nil, started: (@Sendable () -> Void)? = nil
        ) {
            self.detachKeys = detachKeys
            self.interrupted = interrupted
            self.passOn = passOn
            self.started = started
        }

        /// No detaching: a library caller's or a test's client runs until the outcome.
        public static let none = Interaction(detachKeys: try! DetachKeys(parsing: ""))
    }

    /// Starts a process in the guest, wires `stdio` to its streams, and returns how it ended
    /// once its output has been delivered: its exit, or its loss (host serve learnt that the
    /// guest's daemon restarted, or that the process vanished) — or that the client detached.
    /// After the exit each output stream may go `drainTimeout` without a byte before host serve
    /// ends it, so this never waits for a stream that cannot end (an orphan holding it, a
    /// broker that died). The end of `stdio.input` is the end of the process's stdin.
    public static func run(
        control: String, request: HostRunRequest, drainTimeout: Duration = HostDefaults.drainTimeout, stdio: Stdio = .inherited,
        interaction: Interaction = .none
    ) async throws(HoldfastError) -> HostRunOutcome {
        let client = try await connect(control)
        defer { client.close() }
        var request = request
        request.detach = nil
        let reply = try await client.request(HostRequest.run(request).frameType, body: HostRequest.run(request).body)
        return try await wire(client, reply, tty: request.tty, drainTimeout: drainTimeout, stdio: stdio, interaction: interaction)
    }

    /// Starts a process in the guest without a client (`host run --detach`): its output goes to
    /// its log, and `host attach ID` can take it up.
    public static func start(control: String, request: HostRunRequest) async throws(HoldfastError) -> HostRunResponse {
        let client = try await connect(control)
        defer { client.close() }
        var request = request
        request.detach = true
        return try await client.call(HostRequest.run(request), reply: HostRunResponse.self)
    }

    /// Re-attaches `stdio` to a process started with `host run` (whose client went away):
    /// output produced meanwhile waited and arrives now, and this client's stdin is the
    /// process's from now on. `tty` makes the local terminal raw even if host serve does not
    /// say the process has one. Returns how it ended, like `run`.
    public static func attach(
        control: String, id: String, tty: Bool = false, drainTimeout: Duration = HostDefaults.drainTimeout, stdio: Stdio = .inherited,
        interaction: Interaction = .none
    ) async throws(HoldfastError) -> HostRunOutcome {
        let client = try await connect(control)
        defer { client.close() }
        let reply = try await client.request(HostRequest.attach(ProcessIDRequest(id: id)).frameType, body: HostRequest.attach(ProcessIDRequest(id: id)).body)
        return try await wire(client, reply, tty: tty, drainTimeout: drainTimeout, stdio: stdio, interaction: interaction, startedIt: false)
    }

    /// Waits for a process's outcome, whether or not its output has been read (`host wait`).
    public static func waitForExit(control: String, id: String) async throws(HoldfastError) -> HostWaitResponse {
        let client = try await connect(control)
        defer { client.close() }
        return try await client.call(HostRequest.wait(HostWaitRequest(id: id, untilExit: true)), reply: HostWaitResponse.self)
    }

    /// `host stop`: `signal`, then SIGKILL after `timeout`; returns once the outcome is known.
    public static func stop(control: String, id: String, signal: Int32, timeout: Duration) async throws(HoldfastError) -> HostStopResponse {
        let client = try await connect(control)
        defer { client.close() }
        return try await client.call(
            HostRequest.stop(HostStopRequest(id: id, signal: signal, timeoutMilliseconds: milliseconds(timeout))), reply: HostStopResponse.self)
    }

    /// `host logs`: what host serve kept of the process's output, written to `stdio`'s output
    /// and error; with `follow`, what comes next too, until the output ends.
    public static func logs(control: String, id: String, follow: Bool, stdio: Stdio = .inherited) async throws(HoldfastError) {
        let client = try await connect(control)
        defer { client.close() }
        let request = HostRequest.logs(HostLogsRequest(id: id, follow: follow))
        let reply = try await client.request(request.frameType, body: request.body)
        let response: HostRunResponse
        do {
            response = try ControlJSON.decode(HostRunResponse.self, from: reply.frame.body, frameType: reply.frame.type)
        } catch {
            for fd in reply.descriptors { close(fd) }
            throw HoldfastError(.badReply, error.description)
        }
        guard reply.descriptors.count == response.streams.count else {
            for fd in reply.descriptors { close(fd) }
            throw HoldfastError(.badReply, "expected \(response.streams.count) log sockets, got \(reply.descriptors.count)")
        }
        var copies: [Task<Void, Never>] = []
        // Both noted before either is made non-blocking: they are often one description (a
        // terminal), and a flag read after the first copy began would be put back as it was then.
        for target in [stdio.output, stdio.error] { LocalTerminal.note(fd: target, flags: fcntl(target, F_GETFL)) }
        do {
            for (kind, fd) in zip(response.streams, reply.descriptors) {
                let socket = try AsyncFD(adopting: fd)
                let target = kind == "stderr" ? stdio.error : stdio.output
                let output = try AsyncFD(adopting: dup(target), foreignDescription: true)
                copies.append(Task {
                    await copy(from: socket, to: output)
                    if let fd = output.detach() { close(fd) }
                    socket.close()
                })
            }
        } catch {
            throw HoldfastError(.localFailed, "\(error)")
        }
        for copy in copies { await copy.value }
    }

    /// `host ps`: the guest's processes as host serve knows them (`all`: the finished ones too).
    public static func processes(control: String, all: Bool) async throws(HoldfastError) -> HostProcessList {
        try await quickCall(control, HostRequest.processes(HostProcessesRequest(all: all)), reply: HostProcessList.self)
    }

    /// Relays `stdio` to the sockets of a `run`/`attach` reply until the process's outcome, or
    /// until the client detaches.
    /// `startedIt`: this client started the process (`run`, `exec`), so a reader of its output
    /// that goes away ends the process as in a local pipeline (SIGPIPE); an `attach` lets go
    /// instead (a viewer's `| head` must not kill a service).
    static func wire(
        _ client: ControlClient, _ reply: ControlClient.ReceivedFrame, tty: Bool, drainTimeout: Duration, stdio: Stdio,
        interaction: Interaction, startedIt: Bool = true
    ) async throws(HoldfastError) -> HostRunOutcome {
        interaction.started?()
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
        let tty = tty || (started.tty ?? false)
        var rawTerminal: termios?
        if tty, isatty(stdio.input) != 0 {
            var saved = termios()
            if tcgetattr(stdio.input, &saved) == 0 {
                rawTerminal = saved
                LocalTerminal.note(fd: stdio.input, settings: saved)
                try? Terminal.makeRaw(fd: stdio.input)
            }
        }
        defer {
            if var saved = rawTerminal { tcsetattr(stdio.input, TCSANOW, &saved) }
            LocalTerminal.forget()
        }
        // Window changes follow the process: SIGWINCH → the terminal's new size → resize.
        var resizers: [Task<Void, Never>] = []
        if tty, isatty(stdio.input) != 0, let winch = try? SignalPipe(signals: [SIGWINCH]) {
            let id = started.id
            let terminal = stdio.input
            let sizes = WantedSize()
            // The terminal may have changed size while no client was attached.
            sizes.want(try? Terminal.size(of: terminal))
            resizers.append(Task {
                while await winch.next() != nil { sizes.want(try? Terminal.size(of: terminal)) }
            })
            resizers.append(Task { await sizes.apply(id: id, through: client) })
        }
        defer { for task in resizers { task.cancel() } }
        // Our stdin's file status flags: reading it through the reactor makes it non-blocking,
        // which the terminal (shared with the shell) must not keep after we are gone.
        let inputFlags = fcntl(stdio.input, F_GETFL)
        LocalTerminal.note(fd: stdio.input, flags: inputFlags)
        // The outputs' too, before anything is made non-blocking (with a terminal the three are
        // often one description: a flag read later would be put back non-blocking).
        for target in [stdio.output, stdio.error] { LocalTerminal.note(fd: target, flags: fcntl(target, F_GETFL)) }
        var input: AsyncFD?
        var inputCopy: Task<Void, Never>?
        defer {
            inputCopy?.cancel()
            input?.close()
            if inputFlags >= 0 { _ = fcntl(stdio.input, F_SETFL, inputFlags) }
        }
        let detach = DetachSignal()
        var outputs: [Task<Void, Never>] = []
        var outputSockets: [AsyncFD] = []
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
                    let source = try AsyncFD(adopting: dup(stdio.input), foreignDescription: true)
                    input = source
                    // Read in raw mode only, as podman does: the process's terminal (-t).
                    let keys = tty && isatty(stdio.input) != 0 ? interaction.detachKeys : try! DetachKeys(parsing: "")
                    let id = started.id
                    inputCopy = Task {
                        switch await copyInput(from: source, to: socket, keys: keys) {
                        case .endOfInput:
                            // Every byte is on the socket: then the process's stdin may end —
                            // not a terminal's, which has no end-of-file to give (its process
                            // never read one, and the input was gone for every later client: one
                            // `attach` from a script, its stdin /dev/null, and nobody could type
                            // into the process again). Our input alone stops there.
                            socket.shutdownWrite()
                            if tty { break }
                            _ = try? await client.call(HostRequest.closeStdin(ProcessIDRequest(id: id)), reply: [String: String].self)
                        case .detachKeys:
                            detach.fire(.detachKeys)
                        case .stopped:
                            // host serve closed the stdin (the process ended), or we were cancelled.
                            break
                        }
                        if let fd = source.detach() { close(fd) }
                        socket.close()
                    }
                case "stdout", "stderr":
                    let target = kind == "stdout" ? stdio.output : stdio.error
                    let output = try AsyncFD(adopting: dup(target), foreignDescription: true)
                    outputSockets.append(socket)
                    let id = started.id
                    outputs.append(Task {
                        await copy(from: socket, to: output) {
                            // Our reader went away (`host run … | head -1`). Before, nothing read
                            // the output any more: the process blocked once the buffers were
                            // full, and the client waited for its outcome for ever.
                            guard startedIt else {
                                detach.fire(.readerGone)
                                return false
                            }
                            // The process gets SIGPIPE, as in a local pipeline, and the rest of
                            // its output is read and dropped, as its writes would fail there.
                            _ = try? await client.call(HostRequest.signal(SignalRequest(id: id, signal: SIGPIPE)), reply: [String: String].self)
                            return true
                        }
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
        if let interrupted = interaction.interrupted {
            Task {
                await interrupted()
                detach.fire(.interrupt)
            }
        }
        if let passOn = interaction.passOn {
            Task {
                guard let signal = await passOn() else { return }
                // Sent before letting go: the process gets it whether or not it still has a
                // client (its output then goes on into its log, never waiting for one).
                _ = try? await client.call(HostRequest.signal(SignalRequest(id: started.id, signal: signal)), reply: [String: String].self)
                detach.fire(.passedOn(signal: signal))
            }
        }
        // host serve answers once the outcome is known and it has closed our output sockets
        // after their last byte: what is left to copy is in the sockets, then end-of-file.
        let waitRequest = HostRequest.wait(HostWaitRequest(id: started.id, drainTimeoutMilliseconds: milliseconds(drainTimeout)))
        let waiting = Task { () -> Result<HostWaitResponse, HoldfastError> in
            do throws(HoldfastError) {
                return .success(try await client.call(waitRequest, reply: HostWaitResponse.self))
            } catch where error.code == .channelClosed {
                return .failure(HoldfastError(.hostServeGone, "host serve closed its control connection before the process's outcome was known (did it stop?); the process runs on in the guest, and a host serve started again on the same state directory (not --state-dir none) takes it up with its output kept: holdfast host attach \(started.id)"))
            } catch {
                return .failure(error)
            }
        }
        Task {
            let result = await waiting.value
            // Another client took the streams: this one lets go (its sockets are closed already).
            if case .failure(let error) = result, error.code == .attachedElsewhere { detach.fire(.anotherClient) }
            detach.finish(result)
        }
        switch await detach.first() {
        case .detached(let cause):
            // The process runs on: host serve is told, so its output goes on into its log (not
            // held for the next client), then our sockets close — unless another client has
            // them: its output is that client's.
            if cause != .anotherClient {
                _ = try? await client.call(HostRequest.detach(ProcessIDRequest(id: started.id)), reply: [String: String].self)
            }
            inputCopy?.cancel()
            for socket in outputSockets { socket.close() }
            for output in outputs { output.cancel() }
            return .detached(id: started.id, by: cause)
        case .finished(let result):
            for output in outputs { await output.value }
            return try result.get().outcome
        }
    }

    static func milliseconds(_ duration: Duration) -> Int {
        Int(duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
    }

    public static func list(control: String) async throws(HoldfastError) -> BridgeListResponse {
        try await quickCall(control, HostRequest.list, reply: BridgeListResponse.self)
    }

    public static func stats(control: String) async throws(HoldfastError) -> HostStats {
        try await quickCall(control, HostRequest.stats, reply: HostStats.self)
    }

    public static func signal(control: String, id: String, signal: Int32) async throws(HoldfastError) {
        _ = try await quickCall(control, HostRequest.signal(SignalRequest(id: id, signal: signal)), reply: [String: String].self)
    }

    @discardableResult
    public static func migrate(control: String, blackout: Duration) async throws(HoldfastError) -> HostMigrateResponse {
        let client = try await connect(control)
        defer { client.close() }
        return try await client.call(HostRequest.migrate(MigrateRequest(blackoutMilliseconds: milliseconds(blackout))), reply: HostMigrateResponse.self)
    }

    /// `holdfast host ps` as text.
    /// The table, its header always (an empty list is a header alone, as podman prints it, so
    /// a script's `tail -n +2` holds).
    public static func render(_ list: HostProcessList) -> String {
        TextTable.lines(
            ["PROCESS", "PID", "STATE", "EXIT", "COMMAND"],
            list.processes.map {
                // Ids and commands the guest listed, written out where they hold control
                // characters: a guest's escape sequence must not reach the operator's terminal.
                [TerminalText.escaped($0.id), $0.pid.map(String.init) ?? "-", $0.state.rawValue,
                 ($0.exitCode.map(String.init) ?? "-") + ($0.oomKilled == true ? " (OOM killed)" : ""), TerminalText.escaped($0.command ?? "-")]
            }
        ).joined(separator: "\n")
    }

    /// A request host serve answers within its own bounds (a guest that does not answer is its
    /// `guest-not-answering`, within seconds): past `bound` without an answer, host serve itself
    /// is stopped, traced or wedged, and the error says what its process is doing. Unbounded,
    /// `host ps` or `host kill` against a host serve stopped with Ctrl-Z hung without a word.
    static func quickCall<Reply: Decodable & Sendable>(
        _ control: String, _ request: HostRequest, reply: Reply.Type, within bound: Duration = .seconds(30)
    ) async throws(HoldfastError) -> Reply {
        let client = try await connect(control)
        defer { client.close() }
        // host serve's pid, as the kernel recorded it when it began listening.
        let server = (client.transport as? SeqpacketFrames).flatMap { try? PeerCredentials.of($0.channel.socket).pid }
        let asking = Task { () -> Result<Reply, HoldfastError> in
            do throws(HoldfastError) {
                return .success(try await client.call(request, reply: reply))
            } catch {
                return .failure(error)
            }
        }
        guard let result = await asking.value(within: bound) else {
            let state = server.map { "pid \($0) is \(ProcessRunState.of($0).explanation)" } ?? "its pid is unknown"
            throw HoldfastError(
                .noHostService,
                "'holdfast host serve' at \(control) did not answer within \(bound.spoken): \(state); the request may still be carried out when it goes on")
        }
        return try result.get()
    }

    static func connect(_ control: String) async throws(HoldfastError) -> ControlClient {
        do {
            return try await ControlClient.connect(to: control)
        } catch {
            throw HoldfastError(.noHostService, "cannot reach 'holdfast host serve' at \(control): \(error)\(connectAdvice(error))")
        }
    }

    /// What to check when host serve's control socket cannot be reached.
    static func connectAdvice(_ error: any Error) -> String {
        switch (error as? SystemError)?.number {
        case ENOENT?:
            return "; is 'holdfast host serve' running? It listens at $HOLDFAST_RUN_DIR/host.sock (default /tmp/holdfast); start it, or name its socket with --control"
        case EACCES?, EPERM?:
            return "; host serve's control socket is its owner's alone (mode 0600): run this as the user who started host serve (root: sudo)"
        case ECONNREFUSED?:
            return "; nothing listens there: host serve has stopped (start it again)"
        default:
            return ""
        }
    }

    enum InputEnding {
        /// Our stdin ended: every byte of it is on the socket.
        case endOfInput
        /// The detach keys were typed (what followed them is not sent).
        case detachKeys
        /// The socket was closed (the process ended), our stdin failed, or the task was cancelled.
        case stopped
    }

    /// Our stdin → the process's stdin socket, watching for the detach keys.
    static func copyInput(from source: AsyncFD, to sink: AsyncFD, keys: DetachKeys) async -> InputEnding {
        var matcher = DetachKeyMatcher(keys)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        while !Task.isCancelled {
            guard let count = try? await source.read(into: buffer) else { return .stopped }
            if count == 0 { return .endOfInput }
            let (forward, detach) = matcher.feed(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            if !forward.isEmpty {
                do {
                    try await forward.withUnsafeBytesAsync { try await sink.write($0) }
                } catch {
                    return .stopped
                }
            }
            if detach { return .detachKeys }
        }
        return .stopped
    }

    /// Copies until `source` ends or a write to `sink` fails. A write that failed because the
    /// sink's reader went away (EPIPE; not a cancelled copy, a detach) calls `readerGone`, which
    /// says whether to read the rest of `source` and drop it (true) or stop.
    static func copy(from source: AsyncFD, to sink: AsyncFD, readerGone: (@Sendable () async -> Bool)? = nil) async {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        var sinking = true
        while let count = try? await source.read(into: buffer), count > 0 {
            guard sinking else { continue }
            do {
                try await sink.write(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            } catch {
                guard let readerGone, !Task.isCancelled, (error.cause as? SystemError)?.number == EPIPE, await readerGone() else { return }
                sinking = false
            }
        }
    }
}

/// The first of a client's endings: the process's outcome, or the client detaching.
final class DetachSignal: Sendable {
    enum Ending: Sendable {
        case detached(HostRunOutcome.DetachCause)
        case finished(Result<HostWaitResponse, HoldfastError>)
    }

    private let state = NIOLockedValueBox<(ending: Ending?, waiter: CheckedContinuation<Ending, Never>?)>((nil, nil))

    func fire(_ cause: HostRunOutcome.DetachCause) { settle(.detached(cause)) }
    func finish(_ result: Result<HostWaitResponse, HoldfastError>) { settle(.finished(result)) }

    private func settle(_ ending: Ending) {
        let waiter = state.withLockedValue { s -> CheckedContinuation<Ending, Never>? in
            guard s.ending == nil else { return nil }
            s.ending = ending
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: ending)
    }

    /// Waits for the first ending (one waiter).
    func first() async -> Ending {
        await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> Ending? in
                if let ending = s.ending { return ending }
                s.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}

/// The client's stdin as `wire` found it (its terminal settings, its file status flags) while
/// `wire` has changed them, for a client that dies of a signal: `raise` runs no `defer`, and a
/// second SIGTERM while the first was passed on left the shell a raw terminal (no echo, output
/// in a staircase) whose reads failed with EAGAIN.
public enum LocalTerminal {
    private struct Saved: Sendable {
        var fd: Int32
        var settings: termios?
        var flags: Int32?

        /// Sets the fd's terminal settings and status flags to these (those noted).
        func apply() {
            if var settings { tcsetattr(fd, TCSANOW, &settings) }
            if let flags { _ = fcntl(fd, F_SETFL, flags) }
        }
    }

    /// By fd: the stdin (settings, flags), and the stdout and stderr whose flags a copy into
    /// them changed (a `logs -f` ended by Ctrl-C left the terminal's description non-blocking:
    /// the next program writing to it failed with EAGAIN).
    private static let saved = NIOLockedValueBox<[Int32: Saved]>([:])

    static func note(fd: Int32, settings: termios? = nil, flags: Int32? = nil) {
        saved.withLockedValue { all in
            var next = all[fd] ?? Saved(fd: fd)
            if let settings { next.settings = settings }
            if let flags, flags >= 0, next.flags == nil { next.flags = flags }
            all[fd] = next
        }
    }

    static func forget() {
        saved.withLockedValue { $0 = [:] }
    }

    /// The client's own settings of the noted fds while they are put back for the shell
    /// (`suspend`), until `resume` applies them again.
    private static let whileSuspended = NIOLockedValueBox<[Saved]?>(nil)

    /// For a client about to stop (Ctrl-Z: SIGTSTP; SIGTTIN or SIGTTOU in the background):
    /// puts the noted fds back as they were found, keeping the notes and the client's own
    /// settings for `resume`. Before, a client stopped this way left the shell's terminal
    /// non-blocking (and raw, with `-t`) until `fg`: the next program reading it failed with
    /// EAGAIN. Suspended twice (put in the background, then stopped reading there), the
    /// client's settings from the first stay the ones to resume.
    public static func suspend() {
        let all = saved.withLockedValue { Array($0.values) }
        whileSuspended.withLockedValue { mine in
            guard mine == nil else { return }
            mine = all.map { saved in
                var now = Saved(fd: saved.fd)
                if saved.settings != nil {
                    var settings = termios()
                    if tcgetattr(saved.fd, &settings) == 0 { now.settings = settings }
                }
                if saved.flags != nil {
                    let flags = fcntl(saved.fd, F_GETFL)
                    if flags >= 0 { now.flags = flags }
                }
                return now
            }
        }
        for saved in all {
            saved.apply()
        }
    }

    /// After `suspend`, once continued: the client's settings again (raw, non-blocking) — only
    /// in the foreground (`fg`). Continued in the background (`bg`), the shell keeps its
    /// terminal as it is, and the client's first read of it stops it again (SIGTTIN), until
    /// `fg`.
    public static func resume() {
        let mine = whileSuspended.withLockedValue { $0 }
        guard let mine else { return }
        // In the background of the terminal it controls (a terminal that is not the client's
        // controlling one has no foreground to ask about: tcgetpgrp fails).
        for saved in mine where isatty(saved.fd) != 0 {
            let foreground = tcgetpgrp(saved.fd)
            if foreground >= 0, foreground != getpgrp() { return }
        }
        whileSuspended.withLockedValue { $0 = nil }
        for saved in mine {
            saved.apply()
        }
    }

    /// Puts the stdin (and outputs) back as they were found, if the client had changed them
    /// (from any thread).
    public static func restore() {
        let all = saved.withLockedValue { current in defer { current = [:] }; return current }
        for saved in all.values {
            saved.apply()
        }
    }
}

/// The size the client's terminal has, to be applied to the process's until one request for it
/// is answered: a resize refused or lost (the guest away for a migration's blackout past the
/// request's bound, a bridge that dropped with it on it) was never sent again, and the process
/// kept the old size until the next resize.
final class WantedSize: Sendable {
    private let state = NIOLockedValueBox<(wanted: WindowSize?, applied: WindowSize?)>((nil, nil))
    private let changed = ChangeSignal()

    func want(_ size: WindowSize?) {
        guard let size else { return }
        state.withLockedValue { $0.wanted = size }
        changed.notify()
    }

    /// Sends the wanted size until it is applied, again after each change, until cancelled. A
    /// failure is tried again a second later (or at once for a newer size); a process gone or a
    /// request refused as bad ends it.
    func apply(id: String, through client: ControlClient) async {
        while !Task.isCancelled {
            let generation = changed.generation
            let (wanted, applied) = state.withLockedValue { ($0.wanted, $0.applied) }
            guard let wanted, wanted != applied else {
                await changed.wait(since: generation, timeout: .seconds(3600))
                continue
            }
            do {
                _ = try await client.call(
                    HostRequest.resize(ProcessResizeRequest(id: id, rows: wanted.rows, columns: wanted.columns)), reply: [String: String].self)
                state.withLockedValue { $0.applied = wanted }
            } catch {
                switch error.code {
                case .noSuchProcess, .badRequest, .notRunning, .noTTY, .channelClosed, .hostServeGone, .closing: return
                case .resizeFailed:
                    // The guest holds it, and applies it when the terminal lets go.
                    state.withLockedValue { $0.applied = wanted }
                default: await changed.wait(since: generation, timeout: .seconds(1))
                }
            }
        }
    }
}
