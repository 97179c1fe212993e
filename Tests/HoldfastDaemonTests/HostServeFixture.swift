import Foundation
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast host serve` (the binary) in place of a daemon fixture's test bridge host: the
/// daemon's bridge worker dials it, its streams go to `host-streams.sock`.
struct HostServeFixture {
    let daemon: DaemonFixture
    let pid: pid_t
    let control: String
    let logPath: String

    static func start(
        _ daemon: DaemonFixture, openFileLimit: (soft: UInt64, hard: UInt64?)? = nil, environment: [String]? = nil
    ) async throws -> HostServeFixture {
        daemon.bridge.close()
        let dir = daemon.directory
        let control = dir.file("host.sock")
        let logPath = dir.file("serve.log")
        let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try daemon.processes.start(
            [holdfastExecutable(), "host", "serve", "--bridge", "unix:" + dir.file("host-bridge.sock"),
             "--streams", "unix:" + dir.file("host-streams.sock"), "--control", control],
            stdout: log, stderr: log, environment: environment, openFileLimit: openFileLimit)
        close(log)
        let serve = HostServeFixture(daemon: daemon, pid: pid, control: control, logPath: logPath)
        do {
            try await eventually("the guest to say hello to host serve", timeout: .seconds(10)) { serve.log.contains("guest connected") }
        } catch {
            Issue.record("no hello at host serve; its log:\n\(serve.log)\nthe daemon's log:\n\(daemon.log.suffix(3000))")
            throw error
        }
        return serve
    }

    /// host serve armed to die at `failpoint` (debug builds), with this process's environment.
    static func start(_ daemon: DaemonFixture, failpoint: String) async throws -> HostServeFixture {
        let environment = ProcessInfo.processInfo.environment.map { "\($0.key)=\($0.value)" } + ["HOLDFAST_FAILPOINT=\(failpoint):host-serve"]
        return try await start(daemon, environment: environment)
    }

    var log: String { String(decoding: readFile(logPath) ?? [], as: UTF8.self) }

    /// How many hellos host serve has had (one per bridge connection).
    var hellos: Int { log.components(separatedBy: "guest connected").count - 1 }

    /// Starts `holdfast host run --control ... OPTIONS -- ARGV` with stdin from `stdinPath` and
    /// stdout/stderr into files; `finish()` waits (bounded) and reads them.
    func startRun(_ argv: [String], options: [String] = [], stdinPath: String = "/dev/null") throws -> HostRunClient {
        let tag = UInt32.random(in: 0..<UInt32.max)
        let dir = daemon.directory
        let input = open(stdinPath, O_RDONLY | O_CLOEXEC)
        let out = open(dir.file("run\(tag).out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let err = open(dir.file("run\(tag).err"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer {
            close(input)
            close(out)
            close(err)
        }
        let pid = try daemon.processes.start(
            [holdfastExecutable(), "host", "run", "--control", control] + options + ["--"] + argv, stdin: input, stdout: out, stderr: err)
        return HostRunClient(daemon: daemon, pid: pid, outPath: dir.file("run\(tag).out"), errPath: dir.file("run\(tag).err"))
    }
}

extension HostServeFixture {
    /// Starts `holdfast host SUBCOMMAND --control ... ARGS` (the subcommand is `arguments[0]`)
    /// with stdin from `stdin` (an fd, or `stdinPath`) and stdout/stderr into files.
    func start(
        _ arguments: [String], stdinPath: String = "/dev/null", stdin: Int32? = nil, stdout: Int32? = nil, environment: [String]? = nil
    ) throws -> HostRunClient {
        let tag = UInt32.random(in: 0..<UInt32.max)
        let dir = daemon.directory
        let input = stdin ?? open(stdinPath, O_RDONLY | O_CLOEXEC)
        let out = stdout ?? open(dir.file("cli\(tag).out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let err = stdout ?? open(dir.file("cli\(tag).err"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer {
            if stdin == nil { close(input) }
            if stdout == nil {
                close(out)
                close(err)
            }
        }
        let pid = try daemon.processes.start(
            [holdfastExecutable(), "host", arguments[0], "--control", control] + arguments.dropFirst(), stdin: input, stdout: out,
            stderr: err, environment: environment)
        return HostRunClient(daemon: daemon, pid: pid, outPath: dir.file("cli\(tag).out"), errPath: dir.file("cli\(tag).err"))
    }

    /// Runs `holdfast host SUBCOMMAND --control ... ARGS` to its end (bounded).
    func cli(
        _ arguments: [String], stdinPath: String = "/dev/null", environment: [String]? = nil, within bound: Duration = .seconds(60)
    ) async throws -> (status: HoldfastPosix.ExitStatus, out: String, err: String) {
        try await start(arguments, stdinPath: stdinPath, environment: environment).finish(within: bound)
    }
}

/// A running `holdfast host run`.
struct HostRunClient {
    let daemon: DaemonFixture
    let pid: pid_t
    let outPath: String
    let errPath: String

    var out: String { String(decoding: readFile(outPath) ?? [], as: UTF8.self) }
    var err: String { String(decoding: readFile(errPath) ?? [], as: UTF8.self) }

    /// Waits for the client to exit: `bound` is a hang bound, not a timing assertion.
    func finish(within bound: Duration = .seconds(60)) async throws -> (status: HoldfastPosix.ExitStatus, out: String, err: String) {
        let status = try await daemon.processes.wait(pid, timeout: bound)
        return (status, out, err)
    }
}

/// Ends a process that is not our child (an orphan a guest process left) by pid — if that pid
/// is still a `sleep` (it may have ended, and its number gone to someone else).
func killOrphan(_ pid: pid_t?) {
    guard let pid, pid > 1 else { return }
    let command = String(decoding: readFile("/proc/\(pid)/cmdline") ?? [], as: UTF8.self)
    guard command.hasPrefix("sleep\u{0}") else { return }
    kill(pid, SIGKILL)
}
