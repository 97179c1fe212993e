import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// Runs OCI containers with runc, the way containerd's shim does: `runc create` detached (the
/// container's init is reparented to the supervisor, the child subreaper, which reaps it and
/// reads its exit status), `runc start`, `runc kill`, and `runc delete` once it has exited.
///
/// Stdio: without a tty, the pipes are runc's own stdio and runc passes them through to the
/// container. With a tty, runc makes the pty inside the container and sends its master to a
/// console socket we listen on (one message: the pty name as payload, the master by SCM_RIGHTS).
/// Either way the host-side ends go to the broker like any other process's.
///
/// runc's own errors are read from its JSON log (`--log`), not its stderr: without a tty,
/// runc's stderr *is* the container's stderr pipe.
struct RuncRuntime: Sendable {
    let path: String
    let root: String
    /// Pid files, logs and console sockets live here for the length of one command.
    let workDirectory: String
    /// The containers made and not deleted yet: what `deleteRecordedContainers` may delete.
    let records: RuncContainerRecords
    let reaper: ChildReaper
    let logger: Logger
    /// The signal guard (`SignalGuard`), for a container that shares the supervisor's pid
    /// namespace: `runc create` and `runc exec` start under it, and so does all they start.
    var signalGuard: SignalGuard.Programs? = nil
    /// A runc command that takes longer than this is killed and reported as failed.
    static let commandTimeout: Duration = .seconds(60)
    /// The runc commands running now, by pid: a stop that ends ends them too
    /// (`endCommandsUnderWay`). Shared by every copy of this value.
    let commandsUnderWay = NIOLockedValueBox<[pid_t: (child: ChildReaper.Child, endedByStop: Bool)]>([:])
    /// Containers whose `runc delete` failed for another reason than their absence (runc could
    /// not run: no task left, no inode for its log): tried again with back-off, and at once
    /// before a create of the same id. Tried once, such a container kept its id — every later
    /// create of it failed "already exists" — and its cgroup until the daemon stopped.
    let undeleted = NIOLockedValueBox<Set<String>>([])

    /// Ends every runc command still running — a `runc create` whose OCI hook hangs, say. First
    /// (`.itsChildren`) what each one started, its hooks and the container's `runc init`: runc
    /// sees them fail and undoes its work itself (the container's cgroups removed, nothing in
    /// its state directory), and the create it served fails and deletes what is left. Then, for a
    /// runc that does not end so, (`.withItsGroup`) runc itself with its process group. Returns
    /// how many commands there were.
    @discardableResult
    func endCommandsUnderWay(_ how: CommandEnding) -> Int {
        let running = commandsUnderWay.withLockedValue { commands in
            for pid in commands.keys { commands[pid]?.endedByStop = true }
            return commands.values.map(\.child)
        }
        for child in running {
            switch how {
            case .itsChildren: PidFD.signalChildren(of: child.pid, SIGKILL)
            case .withItsGroup: _ = reaper.signalGroup(child, SIGKILL)
            }
        }
        return running.count
    }

    enum CommandEnding {
        case itsChildren
        case withItsGroup
    }

    /// The containers in runc's state directory (`runc list -q`), or nil if runc could not say.
    func list() async -> [String]? {
        let scratch = Scratch(directory: workDirectory)
        defer { scratch.remove() }
        let output = open(scratch.processFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard output >= 0 else { return nil }
        defer { close(output) }
        do throws(HoldfastError) {
            try await run(["list", "-q"], log: scratch.logFile, stdio: Launcher.Stdio(stdout: output), what: "runc list")
        } catch {
            logger.warning("runc list failed", metadata: ["error": "\(error.message)"])
            return nil
        }
        guard let bytes = WholeFile.read(scratch.processFile) else { return nil }
        return String(decoding: bytes, as: UTF8.self).split(whereSeparator: \.isNewline).map(String.init)
    }

    /// Deletes (`runc delete --force`: its processes killed) every container this daemon (or an
    /// earlier one on this run directory) made and did not delete: at a fresh start, one a
    /// crashed daemon left; at a stop's end, one made by a create that was still under way. Only
    /// recorded ones (`RuncContainerRecords`): another tool's containers in the same state
    /// directory are left alone. Returns the ones deleted.
    func deleteRecordedContainers() async -> [String] {
        let recorded = Set(records.recorded())
        guard !recorded.isEmpty else { return [] }
        // A record whose container runc does not have (a create that failed before it made one,
        // a delete the crash came after) is only forgotten. Kept, it could name another tool's
        // container of that id later, in a shared `runc.root`. (A crashed daemon's `runc create`
        // still running at the restart, its hook hanging: the runc here fails on its own once
        // the hook ends — "unable to store init state" — and leaves nothing.)
        guard let listed = await list() else { return [] }
        let leftovers = recorded.intersection(listed).sorted()
        for container in recorded.subtracting(listed) { records.forget(container) }
        for container in leftovers { await delete(container) }
        return leftovers
    }

    /// runc's rule for container ids; ours are the process ids the host gives.
    static func isValidContainerID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 1024
            && id.unicodeScalars.allSatisfy { $0.properties.isAlphabetic && $0.isASCII || ("0"..."9").contains($0) || "_+-.".unicodeScalars.contains($0) }
    }

