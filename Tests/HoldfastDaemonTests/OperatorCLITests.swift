import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The host commands as a runc, podman or conmon user drives them (issue 18), each against a
/// real daemon and `holdfast host serve`, every client a real `holdfast` process.
@Suite("The operator's CLI: run/exec options, detach and attach, wait/stop/logs/ps -a, exit codes", .timeLimit(.minutes(10)))
struct OperatorCLITests {
    static let needsRoot = "needs root: the daemon's broker runs as a uid of its own"

    /// `--help` and `-h` are answered by every command (before the command's first word; after
    /// it they are the command's); a usage error names the subcommand's usage, and exits 125
    /// for the host commands (podman's convention), 64 for the others.
    @Test func helpEverywhereAndUsageErrorsNameTheirCommand() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        func holdfast(_ arguments: [String]) async throws -> (status: HoldfastPosix.ExitStatus, out: String, err: String) {
            let out = open(directory.file("out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let err = open(directory.file("err"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let pid = try processes.start([holdfastExecutable()] + arguments, stdout: out, stderr: err)
            close(out)
            close(err)
            let status = try await processes.wait(pid, timeout: .seconds(30))
            return (
                status, String(decoding: readFile(directory.file("out")) ?? [], as: UTF8.self),
                String(decoding: readFile(directory.file("err")) ?? [], as: UTF8.self)
            )
        }
        let subcommands = ["serve", "run", "exec", "attach", "wait", "stop", "logs", "ps", "kill", "migrate"]
        for subcommand in subcommands {
            for flag in ["--help", "-h"] {
                let help = try await holdfast(["host", subcommand, flag])
                #expect(help.status == .exited(0), "host \(subcommand) \(flag): \(help.err)")
                #expect(help.out.contains("USAGE: holdfast host \(subcommand)"), "host \(subcommand) \(flag): \(help.out)")
            }
        }
        for arguments in [["host", "run", "-it", "--help"], ["host", "run", "-d", "-h"], ["host", "exec", "web", "--help"], ["host", "exec", "-t", "web", "-h"]] {
            let help = try await holdfast(arguments)
            #expect(help.status == .exited(0), "\(arguments): \(help.err)")
            #expect(help.out.contains("USAGE: holdfast host \(arguments[1])"), "\(arguments)")
        }

        let usage: [([String], Int32, String)] = [
            (["host", "run", "--bundle", "/srv/web"], 125, "--bundle needs --runtime runc"),
            (["host", "run", "--bogus", "sh"], 125, "unknown option '--bogus'"),
            (["host", "run"], 125, "name a command"),
            (["host", "exec", "web"], 125, "name a command"),
            (["host", "exec", "-u", "www-data", "web", "--", "id"], 125, "an exec takes UID[:GID]"),
            (["host", "run", "-w", "relative", "--", "pwd"], 125, "must be an absolute path"),
            (["host", "run", "--detach-keys", "ctrl-1", "--", "sh"], 125, "--detach-keys 'ctrl-1'"),
            (["host", "stop", "--time", "4000", "x"], 125, "--time must be 0 to 3600"),
            (["host", "ps", "--bogus"], 125, "Unknown option '--bogus'"),
            (["status", "--bogus"], 64, "Unknown option '--bogus'"),
            (["config", "check"], 64, "Missing expected argument"),
        ]
        for (arguments, code, message) in usage {
            let result = try await holdfast(arguments)
            let name = arguments.prefix { !$0.hasPrefix("-") }.prefix(2).joined(separator: " ")
            #expect(result.status == .exited(code), "\(arguments): \(result.err)")
            #expect(result.err.contains(message), "\(arguments): \(result.err)")
            #expect(result.err.contains("Usage: holdfast \(name)"), "\(arguments): the subcommand's usage line: \(result.err)")
            #expect(!result.err.contains("holdfast <subcommand>"), "\(arguments): \(result.err)")
        }

        // Nothing listening: the error says what to check.
        let noServe = try await holdfast(["host", "ps", "--control", directory.file("host.sock")])
        #expect(noServe.status == .exited(125))
        #expect(noServe.err.contains("No such file or directory (errno 2); is 'holdfast host serve' running?"), "\(noServe.err)")
        let noDaemon = try await holdfast(["status", "--socket", directory.file("nothing/control.sock")])
        #expect(noDaemon.status == .exited(1))
        #expect(noDaemon.err.contains("is the daemon running?"), "\(noDaemon.err)")
    }

    /// Options are holdfast's only before the command; a process gets the environment, working
    /// directory and user asked for, and PATH, HOME and (with a terminal) the client's TERM
    /// when not told otherwise — and `/` as its working directory, never the daemon's.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func optionsBeforeTheCommandAndTheProcesssEnvironment() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)

        // Everything after the first word is the command's, dashes included, with or without --.
        let words = try await serve.cli(["run", "echo", "-t", "-d", "--help", "-e", "X=1"])
        #expect(words.status == .exited(0), "\(words.err)")
        #expect(words.out == "-t -d --help -e X=1\n")
        let afterTerminator = try await serve.cli(["run", "--", "echo", "-i", "--id"])
        #expect(afterTerminator.out == "-i --id\n", "\(afterTerminator.err)")

        // -e NAME=VALUE and -e NAME (this client's value), -w, and the defaults filled in.
        let environment = SpawnOptions.inheritedEnvironment().filter { !$0.hasPrefix("HOLDFAST_PASSED=") } + ["HOLDFAST_PASSED=from-client"]
        let shown = try await serve.cli(
            ["run", "-e", "GREETING=hello world", "-e", "HOLDFAST_PASSED", "-e", "HOLDFAST_UNSET_ANYWHERE", "-w", "/tmp", "--",
             "sh", "-c", "echo \"$GREETING|$HOLDFAST_PASSED|${HOLDFAST_UNSET_ANYWHERE-unset}|$HOME|$PATH\"; pwd"],
            environment: environment)
        #expect(shown.status == .exited(0), "\(shown.err)")
        #expect(shown.out == "hello world|from-client|unset|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/tmp\n")
        let defaults = try await serve.cli(["run", "--", "sh", "-c", "pwd; echo \"${TERM-no-term}\""])
        #expect(defaults.out == "/\nno-term\n", "cwd / and no TERM without a terminal: \(defaults.err)")
        // -u: a user by name (nobody's uid and its home).
        let nobody = try #require(UserAccount.lookup("nobody"))
        let user = try await serve.cli(["run", "-u", "nobody", "--", "sh", "-c", "id -u; echo $HOME"])
        #expect(user.out == "\(nobody.uid)\n\(nobody.home ?? "/")\n", "\(user.err)")

        // A terminal gets this client's TERM (an -e TERM wins), and the daemon's default otherwise.
        let withTerm = SpawnOptions.inheritedEnvironment().filter { !$0.hasPrefix("TERM=") } + ["TERM=xterm-256color"]
        let tty = try await serve.cli(["run", "-t", "--", "sh", "-c", "echo $TERM"], environment: withTerm)
        #expect(tty.out == "xterm-256color\r\n", "\(tty.err)")
        let chosen = try await serve.cli(["run", "-t", "-e", "TERM=vt100", "--", "sh", "-c", "echo $TERM"], environment: withTerm)
        #expect(chosen.out == "vt100\r\n", "\(chosen.err)")
        let noTerm = SpawnOptions.inheritedEnvironment().filter { !$0.hasPrefix("TERM=") }
        let fallback = try await serve.cli(["run", "-t", "--", "sh", "-c", "echo $TERM"], environment: noTerm)
        #expect(fallback.out == "xterm\r\n", "\(fallback.err)")
    }

