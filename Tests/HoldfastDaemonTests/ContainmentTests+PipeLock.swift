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

/// The start of both adversaries: one page registered with userfaultfd (argv[1] the file whose
/// appearance releases it, after 60 s at most), and `wait_for_release()` that fills it then.
private let userfaultfdPage = #"""
import ctypes, fcntl, mmap, os, platform, struct, sys, threading, time
release = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
uffd = libc.syscall({"x86_64": 323, "aarch64": 282}[platform.machine()], os.O_CLOEXEC)
if uffd < 0:
    sys.exit("userfaultfd: errno %d" % ctypes.get_errno())
fcntl.ioctl(uffd, 0xC018AA3F, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))            # UFFDIO_API
page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
fcntl.ioctl(uffd, 0xC020AA00, bytearray(struct.pack("QQQQ", address, 4096, 1, 0)))  # REGISTER, MISSING
def wait_for_release():
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    fcntl.ioctl(uffd, 0xC020AA04, bytearray(struct.pack("QQQQ", address, 4096, 0, 0)))  # ZEROPAGE

"""#

/// A container that holds its own stdin pipe's lock inside the kernel: it reads stdin into a
/// page that never arrives (userfaultfd; a hung FUSE file's mapping does the same without
/// privileges), so the broker's next write to that pipe waits for the lock, uninterruptibly.
/// Released by a file appearing (or after 60 s), it echoes all it read.
private let pipeLockHolder = userfaultfdPage + stdinLockBody

/// After `userfaultfdPage`: reads stdin into the page that never arrives, says "holding" (and
/// creates argv[2], if given) once it holds the stdin pipe's lock, waits for the release, then
/// echoes all it read.
private let stdinLockBody = #"""
got = []
reader = threading.Thread(target=lambda: got.append(os.readv(0, [page])))
reader.start()
os.write(1, b"ready\n")
os.read(uffd, 32)  # the fault: the reader is in the kernel, holding the stdin pipe's lock
os.write(1, b"holding\n")
if len(sys.argv) > 2:
    open(sys.argv[2], "w").close()