    static func validate(_ spec: ProcessSpec) throws(HoldfastError) {
        if let container = spec.container {
            guard !container.isEmpty else { throw HoldfastError(.badRequest, "container must name a running container") }
            guard let program = spec.argv.first, !program.isEmpty else {
                throw HoldfastError(.badRequest, "argv must name the program to exec in container '\(container)'")
            }
            guard spec.bundle == nil else { throw HoldfastError(.badRequest, "an exec names a container, not a bundle") }
            if let user = spec.user, !isNumericUser(user) {
                throw HoldfastError(.badUser, "user: an exec takes a numeric uid[:gid] inside the container, not '\(user)'")
            }
        } else {
            guard isValidContainerID(spec.id) else {
                throw HoldfastError(.badRequest, "id '\(spec.id)' is not a valid runc container id (letters, digits, _ + - .)")
            }
            guard let bundle = spec.bundle, bundle.hasPrefix("/") else {
                throw HoldfastError(.badRequest, "bundle must be the absolute path of an OCI bundle")
            }
            guard spec.argv.isEmpty else {
                throw HoldfastError(.badRequest, "argv must be empty for a runc container: its bundle's config.json names the program")
            }
            guard spec.user == nil, spec.env == nil, spec.cwd == nil else {
                throw HoldfastError(.badRequest, "user, env and cwd of a runc container come from its bundle's config.json")
            }
        }
    }

    private static func isNumericUser(_ user: String) -> Bool {
        let parts = user.split(separator: ":", omittingEmptySubsequences: false)
        return (1...2).contains(parts.count) && parts.allSatisfy { UInt32($0) != nil }
    }

    // MARK: Lifecycle

    /// `runc create` then `runc start`: the container runs when this returns. On failure no
    /// container is left (runc delete --force) and every fd is closed.
    func create(_ spec: ProcessSpec) async throws(HoldfastError) -> Launcher.Started {
        await deleteIfLeftOver(spec.id)
        let scratch = Scratch(directory: workDirectory)
        defer { scratch.remove() }
        var stdio = try Launcher.makeStdio(spec, terminal: false)
        var arguments = ["create", "--bundle", spec.bundle!, "--pid-file", scratch.pidFile]
        // Recorded first: whatever ends this daemon from here on, the next start deletes it.
        do {
            try records.record(spec.id)
        } catch {
            stdio.closeAll()
            throw HoldfastError(.runtimeFailed, "cannot record the container before creating it: \(error)")
        }
        let console: ConsoleSocket?
        do throws(HoldfastError) {
            console = spec.tty ? try ConsoleSocket(path: scratch.consoleSocket) : nil
            if console != nil { arguments += ["--console-socket", scratch.consoleSocket] }
            arguments.append(spec.id)
            try await run(
                arguments, log: scratch.logFile, stdio: stdio, what: "runc create",
                seccompFilter: await signalGuardProgram(bundle: spec.bundle!, containerUID: nil))
        } catch {
            stdio.closeAll()
            await delete(spec.id)
            throw error
        }
        stdio.closeChildEnds()  // the container's init has them now
        var child: ChildReaper.Child?
        do throws(HoldfastError) {
            if let console {
                let master = try await console.receiveMaster()
                // Before `runc start`: nothing of the container runs yet to hold the size lock.
                try? Terminal.resize(fd: master, to: WindowSize(rows: spec.rows ?? 24, columns: spec.columns ?? 80))
                stdio.hostEnds.insert(master, at: 0)
            }
            let pid = try readPidFile(scratch.pidFile)
            // Registered now, before `runc start` lets it run: its exit and signals are its own
            // from here on, whatever the kernel does with its pid.
            child = reaper.adopt(pid)
            // Read before its program runs: the cgroup runc put it in, at the count it starts from.
            let oomCounter = OOMKillCounter.locate(pid: pid)
            try await run(["start", spec.id], log: scratch.logFile, what: "runc start")
            logger.info("container started", metadata: ["process": "\(spec.id)", "pid": "\(pid)", "bundle": "\(spec.bundle!)"])
            var started = Launcher.started(pid: pid, child: child, id: spec.id, stdio: stdio)
            started.oomCounter = oomCounter
            return started
        } catch {
            console?.close()
            stdio.closeAll()
            await delete(spec.id)
            // Nobody will wait for the init `runc delete` ended.
            if let child { reaper.abandon(child) }
            throw error
        }
    }