    /// podman's exit codes: 127 for a program that is not there, 126 for one that cannot be
    /// executed, 125 for Holdfast's own failures (usage errors included), each with one line
    /// saying why; otherwise the process's own.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func exitCodesFollowPodmansConvention() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)

        let missing = try await serve.cli(["run", "--", "/nonexistent/program"])
        #expect(missing.status == .exited(127), "\(missing.err)")
        #expect(missing.err.hasPrefix("holdfast host run: command-not-found: cannot start /nonexistent/program"), "\(missing.err)")
        let notFoundInPath = try await serve.cli(["run", "--", "no-such-command-anywhere"])
        #expect(notFoundInPath.status == .exited(127), "\(notFoundInPath.err)")
        let directory = try await serve.cli(["run", "--", "/etc"])
        #expect(directory.status == .exited(126), "\(directory.err)")
        #expect(directory.err.contains("cannot-execute"), "\(directory.err)")
        let notExecutable = try await serve.cli(["run", "--", "/etc/hostname"])
        #expect(notExecutable.status == .exited(126), "\(notExecutable.err)")
        let own = try await serve.cli(["run", "--", "sh", "-c", "exit 125"])
        #expect(own.status == .exited(125) && own.err.isEmpty, "a process's own 125 comes with no line: \(own.err)")
        let refused = try await serve.cli(["run", "--id", "bad/id", "--runtime", "runc", "--bundle", "/nonexistent"])
        #expect(refused.status == .exited(125))
        #expect(refused.err.split(separator: "\n").count == 1, "one line: \(refused.err)")

