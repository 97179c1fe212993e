import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// Starts container processes (runtime `direct`) and hands their host-side stdio to the broker.
///
/// The child gets its ends of the pipes (or the pty slave as its controlling terminal); the
/// host-side ends go to the broker by SCM_RIGHTS with the stream descriptions, and the
/// supervisor closes its copies at once: it keeps nothing it does not need.
struct Launcher {
    /// Output pipes get 1 MiB (the default pipe-max-size): more room for a process to keep
    /// writing while the host is away before back-pressure blocks it.
    static let outputPipeCapacity = 1 << 20

    enum Failure: Error {
        case invalid(ErrorBody)
    }

    static let defaultEnvironment = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

    /// Validates a spec without starting anything; the error names the field.
    static func validate(_ spec: ProcessSpec) throws(ErrorBody) {
        guard !spec.id.isEmpty, spec.id.utf8.count <= 256 else {
            throw ErrorBody(code: "bad-request", message: "id must be 1 to 256 bytes")
        }
        guard let program = spec.argv.first, !program.isEmpty else {
            throw ErrorBody(code: "bad-request", message: "argv must name a program")
        }
        for (name, stream) in [("stdin", spec.stdin), ("stdout", spec.stdout), ("stderr", spec.stderr)] {
            guard let stream else { continue }
            do {
                _ = try SocketAddress(parsing: stream.address)
            } catch {
                throw ErrorBody(code: "bad-address", message: "\(name).address: \(error)")
            }
            if stream.mode == .resumable, stream.token?.isEmpty ?? true {
                throw ErrorBody(code: "bad-request", message: "\(name): resumable mode needs a token")
            }
        }
        if spec.tty, spec.stderr != nil {
            throw ErrorBody(code: "bad-request", message: "stderr: a tty process has one output stream (stdout)")
        }
        if let user = spec.user, UserAccount.lookup(user) == nil {
            throw ErrorBody(code: "bad-user", message: "user: no such user '\(user)'")
        }
    }

    /// What `launch` produced: the child's pid, and what to send the broker.
    struct Started {
        var pid: pid_t
        var adopt: AdoptRequest
        var descriptors: [Int32]
    }

    /// Creates the stdio, starts the process, and returns the host-side fds for the broker. On
    /// failure nothing is left open and no process is left running.
    static func start(_ spec: ProcessSpec) throws(ErrorBody) -> Started {
        try validate(spec)
        var childEnds: [Int32] = []
        var hostEnds: [Int32] = []
        var streams: [StreamDescription] = []
        func closeAll() {
            for fd in childEnds + hostEnds { _ = close(fd) }
        }
        var options = SpawnOptions(executable: spec.argv[0], arguments: spec.argv, environment: spec.env ?? defaultEnvironment)
        options.directory = spec.cwd
        if let name = spec.user, let account = UserAccount.lookup(name) {
            let gid = spec.group ?? account.gid
            options.user = (account.uid, gid, [gid])
        }
        do throws(SystemError) {
            if spec.tty {
                let size = WindowSize(rows: spec.rows ?? 24, columns: spec.columns ?? 80)
                let terminal = try PseudoTerminal.open(size: size)
                childEnds.append(terminal.slave)
                hostEnds.append(terminal.master)
                options.stdin = terminal.slave
                options.stdout = terminal.slave
                options.stderr = terminal.slave
                options.controllingTerminal = true
                if let output = spec.stdout {
                    streams.append(StreamDescription(
                        kind: .tty, fd: 0, address: output.address, mode: output.mode, token: output.token,
                        inputAddress: spec.stdin?.address, inputToken: spec.stdin?.token))
                }
            } else {
                if let input = spec.stdin {
                    let pipe = try PipeEnds.make()
                    childEnds.append(pipe.read)
                    hostEnds.append(pipe.write)
                    options.stdin = pipe.read
                    streams.append(StreamDescription(kind: .stdin, fd: hostEnds.count - 1, address: input.address, mode: input.mode, token: input.token))
                }
                for (kind, stream) in [(StreamKind.stdout, spec.stdout), (.stderr, spec.stderr)] {
                    guard let stream else { continue }
                    let pipe = try PipeEnds.make(capacity: outputPipeCapacity)
                    childEnds.append(pipe.write)
                    hostEnds.append(pipe.read)
                    if kind == .stdout { options.stdout = pipe.write } else { options.stderr = pipe.write }
                    streams.append(StreamDescription(kind: kind, fd: hostEnds.count - 1, address: stream.address, mode: stream.mode, token: stream.token))
                }
            }
        } catch {
            closeAll()
            throw ErrorBody(code: "stdio-failed", message: "\(error)")
        }
        let pid: pid_t
        do {
            pid = try Spawner.spawn(options)
        } catch {
            closeAll()
            throw ErrorBody(code: "start-failed", message: error.description)
        }
        for fd in childEnds { _ = close(fd) }  // the child has them now
        if streams.isEmpty {
            for fd in hostEnds { _ = close(fd) }
            hostEnds = []
        }
        return Started(pid: pid, adopt: AdoptRequest(process: spec.id, streams: streams), descriptors: hostEnds)
    }
}