    /// `runc exec --detach`: `spec.argv` in the running container `container` (made from
    /// `bundle`), with its own streams; the process is reparented to the supervisor like a
    /// container's init.
    func exec(
        _ spec: ProcessSpec, in container: String, bundle: String, oomCounter: OOMKillCounter? = nil
    ) async throws(HoldfastError) -> Launcher.Started {
        let scratch = Scratch(directory: workDirectory)
        defer { scratch.remove() }
        let process = try await Self.execProcess(bundle: bundle, spec: spec)
        do {
            try WholeFile.write(scratch.processFile, process, mode: 0o600)
        } catch {
            throw HoldfastError(.runtimeFailed, "cannot write the exec's process spec: \(error)")
        }
        var stdio = try Launcher.makeStdio(spec, terminal: false)
        var arguments = ["exec", "--detach", "--pid-file", scratch.pidFile, "--process", scratch.processFile]
        let console: ConsoleSocket?
        do throws(HoldfastError) {
            console = spec.tty ? try ConsoleSocket(path: scratch.consoleSocket) : nil
            if console != nil { arguments += ["--console-socket", scratch.consoleSocket] }
            try await run(
                arguments + [container], log: scratch.logFile, stdio: stdio, what: "runc exec",
                seccompFilter: await signalGuardProgram(bundle: bundle, containerUID: spec.user.flatMap { UInt32($0.split(separator: ":").first ?? "") }))
        } catch {
            stdio.closeAll()
            throw error
        }
        stdio.closeChildEnds()
        do throws(HoldfastError) {
            if let console {
                // Not sized here: runc applied the process's `consoleSize` before it started.
                // Here it would be a TIOCSWINSZ on a thread of the cooperative pool, on a
                // terminal the container's processes can already open and hold the size lock of
                // (README, "Security"): as many such execs as CPUs stopped every task of the
                // supervisor. (A create's terminal is sized before `runc start`, while nothing
                // of the container runs.)
                stdio.hostEnds.insert(try await console.receiveMaster(), at: 0)
            }
            let pid = try readPidFile(scratch.pidFile)
            let child = reaper.adopt(pid)
            logger.info("exec started", metadata: ["process": "\(spec.id)", "container": "\(container)", "pid": "\(pid)"])
            var started = Launcher.started(pid: pid, child: child, id: spec.id, stdio: stdio)
            started.oomCounter = oomCounter
            return started
        } catch {
            console?.close()
            stdio.closeAll()
            throw error
        }
    }

    /// The signal guard's program for a container made from `bundle` (an exec's process as
    /// `containerUID`), or nil: a container with a pid namespace of its own cannot see the
    /// supervisor (and a filter there would refuse its init's own kill -1). One without — the
    /// bundle leaves the pid namespace out, or joins the supervisor's by path (`--pid=host` in
    /// other tools) — can signal it like a direct process, so it gets the same guard, chosen by
    /// the host uid its process runs as.
    func signalGuardProgram(bundle: String, containerUID: uid_t?) async -> [UInt8]? {
        guard let signalGuard, await RuncBundleIdentity.sharesThisPIDNamespace(bundle: bundle) else { return nil }
        return signalGuard.program(forUID: await RuncBundleIdentity.hostUID(bundle: bundle, containerUID: containerUID) ?? 0)
    }

    /// `runc kill ID SIGNAL`.
    func kill(_ container: String, signal: Int32) async throws(HoldfastError) {
        let scratch = Scratch(directory: workDirectory)
        defer { scratch.remove() }
        try await run(["kill", container, String(signal)], log: scratch.logFile, what: "runc kill")
    }