        // Signals: a name or a number; a bad one lists what is valid (client side), a number
        // that is not a signal is refused by host serve too.
        let badName = try await serve.cli(["kill", "anything", "BOGUS"])
        #expect(badName.status == .exited(125))
        #expect(badName.err.contains("unknown signal 'BOGUS': valid are HUP INT QUIT"), "\(badName.err)")
        #expect(badName.err.contains("Usage: holdfast host kill"), "the subcommand's usage line: \(badName.err)")
        let badNumber = try await serve.cli(["kill", "anything", "99"])
        #expect(badNumber.status == .exited(125))
        #expect(badNumber.err.contains("unknown signal '99'"), "\(badNumber.err)")
        do {
            try await HostClient.signal(control: serve.control, id: "anything", signal: 99)
            Issue.record("signal 99 was accepted")
        } catch {
            #expect(error.code == .badRequest && error.message.contains("99 is not a signal: valid are HUP"), "\(error)")
        }
        // A process that exited: the error says why in words, not an errno number.
        let gone = try await serve.cli(["kill", "no-such-process", "TERM"])
        #expect(gone.status == .exited(125))
        #expect(gone.err.hasPrefix("holdfast host kill: no-such-process: "), "\(gone.err)")
        // A real-time offset past Int32's range is an unknown signal, not a crash.
        let huge = try await serve.cli(["kill", "-s", "RTMIN+2147483614", "anything"])
        #expect(huge.status == .exited(125) && huge.err.contains("unknown signal 'RTMIN+2147483614'"), "\(huge.err)")
    }

    /// SIGTERM or SIGHUP to a `host run` client (`timeout`, a cancelled CI job, a closed
    /// terminal) is passed on to the process, as podman's `--sig-proxy` does, and the client
    /// lets go, dying of that signal. Before, it killed the client alone: the process ran on,
    /// its output waiting for a client that never came.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)"), arguments: [SIGTERM, SIGHUP])
    func aSignalToTheClientIsPassedOnToTheProcess(signal: Int32) async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let script = "trap 'echo got-it; exit 3' TERM HUP; echo ready; while :; do sleep 0.05; done"
        let client = try serve.start(["run", "--id", "trapper", "--", "sh", "-c", script])
        try await eventually("the process ready") { client.out == "ready\n" }
        kill(client.pid, signal)
        let ended = try await client.finish()
        #expect(ended.status == .signaled(signal), "dies of it, as a shell expects: \(ended.err)")
        #expect(ended.err.contains("passed on to trapper"), "\(ended.err)")
        #expect(ended.err.contains("(from pid \(getpid()) (uid \(getuid())"), "who sent it is said: \(ended.err)")
        let waited = try await serve.cli(["wait", "trapper"], within: .seconds(30))
        #expect(waited.out == "3\n", "the process had the signal: \(waited.out)\(waited.err)")
        #expect(try await serve.cli(["logs", "trapper"]).out == "ready\ngot-it\n", "what it wrote after, in its log")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A second SIGTERM while the first is passed on ends a terminal client at once — and puts
    /// its terminal back as it was (line editing, echo, blocking reads). Before, it died with
    /// the terminal raw and non-blocking: the shell after it echoed nothing and its reads failed
    /// with EAGAIN. The first one's pass-on waits here because the guest is away (a migration's
    /// blackout).
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func aClientKilledMidPassOnPutsItsTerminalBack() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let terminal = try TestTerminal()
        defer { terminal.close() }
        var before = termios()
        #expect(tcgetattr(terminal.slave, &before) == 0)
        let flagsBefore = fcntl(terminal.slave, F_GETFL)
        let client = try serve.start(
            ["run", "-t", "--id", "held", "--", "sh", "-c", "trap 'exit 3' TERM; echo ready; while :; do sleep 0.05; done"],
            stdin: terminal.slave, stdout: terminal.slave)
        try await terminal.expect("ready")
        var raw = termios()
        #expect(tcgetattr(terminal.slave, &raw) == 0 && raw.c_lflag & tcflag_t(ICANON) == 0, "the client made it raw")

        let migration = Task { try await serve.cli(["migrate", "--blackout", "4000"], within: .seconds(60)) }
        try await eventually("host serve sees the guest gone") { (try? await HostClient.stats(control: serve.control).guestConnected) == false }
        kill(client.pid, SIGTERM)
        try await Task.sleep(for: .milliseconds(300))
        kill(client.pid, SIGTERM)
        #expect(try await client.finish(within: .seconds(3)).status == .signaled(SIGTERM), "the second one ends it at once")
        var after = termios()
        #expect(tcgetattr(terminal.slave, &after) == 0)
        #expect(after.c_lflag == before.c_lflag && after.c_iflag == before.c_iflag && after.c_oflag == before.c_oflag, "the terminal as it was")
        #expect(fcntl(terminal.slave, F_GETFL) == flagsBefore, "and its flags")
        #expect(try await migration.value.status == .exited(0))
        _ = try await serve.cli(["stop", "held"])
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A window resized while the guest is away past a request's bound (a migration's 12 s
    /// blackout; a resize waits 10 s for the guest) reaches the process once it is back: the
    /// client sends the size again until one is answered. Before, the failed request was the
    /// end of it, and the process kept the old size until the next resize.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func aResizeDuringABlackoutReachesTheProcessAfter() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let terminal = try TestTerminal()
        defer { terminal.close() }
        let client = try serve.start(
            ["run", "-t", "--id", "sized", "--", "sh", "-c", "trap 'stty size' WINCH; echo ready; while :; do sleep 0.1; done"],
            stdin: terminal.slave, stdout: terminal.slave)
        try await terminal.expect("ready")
        let migration = Task { try await serve.cli(["migrate", "--blackout", "12000"], within: .seconds(60)) }
        try await eventually("host serve sees the guest gone") { (try? await HostClient.stats(control: serve.control).guestConnected) == false }
        try Terminal.resize(fd: terminal.slave, to: WindowSize(rows: 30, columns: 100))
        kill(client.pid, SIGWINCH)
        #expect(try await migration.value.status == .exited(0))
        try await terminal.expect("30 100")
        kill(client.pid, SIGINT)
        _ = try await client.finish()
        _ = try await serve.cli(["stop", "sized"])
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A client that goes away (killed) does not end the process's stdin: the next `attach`
    /// takes it over — its lines arrive — and the end of *its* stdin is the end of the
    /// process's. Ctrl-C (SIGINT) detaches the same way and says how to reattach.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func stdinOutlivesItsClientAndAttachTakesItOver() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let script = "while read line; do echo \"got $line\"; done; echo stdin-ended"

        // The first client: a pipe the test writes into, then the client is killed.
        let pipe = try PipeEnds.make()
        let first = try serve.start(["run", "--id", "reader", "--", "sh", "-c", script], stdin: pipe.read)
        close(pipe.read)
        let writer = try AsyncFD(adopting: pipe.write)
        defer { writer.close() }
        try await writeAll(writer, "one\n")
        try await eventually("the first line echoed") { first.out == "got one\n" }
        kill(first.pid, SIGKILL)
        _ = try await first.finish()

        // The second client's stdin is a file: its lines reach the same process, then its end
        // ends the process's stdin.
        try writeFile(daemon.directory.file("more"), Array("two\nthree\n".utf8))
        let second = try await serve.cli(["attach", "reader"], stdinPath: daemon.directory.file("more"))
        #expect(second.status == .exited(0), "\(second.err)")
        #expect(second.out == "got two\ngot three\nstdin-ended\n", "the attached client's stdin: \(second.out)")

        // Ctrl-C: the client detaches (dies of SIGINT, as a shell expects), saying how to
        // reattach; the process runs on and its stdin stays open for the next client.
        let pipe2 = try PipeEnds.make()
        let interrupted = try serve.start(["run", "--id", "reader2", "--", "sh", "-c", script], stdin: pipe2.read)
        close(pipe2.read)
        let writer2 = try AsyncFD(adopting: pipe2.write)
        defer { writer2.close() }
        try await writeAll(writer2, "before\n")
        try await eventually("the line before Ctrl-C") { interrupted.out == "got before\n" }
        kill(interrupted.pid, SIGINT)
        let ended = try await interrupted.finish()
        #expect(ended.status == .signaled(SIGINT), "\(ended.err)")
        #expect(ended.err.contains("detached; reattach with: holdfast host attach reader2"), "\(ended.err)")
        let resumed = try await serve.cli(["attach", "reader2"], stdinPath: daemon.directory.file("more"))
        #expect(resumed.out == "got two\ngot three\nstdin-ended\n", "\(resumed.err)")
        #expect(resumed.status == .exited(0))

        // After a detach the output is no longer held for the next client: it goes on into the
        // log, as a `-d` start's does (before, the relay waited for a client with the chunk it
        // had: `logs` stopped growing, and the process blocked once ~2 MiB waited).
        let ticker = try serve.start(["run", "--id", "ticker", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.02; done"])
        try await eventually("the ticker's first lines") { ticker.out.split(separator: "\n").count >= 5 }
        kill(ticker.pid, SIGINT)
        let detached = try await ticker.finish()
        #expect(detached.err.contains("detached; reattach with: holdfast host attach ticker"), "\(detached.err)")
        let atDetach = try await serve.cli(["logs", "ticker"]).out.split(separator: "\n").compactMap { Int($0) }.last ?? 0
        try await eventually("the log grows after the detach") {
            (try await serve.cli(["logs", "ticker"]).out.split(separator: "\n").compactMap { Int($0) }.last ?? 0) > atDetach + 25
        }
        _ = try await serve.cli(["stop", "--time", "1", "ticker"])

        // A process that ends without reading all its stdin: the client's writes fail, which is
        // neither a detach nor an error — it ends with the process's code.
        try writeFile(daemon.directory.file("big"), [UInt8](repeating: UInt8(ascii: "x"), count: 8 << 20))
        let partial = try await serve.cli(["run", "--", "sh", "-c", "head -c 3; exit 5"], stdinPath: daemon.directory.file("big"))
        #expect(partial.status == .exited(5), "\(partial.err)")
        #expect(partial.out == "xxx" && partial.err.isEmpty, "\(partial.err)")
    }

    /// With a terminal: the detach keys (Ctrl-P Ctrl-Q, or others chosen) leave the process
    /// running, and `host attach` in another terminal types into it — input arrives.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func detachKeysAndAttachWithATerminal() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)

        let first = try TestTerminal()
        defer { first.close() }
        let run = try serve.start(["run", "-t", "--id", "shell", "--", "sh"], stdin: first.slave, stdout: first.slave)
        try await first.type("echo marker-$((40+2))\n")
        try await first.expect("marker-42")
        try await first.type("\u{10}\u{11}")
        let detached = try await run.finish()
        #expect(detached.status == .exited(0))
        try await first.expect("detached; reattach with: holdfast host attach shell")

        // Another terminal: attach finds the terminal on its own (no --tty), typing works, and
        // chosen detach keys work too.
        let second = try TestTerminal()
        defer { second.close() }
        let attach = try serve.start(["attach", "--detach-keys", "ctrl-x,q", "shell"], stdin: second.slave, stdout: second.slave)
        try await second.type("echo again-$((1+1))\n")
        try await second.expect("again-2")
        try await second.type("\u{18}q")
        #expect(try await attach.finish().status == .exited(0))
        try await second.expect("detached; reattach with: holdfast host attach shell")

        // From a script, its stdin /dev/null: that ends this client's input alone, not the
        // terminal's (which has no end-of-file to give): the next client still types into the
        // process. (Before, the client's end of input ended the process's stdin for good.) The
        // second lets its end of input reach host serve before the next client takes over.
        let attaches = serve.log.components(separatedBy: "process shell: client attached").count
        let scripted = try serve.start(["attach", "shell"])
        try await eventually("the scripted client attached") { serve.log.components(separatedBy: "process shell: client attached").count > attaches }
        try await Task.sleep(for: .milliseconds(500))
        // Asked for by hand, host serve refuses it for a terminal.
        let control = try await ControlClient.connect(to: serve.control)
        defer { control.close() }
        do {
            _ = try await control.call(HostRequest.closeStdin(ProcessIDRequest(id: "shell")), reply: [String: String].self)
            Issue.record("a terminal's input was ended")
        } catch {
            #expect(error.code == .badRequest && error.message.contains("Ctrl-D"), "\(error)")
        }
        // A client displaced before its wait or its detach comes is answered so at once (its
        // detach would let go of the new client's output).
        func attachBy(_ client: ControlClient) async throws {
            let request = HostRequest.attach(ProcessIDRequest(id: "shell"))
            for fd in try await client.request(request.frameType, body: request.body).descriptors { close(fd) }
        }
        let displacedClient = try await ControlClient.connect(to: serve.control)
        defer { displacedClient.close() }
        try await attachBy(displacedClient)
        let displacing = try await ControlClient.connect(to: serve.control)
        defer { displacing.close() }
        try await attachBy(displacing)
        for request in [HostRequest.wait(HostWaitRequest(id: "shell")), .detach(ProcessIDRequest(id: "shell"))] {
            do {
                _ = try await withTimeout("the displaced client's \(request)", .seconds(10)) { [displacedClient] in
                    try await displacedClient.call(request, reply: [String: String].self)
                }
                Issue.record("\(request) from a displaced client was answered")
            } catch let error as HoldfastError {
                #expect(error.code == .attachedElsewhere, "\(error)")
            }
        }

        // A third: the process's exit code comes back through attach.
        let third = try TestTerminal()
        defer { third.close() }
        let last = try serve.start(["attach", "shell"], stdin: third.slave, stdout: third.slave)
        // The client it displaced lets go at once, saying so, while the process runs on (before,
        // it sat deaf until the process ended, and a signal to it — its terminal closed — was
        // passed on to the process the new client now used).
        let displaced = try await scripted.finish(within: .seconds(30))
        #expect(displaced.status == .exited(125) && displaced.err.contains("another client attached to shell"), "\(displaced.err)")
        try await third.type("echo still-$((2+3))\n")
        try await third.expect("still-5")
        try await third.type("exit 3\n")
        #expect(try await last.finish().status == .exited(3))
    }

    /// `-d` prints the id and returns; `logs` shows the output kept (during and after), `-f`
    /// follows it to the end; `wait` prints the exit status; `stop` sends SIGTERM, then
    /// SIGKILL after --time when it is ignored (a container's pid 1 would); `ps` lists what
    /// runs, `ps -a` what ended too, with the codes.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func detachedProcessesWaitStopLogsAndPS() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)

        // A process that ignores SIGTERM, started detached.
        let started = try await serve.cli(
            ["run", "-d", "--id", "stubborn", "--", "sh", "-c", "trap '' TERM; echo ready; echo to-stderr >&2; while :; do sleep 0.1; done"])
        #expect(started.status == .exited(0), "\(started.err)")
        #expect(started.out == "stubborn\n")
        try await eventually("its output in the log") { try await serve.cli(["logs", "stubborn"]).out == "ready\n" }
        let logs = try await serve.cli(["logs", "stubborn"])
        #expect(logs.err == "to-stderr\n", "stderr on stderr")
        let listed = try await serve.cli(["ps"])
        #expect(listed.out.contains("stubborn") && listed.out.contains("running"), "\(listed.out)")
        #expect(listed.out.contains("COMMAND") && listed.out.contains("sh -c 'trap"), "\(listed.out)")
        // podman's habits: --name for --id, -q the ids alone, --format json as --json.
        let named = try await serve.cli(["run", "-d", "--name", "named", "--", "true"])
        #expect(named.out == "named\n", "\(named.err)")
        #expect(try await serve.cli(["wait", "named"]).out == "0\n")
        #expect(try await serve.cli(["ps", "-q"]).out == "stubborn\n")
        let formatted = try await serve.cli(["ps", "--format", "json"])
        #expect(formatted.out == (try await serve.cli(["ps", "--json"])).out && formatted.out.hasPrefix("{"), "\(formatted.out)")
        #expect(try await serve.cli(["ps", "--format", "table"]).status == .exited(125))

        // A waiter started before the stop gets the code once it ends.
        let waiter = try serve.start(["wait", "stubborn"])
        let stopped = try await serve.cli(["stop", "--time", "1", "stubborn"])
        #expect(stopped.status == .exited(0), "\(stopped.err)")
        #expect(stopped.out == "stubborn\n")
        #expect(stopped.err.contains("stubborn did not exit within 1s of SIGTERM: killed with SIGKILL"), "\(stopped.err)")
        let waited = try await waiter.finish()
        #expect(waited.status == .exited(0) && waited.out == "137\n", "\(waited.err)")
        #expect(try await serve.cli(["wait", "stubborn"]).out == "137\n", "a wait after the end")

        // ps forgets it; ps -a does not; its log outlives it.
        try await eventually("ps without it") { try await !serve.cli(["ps"]).out.contains("stubborn") }
        #expect(try await serve.cli(["ps"]).out.hasPrefix("PROCESS"), "an empty list is its header alone")
        let all = try await serve.cli(["ps", "-a"])
        let line = all.out.split(separator: "\n").first { $0.hasPrefix("stubborn") }.map(String.init) ?? ""
        #expect(line.contains("exited") && line.contains("137"), "\(all.out)")
        #expect(try await serve.cli(["logs", "stubborn"]).out == "ready\n")

        // A polite one: SIGTERM is enough.
        _ = try await serve.cli(["run", "-d", "--id", "polite", "--", "sleep", "1000"])
        let politeStop = try await serve.cli(["stop", "polite"])
        #expect(politeStop.status == .exited(0) && politeStop.err.isEmpty, "\(politeStop.err)")
        #expect(try await serve.cli(["wait", "polite"]).out == "143\n")

        // logs -f follows to the end; a detached process without -i has no stdin (cat ends).
        _ = try await serve.cli(["run", "-d", "--id", "counter", "--", "sh", "-c", "cat; for i in 1 2 3 4 5; do echo $i; sleep 0.1; done; exit 4"])
        let followed = try await serve.cli(["logs", "-f", "counter"])
        #expect(followed.status == .exited(0))
        #expect(followed.out == "1\n2\n3\n4\n5\n", "\(followed.out)")
        #expect(try await serve.cli(["wait", "counter"]).out == "4\n")

        // -d -i keeps stdin for an attach.
        _ = try await serve.cli(["run", "-d", "-i", "--id", "echoer", "--", "cat"])
        try writeFile(daemon.directory.file("typed"), Array("typed later\n".utf8))
        let attached = try await serve.cli(["attach", "echoer"], stdinPath: daemon.directory.file("typed"))
        #expect(attached.status == .exited(0), "\(attached.err)")
        #expect(attached.out == "typed later\n")

        // Several at once, as podman does: three that do not end on SIGTERM take --time once
        // (5 s), not three times, and each prints its id; `kill -s` takes several ids too. Each
        // notes its SIGTERM and, while it lives, whether all three had theirs: stopped together,
        // each saw all three before the SIGKILLs; one after another, the first was killed before
        // the second was asked. (Not timed: the markers tell the two apart.)
        let marks = daemon.directory.file("deaf")
        let allTermed = (1...3).map { "[ -e \(marks)-termed-deaf\($0) ]" }.joined(separator: " && ")
        for id in ["deaf1", "deaf2", "deaf3"] {
            _ = try await serve.cli(["run", "-d", "--id", id, "--", "sh", "-c",
                "trap 'touch \(marks)-termed-\(id)' TERM; while :; do \(allTermed) && touch \(marks)-saw-all-\(id); sleep 0.1; done"])
        }
        let together = try await serve.cli(["stop", "--time", "5", "deaf1", "deaf2", "deaf3"])
        #expect(together.status == .exited(0), "\(together.err)")
        #expect(Set(together.out.split(separator: "\n")) == ["deaf1", "deaf2", "deaf3"], "\(together.out)")
        for id in ["deaf1", "deaf2", "deaf3"] {
            #expect(access("\(marks)-saw-all-\(id)", F_OK) == 0, "\(id) saw every SIGTERM of the stop before its SIGKILL: stopped together")
            #expect(try await serve.cli(["wait", id]).out == "137\n", "\(id) killed after --time")
        }
        // Without a signal, KILL (podman's and docker's default): one deaf to TERM ends.
        _ = try await serve.cli(["run", "-d", "--id", "deaf4", "--", "sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
        #expect(try await serve.cli(["kill", "deaf4"]).out == "deaf4\n")
        #expect(try await serve.cli(["wait", "deaf4"], within: .seconds(30)).out == "137\n")
        for id in ["napper1", "napper2"] { _ = try await serve.cli(["run", "-d", "--id", id, "--", "sleep", "1000"]) }
        let killed = try await serve.cli(["kill", "-s", "KILL", "napper1", "napper2", "nobody-here"])
        #expect(killed.status == .exited(125), "one of them unknown")
        #expect(killed.out == "napper1\nnapper2\n", "\(killed.out)")
        #expect(killed.err.hasPrefix("holdfast host kill: nobody-here: "), "\(killed.err)")
        for id in ["napper1", "napper2"] { #expect(try await serve.cli(["wait", id]).out == "137\n") }
        let ambiguous = try await serve.cli(["kill", "a", "b", "c"])
        #expect(ambiguous.status == .exited(125) && ambiguous.err.contains("name the signal with -s"), "\(ambiguous.err)")

        // Unknown ids: one line, 125.
        for command in [["wait", "nobody-here"], ["stop", "nobody-here"], ["logs", "nobody-here"]] {
            let result = try await serve.cli(command)
            #expect(result.status == .exited(125), "\(command)")
            #expect(result.err.contains("no process 'nobody-here'"), "\(command): \(result.err)")
        }
    }

    /// Ctrl-C while the process is still being started (here no guest: the create waits up to
    /// 30 s for one) ends the client at once, saying so. Before, the signal waited for the
    /// start: Ctrl-C did nothing for as long, and a process started then was left running with
    /// no client.
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func aSignalBeforeTheStartEndsTheClientAtOnce() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        #expect(try await daemon.stop() == .exited(0))
        try await eventually("host serve sees the guest gone") { (try? await HostClient.stats(control: serve.control).guestConnected) == false }
        let client = try serve.start(["run", "--", "true"])
        try await eventually("the client waits for a guest") { client.err.contains("no guest is connected") }
        kill(client.pid, SIGINT)
        let ended = try await client.finish(within: .seconds(10))
        #expect(ended.status == .signaled(SIGINT), "\(ended.err)")
        #expect(ended.err.contains("SIGINT before the process started"), "\(ended.err)")
    }

    /// Feedback: `migrate` says what it did; a `run` with no guest says what it waits for and,
    /// at the end, for how long in words a person reads (not "29.999997352 seconds").
    @Test(.enabled(if: DaemonFixture.canRun, "\(needsRoot)")) func migrateAndWaitsSayWhatTheyDo() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let running = try serve.start(["run", "--id", "ticker", "--", "sh", "-c", "while :; do echo tick; sleep 0.05; done"])
        try await eventually("ticks") { running.out.contains("tick\n") }
        let migrated = try await serve.cli(["migrate", "--blackout", "300"])
        #expect(migrated.status == .exited(0), "\(migrated.err)")
        #expect(migrated.out.hasPrefix("migrated: dropped the bridge and "), "\(migrated.out)")
        #expect(migrated.out.contains("accepted nothing for 300ms; the guest was back "), "\(migrated.out)")
        _ = try await serve.cli(["stop", "ticker"])

        // No guest: the daemon stops; a run says it waits, then gives up in one line.
        #expect(try await daemon.stop() == .exited(0))
        try await eventually("host serve sees the guest gone") { (try? await HostClient.stats(control: serve.control).guestConnected) == false }
        let alone = try await serve.cli(["run", "--", "true"], within: .seconds(90))
        #expect(alone.status == .exited(125))
        let lines = alone.err.split(separator: "\n")
        #expect(lines.count == 2, "\(alone.err)")
        #expect(lines.first?.contains("no guest is connected to host serve's bridge") == true, "\(alone.err)")
        #expect(lines.last?.contains("no guest connected to the bridge at unix:") == true && lines.last?.contains("within 30s:") == true, "\(alone.err)")
    }
}