wait_for_release()
reader.join()
data = page[:got[0]]
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    data += chunk
os.write(1, b"echo:" + data)
"""#

/// The `pipeLockHolder` process ("holder"), started: it has read "first\n" from the host and
/// holds its stdin pipe's lock; creating `release` lets it go.
struct StdinHolder {
    let input: ResumableStream<AsyncFD>
    let release: String
    private let received: NIOLockedValueBox<[UInt8]>
    private let collector: Task<Void, Never>

    static func start(in daemon: DaemonFixture) async throws -> StdinHolder {
        let script = daemon.directory.file("hold-lock.py")
        try writeFile(script, Array(pipeLockHolder.utf8))
        let input = try daemon.streams.open(token: bytes("holder-in"), direction: .send)
        let output = try daemon.streams.open(token: bytes("holder-out"), direction: .receive)
        let received = NIOLockedValueBox<[UInt8]>([])
        let collector = Task {
            for await chunk in output.chunks() { received.withLockedValue { $0 += chunk } }
        }
        let holder = StdinHolder(input: input, release: daemon.directory.file("release"), received: received, collector: collector)
        _ = try await daemon.launch(ProcessSpec(
            id: "holder", argv: ["python3", script, holder.release], stdin: daemon.spec("holder-in"), stdout: daemon.spec("holder-out")))
        try await eventually("the holder ready") { holder.said("ready\n") }
        try await input.send(bytes("first\n"))
        try await eventually("the holder to hold its stdin's lock") { holder.said("holding\n") }
        return holder
    }

    func said(_ text: String) -> Bool { String(decoding: received.withLockedValue { $0 }, as: UTF8.self).contains(text) }

    /// Everything it wrote, once its output stream ended.
    func output() async -> [UInt8] {
        await collector.value
        return received.withLockedValue { $0 }
    }
}

extension ContainmentTests {
    static var hasPython: Bool { access("/usr/bin/python3", X_OK) == 0 }

    /// The supervisor runs, and no role was restarted since `before` (same pids).
    static func expectRolesUnchanged(_ daemon: DaemonFixture, since before: [String: (pid: pid_t?, restarts: Int)]) async throws {
        #expect(kill(daemon.daemonPID, 0) == 0, "the supervisor runs")
        let after = try await roles(daemon)
        for (name, role) in before {
            #expect(after[name]?.pid == role.pid && after[name]?.restarts == role.restarts, "the \(name) was not restarted")
        }
    }

    /// What the host does while the container holds its stdin's lock.
    enum HostWhileHeld: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// Types more: the broker's write of it waits for the lock.
        case typesMore
        /// Ends the stdin: the broker closes its end, and the supervisor the copy it keeps —
        /// the last close of that end, which takes the pipe's lock to let the pipe go.
        case endsInput

        var testDescription: String { rawValue }
    }

    /// The broker's one I/O thread would wait in that write, and every stream with it; the
    /// supervisor's thread would wait in that close, and every exit report with it. Each
    /// process's watchdog hands the loop to a new thread: a bystander started while the lock is
    /// held streams every line and its exit is reported; the log names the process and stream;
    /// when the holder lets go, its stdin arrives whole.
    @Test(
        .enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (a kernel-mode userfaultfd fault) and python3"),
        arguments: HostWhileHeld.allCases)
    func aContainerHoldingItsPipesLockStopsOnlyItsOwnStream(host: HostWhileHeld) async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let before = try await Self.roles(daemon)
        let holder = try await StdinHolder.start(in: daemon)
        let (input, release) = (holder.input, holder.release)
        let finishing: Task<UInt64, Never>
        switch host {
        case .typesMore:
            try await input.send(bytes("second\n"))
            try await eventually("the broker's watchdog to take over") { daemon.log.contains("I/O thread stuck in the kernel") }
            finishing = Task { await input.finish() }
        case .endsInput:
            finishing = Task { await input.finish() }
            // The last close of the stdin's write end waits for the lock: the supervisor's (its
            // kept copy) or the broker's, whichever closes second.
            try await eventually("a watchdog to take over") { daemon.log.contains("I/O thread stuck in the kernel") }
        }

        let bystander = try await Self.startBystander(daemon)
        let lines = try await withTimeout("the bystander's lines while the lock is held", .seconds(60)) { await bystander.value }
        #expect(lines == expectedLines(400, prefix: "by"), "every line, once, in order")
        let exit = try await withTimeout("the bystander's exit while the lock is held", .seconds(60)) { try await daemon.wait("bystander") }
        #expect(exit.exitCode == 0 && exit.undelivered == 0)
        #expect(access(release, F_OK) != 0, "all of it while the holder still held the lock")
        if host == .typesMore {
            let warning = try #require(daemon.log.split(separator: "\n").first { $0.contains("I/O thread stuck in the kernel") })
            // The broker's metrics count the takeover, and the thread still stuck.
            let metrics = parsePrometheus(
                try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))
            #expect(warning.contains("process=holder") && warning.contains("stream=stdin"), "the broker's log names the process and stream")
            #expect(metrics["holdfast_broker_reactor_stalls_total"] == 1 && metrics["holdfast_broker_reactor_stranded_threads"] == 1, "\(metrics.filter { $0.key.contains("reactor") })")
        }

        try writeFile(release, [])
        #expect(await finishing.value == 0)
        let report = try await daemon.wait("holder")
        #expect(report.exitCode == 0)
        let echoed = host == .typesMore ? "first\nsecond\n" : "first\n"
        #expect(await holder.output() == bytes("ready\nholding\necho:" + echoed), "the holder's stdin, whole")
        try await Self.expectRolesUnchanged(daemon, since: before)
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// A terminal's process that holds its terminal's size lock inside the kernel: TIOCGWINSZ
/// copies the size out holding it, here into a page that never arrives; the broker's resize of
/// that terminal (TIOCSWINSZ on the master) waits for the same lock. Released by a file
/// appearing (or after 60 s), it prints each size it sees for 20 s.
private let sizeLockHolder = userfaultfdPage + #"""
import termios
asker = threading.Thread(target=lambda: libc.ioctl(1, termios.TIOCGWINSZ, ctypes.c_void_p(address)))
asker.start()
os.read(uffd, 32)  # the fault: the asker is in the kernel, holding the terminal's size lock
os.write(1, b"holding\n")
wait_for_release()
asker.join()
# Every size it sees for 20 s: the broker applies the resizes it kept, newest last.
seen = None
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    size = struct.unpack("HHHH", fcntl.ioctl(1, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    if size != seen:
        os.write(1, b"size %d %d\n" % size)
        seen = size
    time.sleep(0.02)
"""#

extension ContainmentTests {
    /// The broker serves its control requests one at a time: a resize waiting for that lock
    /// would hold every later one (adopting a new process's streams among them). The resize
    /// waits on the reactor's thread, whose watchdog takes over; the request is answered within
    /// a bound, a bystander is adopted and streams meanwhile, and the size reaches the holder
    /// when it lets go.
    @Test(.enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (a kernel-mode userfaultfd fault) and python3"))
    func aTerminalHoldingItsSizeLockStopsOnlyItsOwnResize() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let script = daemon.directory.file("hold-size.py")
        let release = daemon.directory.file("release")
        try writeFile(script, Array(sizeLockHolder.utf8))
        let before = try await Self.roles(daemon)
        let output = Accumulator(try daemon.streams.open(token: bytes("t-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "t", argv: ["python3", script, release], tty: true, rows: 24, columns: 80, stdout: daemon.spec("t-out")))
        try await eventually("the holder to hold its terminal's size lock") { output.text.contains("holding") }

        // Three resizes while held (a window being dragged): each answered within a bound,
        // the last size kept for when the holder lets go, one thread held for all three.
        for (rows, columns) in [(50, 132), (40, 100), (30, 90)] as [(UInt16, UInt16)] {
            let resized = Task { () -> HoldfastError? in
                do throws(HoldfastError) {
                    try await daemon.bridge.resize("t", rows: rows, columns: columns)
                    return nil
                } catch {
                    return error
                }
            }
            let answer = try await withTimeout("a resize's answer while the lock is held", .seconds(60)) { await resized.value }
            #expect(answer?.code == .resizeFailed && answer?.message.contains("applied when it lets go") == true, "\(String(describing: answer))")
        }
        // The watchdog's line reaches the file through the log's writer thread: waited for
        // before the lines are counted.
        try await daemon.waitForLog("I/O thread stuck in the kernel")
        let warnings = daemon.log.split(separator: "\n").filter { $0.contains("I/O thread stuck in the kernel") }
        #expect(warnings.count == 1, "one thread held for three resizes: \(warnings)")
        #expect(warnings.first?.contains("process=t ") == true && warnings.first?.contains("stream=tty") == true)
        let bystander = try await Self.startBystander(daemon)
        let lines = try await withTimeout("the bystander's lines while the lock is held", .seconds(60)) { await bystander.value }
        #expect(lines == expectedLines(400, prefix: "by"), "every line, once, in order")
        #expect(access(release, F_OK) != 0, "all of it while the holder still held the lock")

        try writeFile(release, [])
        try await eventually("the last size at the holder") { output.text.contains("size 30 90") }
        try await Self.expectRolesUnchanged(daemon, since: before)
        #expect(try await daemon.stop() == .exited(0))
    }
}

extension ContainmentTests {
    /// The kernel's limit, and what follows it: a broker SIGKILLed while a thread of it waits for
    /// a held pipe lock cannot finish dying (that wait is not interruptible), so it is replaced
    /// only when the holder lets go — and then the holder's stdin still arrives as it was sent
    /// (at most the bytes the log names as uncertain twice, as after any crash inside a write).
    @Test(.enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (a kernel-mode userfaultfd fault) and python3"))
    func aBrokerKilledWhileAThreadWaitsForAHeldLockIsReplacedWhenTheHolderLetsGo() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let holder = try await StdinHolder.start(in: daemon)
        let (input, release) = (holder.input, holder.release)
        try await input.send(bytes("second\n"))
        try await eventually("the broker's watchdog to take over") { daemon.log.contains("I/O thread stuck in the kernel") }

        let broker = try #require(try await daemon.rolePID("broker"))

        let killedBroker = ProcessIdentity(broker)
        kill(broker, SIGKILL)
        try await Task.sleep(for: .seconds(2))
        #expect(access("/proc/\(broker)/task", F_OK) == 0, "the killed broker is still there, a thread in the kernel's wait")
        // `status` answers all the same, and says why the broker does not.
        let status = try await withTimeout("status while the broker cannot finish dying", .seconds(30)) { try await daemon.status() }
        let role = try #require(status.roles.first { $0.name == "broker" })
        print("the broker's role while it cannot finish dying: \(role)")
        #expect(role.pid == broker, "not replaced yet")
        #expect(role.notAnswering?.hasPrefix("dying, a thread still in the kernel (waiting in ") == true)

        try writeFile(release, [])
        try await eventually("a new broker", timeout: .seconds(30)) { try await daemon.roleIsAnother("broker", than: killedBroker) }
        let newBroker = try #require(try await daemon.rolePID("broker"))
        try await input.send(bytes("third\n"))
        #expect(await input.finish() == 0)
        let report = try await daemon.wait("holder")
        #expect(report.exitCode == 0 && report.undelivered == 0, "\(report)")
        let all = await holder.output()
        let prefix = bytes("ready\nholding\necho:")
        #expect(Array(all.prefix(prefix.count)) == prefix)
        let echoed = Array(all.dropFirst(prefix.count))
        // The new broker's take-over lines are in the file once its line for the holder's
        // streams, logged after them through the same writer thread, is.
        try await daemon.waitForLog("resumed streams the previous broker held pid=\(newBroker) process=holder ")
        let repeats = inputRepeats(in: daemon.log, process: "holder")
        print("the holder's stdin after the broker's death: \(String(decoding: echoed, as: UTF8.self).debugDescription), repeats named in the log: \(repeats)")
        #expect(matches(echoed, sent: bytes("first\nsecond\nthird\n"), repeats: repeats), "the stdin as sent")
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// A container that holds its own stdout pipe's lock inside the kernel from its start: it
/// writes stdout from a page that never arrives, then says so (its pid) in the file argv[2].
private let outputLockHolder = userfaultfdPage + #"""
writer = threading.Thread(target=lambda: os.writev(1, [page]), daemon=True)
writer.start()
os.read(uffd, 32)  # the fault: the writer is in the kernel, holding the stdout pipe's lock
with open(sys.argv[2] + ".tmp", "w") as said:
    said.write(str(os.getpid()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
wait_for_release()
writer.join()
"""#

extension ContainmentTests {
    /// A create whose adopt the broker refuses (out of room: here a debug-build failpoint
    /// holds the adopt until the process holds its stdout pipe's lock, then refuses it). The
    /// supervisor closed the process's pipes first — on a thread of its cooperative pool, and
    /// the last close of a pipe takes its lock, held by the process for as long as it likes — and
    /// only then killed it: the close waited for ever, the create was never answered, and two
    /// such creates would stop every task of the supervisor. The process is killed first now,
    /// and the pipes closed on the reactor's loop.
    @Test(
        .enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (a kernel-mode userfaultfd fault) and python3"),
        .enabled(if: Failpoint.compiledIn, "the broker refuses at a failpoint, which only debug builds have"))
    func aRefusedCreateWhoseProcessHoldsItsPipesLockIsKilledBeforeItsPipesClose() async throws {
        let gate = try FailpointGate()
        defer { gate.remove() }
        var environment = gate.environment
        environment["HOLDFAST_FAILPOINT"] = "\(Failpoint.brokerCreateRefusedLate):holder"
        let daemon = try await DaemonFixture(environment: environment)
        let release = daemon.directory.file("release")
        defer {
            try? writeFile(release, [])  // a holder left running lets go
            daemon.cleanUp()
        }
        let script = daemon.directory.file("hold-output-lock.py")
        try writeFile(script, Array(outputLockHolder.utf8))
        let holding = daemon.directory.file("holding")
        _ = try daemon.streams.open(token: bytes("holder-out"), direction: .receive)
        let create = Task { () -> HoldfastError? in
            do {
                _ = try await daemon.launch(ProcessSpec(
                    id: "holder", argv: ["python3", script, release, holding], stdout: daemon.spec("holder-out")))
                return nil
            } catch let error as HoldfastError {
                return error
            } catch {
                return HoldfastError(.unknown, "\(error)")
            }
        }
        try await eventually("the holder to hold its stdout's lock", timeout: .seconds(20)) { access(holding, F_OK) == 0 }
        let pid = try #require(pid_t(String(decoding: readFile(holding) ?? [], as: UTF8.self)))
        try gate.open()
        let failure = try await withDeadline("the refused create's answer", .seconds(20)) { await create.value }
        #expect(failure?.code == .stdioFailed, "\(String(describing: failure))")
        #expect(kill(pid, 0) != 0, "the holder was killed (and reaped)")
        _ = try await withTimeout("status", .seconds(10)) { try await daemon.status() }
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// `pipeLockHolder`'s hold, made by an orphan: the process forks and exits (once argv[3]
/// appears) while its child holds the stdin pipe's lock with the host's next bytes waiting on
/// it. argv[1] releases the child, argv[2] is created once it holds the lock.
private let orphanedPipeLockHolder = #"""
import os, sys, time
if os.fork() != 0:
    os.write(1, b"parent\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)

"""# + userfaultfdPage + stdinLockBody

extension ContainmentTests {
    /// The process exits while an orphan of it holds its stdin pipe's lock, and the broker's
    /// write of the host's next bytes waits for that lock. The exit is reported without waiting
    /// for the write (the drain waited for it without a bound: no exit until the orphan let go),
    /// the log says why, and once the orphan lets go what it read arrives whole through the
    /// output it holds open.
    @Test(.enabled(if: DaemonFixture.canRun && Self.hasPython, "needs root (a kernel-mode userfaultfd fault) and python3"))
    func anExitIsReportedWhileAnOrphanHoldsTheStdinPipesLock() async throws {
        let daemon = try await DaemonFixture(drainTimeout: "2s")
        defer { daemon.cleanUp() }
        let before = try await Self.roles(daemon)
        let script = daemon.directory.file("orphan-lock.py")
        try writeFile(script, Array(orphanedPipeLockHolder.utf8))
        let (release, held, exitNow) = (daemon.directory.file("release"), daemon.directory.file("held"), daemon.directory.file("exit-now"))
        let input = try daemon.streams.open(token: bytes("orphan-in"), direction: .send)
        let received = NIOLockedValueBox<[UInt8]>([])
        let output = try daemon.streams.open(token: bytes("orphan-out"), direction: .receive)
        let collector = Task { for await chunk in output.chunks() { received.withLockedValue { $0 += chunk } } }
        let errors = collect(try daemon.streams.open(token: bytes("orphan-err"), direction: .receive))
        func said(_ text: String) -> Bool { String(decoding: received.withLockedValue { $0 }, as: UTF8.self).contains(text) }
        _ = try await daemon.launch(ProcessSpec(
            id: "parent", argv: ["python3", script, release, held, exitNow], stdin: daemon.spec("orphan-in"), stdout: daemon.spec("orphan-out"),
            stderr: daemon.spec("orphan-err")))
        do {
            try await eventually("the orphan ready") { said("ready\n") }
        } catch {
            try writeFile(exitNow, [])
            try writeFile(release, [])
            Issue.record("its output: \(String(decoding: received.withLockedValue { $0 }, as: UTF8.self)); its stderr: \(String(decoding: await errors.value, as: UTF8.self))")
            throw error
        }
        try await input.send(bytes("first\n"))
        try await eventually("the orphan to hold the stdin's lock") { access(held, F_OK) == 0 }
        try await input.send(bytes("second\n"))
        try await eventually("the broker's write to wait for the lock") { daemon.log.contains("I/O thread stuck in the kernel") }
        try writeFile(exitNow, [])
        let exit = try await withTimeout("the exit while the orphan holds the lock", .seconds(40)) { try await daemon.wait("parent") }
        #expect(exit.exitCode == 0)
        #expect(access(release, F_OK) != 0, "reported while the orphan still held the lock")
        try await daemon.waitForLog("its exit is reported without waiting")
        try writeFile(release, [])
        try await eventually("the orphan's echo", timeout: .seconds(30)) { said("echo:first\nsecond\n") }
        collector.cancel()
        try await Self.expectRolesUnchanged(daemon, since: before)
        #expect(try await daemon.stop() == .exited(0))
    }
}