    /// `runc delete --force ID`: after the container's exit, or to undo a failed create. A
    /// container that does not exist is not an error.
    func delete(_ container: String) async {
        guard await !deleteOnce(container) else { return }
        guard undeleted.withLockedValue({ $0.insert(container).inserted }) else { return }
        Task { [self] in
            var pause = Duration.seconds(1)
            while undeleted.withLockedValue({ $0.contains(container) }) {
                try? await Task.sleep(for: pause)
                guard undeleted.withLockedValue({ $0.contains(container) }) else { return }
                if await deleteOnce(container) {
                    undeleted.withLockedValue { _ = $0.remove(container) }
                    logger.info("runc delete went through on a later try", metadata: ["container": "\(container)"])
                    return
                }
                pause = min(pause * 2, .seconds(60))
            }
        }
    }

    /// A container that could not be deleted before is tried again now, before a create of its
    /// id (nothing if it is not one).
    func deleteIfLeftOver(_ container: String) async {
        guard undeleted.withLockedValue({ $0.contains(container) }) else { return }
        if await deleteOnce(container) { undeleted.withLockedValue { _ = $0.remove(container) } }
    }

    /// One `runc delete --force`: true once the container is gone (deleted, or runc does not
    /// have it).
    private func deleteOnce(_ container: String) async -> Bool {
        let scratch = Scratch(directory: workDirectory)
        defer { scratch.remove() }
        do throws(HoldfastError) {
            if Failpoint.fails(Failpoint.runcDeleteFails, process: container, passes: 1...2) {
                throw HoldfastError(.runtimeFailed, "runc delete: fork failed: Resource temporarily unavailable (failpoint)")
            }
            try await run(["delete", "--force", container], log: scratch.logFile, what: "runc delete")
            records.forget(container)
            return true
        } catch {
            if !error.message.contains("does not exist") && !error.message.contains("not exist") {
                logger.warning("runc delete failed: tried again", metadata: ["container": "\(container)", "error": "\(error.message)"])
                return false
            }
            records.forget(container)
            return true
        }
    }

    // MARK: Running runc

    /// Runs one runc command to its end (bounded), with `stdio` as its fds 0-2 (nil: /dev/null).
    /// A non-zero exit becomes an error carrying runc's own message.
    private func run(
        _ arguments: [String], log: String, stdio: Launcher.Stdio = .init(), what: String, seccompFilter: [UInt8]? = nil
    ) async throws(HoldfastError) {
        var options = SpawnOptions(
            executable: path, arguments: [path, "--root", root, "--log", log, "--log-format", "json"] + arguments,
            environment: Launcher.defaultEnvironment)
        options.seccompFilter = seccompFilter
        options.stdin = stdio.stdin
        options.stdout = stdio.stdout
        options.stderr = stdio.stderr
        // runc in its own session: a container init (or an exec) that runc does not move into a
        // session of its own inherits this one, never the supervisor's process group, so its
        // `kill 0` stays among runc's processes and the container's.
        options.newSession = true
        let child: ChildReaper.Child
        do {
            child = try await reaper.spawnAwaitingExec(options)
        } catch {
            // No task or fd to start it with is not a missing runc.
            throw Launcher.forkFailure(error) ?? HoldfastError(.runtimeMissing, "cannot run runc (runc.path '\(path)'): \(error)")
        }
        commandsUnderWay.withLockedValue { $0[child.pid] = (child, false) }
        let expired = NIOLockedValueBox(false)
        let watchdog = TimeoutWheel.shared.schedule(after: Self.commandTimeout) { [reaper] in
            expired.withLockedValue { $0 = true }
            // Through the registration: a runc that ended as the watchdog fired is not killed
            // by number (its pid may be another process's by then).
            _ = reaper.signal(child, SIGKILL)
        }
        let status = await reaper.wait(child)
        TimeoutWheel.shared.cancel(watchdog)
        let endedByStop = commandsUnderWay.withLockedValue { $0.removeValue(forKey: child.pid)?.endedByStop ?? false }
        let timedOut = expired.withLockedValue { $0 }
        guard status != .exited(0) else { return }
        if endedByStop { throw HoldfastError(.shuttingDown, "the daemon stopped while \(what) ran: ended with it (\(status))") }
        let message = Self.lastError(inLog: log) ?? (timedOut ? "timed out after \(Self.commandTimeout)" : "\(status)")
        throw HoldfastError(Self.failureCode(message), "\(what): \(message)")
    }