/// A pseudo-terminal a `holdfast` client runs in: the test types on the master and reads what
/// the client's terminal shows.
final class TestTerminal: Sendable {
    let master: AsyncFD
    let slave: Int32
    private let screen = NIOLockedValueBoxString()

    init() throws {
        let pair = try PseudoTerminal.open(size: WindowSize(rows: 24, columns: 80))
        master = try AsyncFD(adopting: pair.master)
        slave = pair.slave
        let master = master
        let screen = screen
        Task {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { buffer.deallocate() }
            while let count = try? await master.read(into: buffer), count > 0 {
                screen.append(String(decoding: UnsafeRawBufferPointer(rebasing: buffer[..<count]), as: UTF8.self))
            }
        }
    }

    func type(_ text: String) async throws {
        try await writeAll(master, text)
    }

    /// Waits (bounded) until `text` has been shown.
    func expect(_ text: String) async throws {
        do {
            try await eventually("'\(text)' on the terminal") { screen.value.contains(text) }
        } catch {
            Issue.record("the terminal showed:\n\(screen.value)")
            throw error
        }
    }

    /// What the terminal has shown so far.
    var shown: String { screen.value }

    func close() {
        master.close()
        Glibc.close(slave)
    }
}

/// A string appended to from one task, read from another.
final class NIOLockedValueBoxString: Sendable {
    private let box = NIOLockedValueBox("")
    func append(_ text: String) { box.withLockedValue { $0 += text } }
    var value: String { box.withLockedValue { $0 } }
}

/// Writes `text` on `fd` (all of it).
func writeAll(_ fd: AsyncFD, _ text: String) async throws {
    let bytes = Array(text.utf8)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    try await fd.write(UnsafeRawBufferPointer(rebasing: buffer[..<bytes.count]))
}