    /// runc's message for a program it could not exec in the container, as the shell's codes:
    /// `exec: "x": executable file not found in $PATH` (127), `exec: "/etc": permission denied`
    /// (126); anything else is the runtime's failure.
    static func failureCode(_ message: String) -> HoldfastError.Code {
        let text = message.lowercased()
        guard text.contains("exec") else { return .runtimeFailed }
        if text.contains("executable file not found") || text.contains("no such file or directory") { return .commandNotFound }
        if text.contains("permission denied") || text.contains("exec format error") || text.contains("is a directory") { return .cannotExecute }
        return .runtimeFailed
    }

    /// The last error runc logged (its JSON log: one object per line, `level` and `msg`).
    static func lastError(inLog path: String) -> String? {
        guard let bytes = WholeFile.read(path) else { return nil }
        struct Line: Decodable {
            var level: String
            var msg: String
        }
        let decoder = JSONDecoder()
        var last: String?
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            if let entry = try? decoder.decode(Line.self, from: Data(line)), entry.level == "error" || entry.level == "fatal" {
                last = entry.msg
            }
        }
        return last
    }

    private func readPidFile(_ path: String) throws(HoldfastError) -> pid_t {
        guard let bytes = WholeFile.read(path),
            let pid = pid_t(String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0
        else {
            throw HoldfastError(.runtimeFailed, "runc wrote no pid file at \(path)")
        }
        return pid
    }

    /// Per-command file names under the work directory, removed when the command is done.
    private struct Scratch {
        let pidFile: String
        let logFile: String
        let consoleSocket: String
        let processFile: String

        init(directory: String) {
            // Short names: a Unix socket path has to fit in 108 bytes.
            let tag = String(UInt64.random(in: 0..<UInt64.max), radix: 36)
            pidFile = "\(directory)/r\(tag).pid"
            logFile = "\(directory)/r\(tag).log"
            consoleSocket = "\(directory)/r\(tag).sock"
            processFile = "\(directory)/r\(tag).json"
        }

        func remove() {
            for file in [pidFile, logFile, consoleSocket, processFile] { unlink(file) }
        }
    }
}

/// The console socket runc sends a container's pty master to.
private final class ConsoleSocket: Sendable {
    let listener: Listener
    /// runc sends the master during create; this bounds the wait for a runc that never does.
    static let timeout: Duration = .seconds(10)

    init(path: String) throws(HoldfastError) {
        do {
            listener = try Listener(binding: .unix(path: path), unixMode: 0o600)
        } catch {
            throw HoldfastError(.runtimeFailed, "cannot listen on the console socket \(path): \(error)")
        }
    }

    /// Accepts runc's connection and takes the master: exactly one fd, the pty name as payload.
    func receiveMaster() async throws(HoldfastError) -> Int32 {
        let connection = NIOLockedValueBox<AsyncFD?>(nil)
        let expired = NIOLockedValueBox(false)
        let listener = self.listener
        // Closing the listener and the connection wakes a pending accept or receive.
        let watchdog = TimeoutWheel.shared.schedule(after: Self.timeout) {
            expired.withLockedValue { $0 = true }
            listener.close()
            connection.withLockedValue { $0 }?.close()
        }
        defer {
            TimeoutWheel.shared.cancel(watchdog)
            connection.withLockedValue { $0 }?.close()
            close()
        }
        do {
            let accepted = try await listener.accept()
            connection.withLockedValue { $0 = accepted }
            if expired.withLockedValue({ $0 }) { accepted.close() }
            let message = try await FDChannel(accepted).receive(maxPayload: 4096, maxDescriptors: 1)
            guard message.descriptors.count == 1 else {
                message.closeDescriptors()
                throw HoldfastError(.runtimeFailed, "runc sent \(message.descriptors.count) fds to the console socket, not 1")
            }
            return message.descriptors[0]
        } catch let error as HoldfastError {
            throw error
        } catch {
            if expired.withLockedValue({ $0 }) {
                throw HoldfastError(.runtimeFailed, "runc did not send the pty master within \(Self.timeout)")
            }
            throw HoldfastError(.runtimeFailed, "console socket: \(error)")
        }
    }

    func close() { listener.close() }
}
