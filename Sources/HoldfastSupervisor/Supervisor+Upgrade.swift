import HoldfastConfig
import HoldfastCore
import HoldfastLogging
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

/// What a live upgrade handed this image: the state the previous binary wrote, and its process
/// table read back (DaemonCommand reads both before the supervisor exists).
public struct Resumption: Sendable {
    let state: UpgradeState
    let table: ProcessTable
    /// The state as the previous image wrote it: what a fallback hands it back, unchanged;
    /// dropped once this image took over (it can run to megabytes).
    let written: NIOLockedValueBox<[UInt8]?>
    /// Set when this image is that previous image again: the upgrade it asked for fell back,
    /// for this reason (`fallBack`).
    public internal(set) var fellBack: String?

    /// Reads the state the previous image left in the memfd `fd` (and closes it).
    public static func read(_ fd: Int32) throws(HoldfastError) -> Resumption {
        defer { close(fd) }
        let bytes: [UInt8]
        do {
            bytes = try ProcessImage.readAll(fd)
        } catch {
            throw HoldfastError(.incompatibleState, "cannot read the upgrade state from fd \(fd): \(error)")
        }
        let (state, table) = try UpgradeState.decode(bytes)
        return Resumption(state: state, table: table, written: NIOLockedValueBox(bytes), fellBack: nil)
    }

    /// Reads why the upgrade fell back (`--upgrade-fell-back FD`, a memfd: closed here).
    public mutating func readFallBackReason(_ fd: Int32) {
        defer { close(fd) }
        let text = (try? ProcessImage.readAll(fd, limit: 1 << 16)).map { String(decoding: $0, as: UTF8.self) }
        fellBack = text.flatMap { $0.isEmpty ? nil : $0 } ?? "the new binary could not take over (it did not say why)"
    }

    /// This image cannot take over (`reason`) and nothing of it serves yet: the previous image,
    /// open as `previousImage`, is executed again on the state it wrote, told why. Returns only
    /// if that cannot be done (no previous image, an exec that failed), with what to log; the
    /// caller then exits, which ends every container as it always did.
    func fallBack(reason: String, logger: Logger) -> String {
        // The previous image, itself failing to take over again, would execute itself for ever.
        guard fellBack == nil else { return "this is the previous binary already, fallen back to" }
        guard let previous = state.previousImage, fcntl(previous, F_GETFD) >= 0, let written = written.withLockedValue({ $0 }) else {
            return "no way back to the previous binary (its state names none: an older binary wrote it)"
        }
        logger.critical("live upgrade: this binary cannot take over; the previous one takes over again", metadata: [
            "reason": "\(reason)", "previous": "\(state.writtenBy)",
        ])
        DaemonLogHandler.flush(withinMilliseconds: 500)
        let stateFD: Int32
        let reasonFD: Int32
        do {
            stateFD = try ProcessImage.memoryFile("holdfast-upgrade", written)
            reasonFD = try ProcessImage.memoryFile("holdfast-upgrade-fell-back", Array(reason.utf8))
        } catch {
            return "cannot hand the state back: \(error)"
        }
        let arguments = [
            state.executable, "daemon", "--config", state.configPath, "--resume-from", String(stateFD), "--upgrade-fell-back", String(reasonFD),
        ]
        let error = ProcessImage.replace(
            executable: previous, arguments: arguments, keep: state.keptDescriptors + [stateFD, reasonFD],
            blocked: Supervisor.signalsBlockedAcrossExec)
        close(stateFD)
        close(reasonFD)
        return "cannot execute the previous binary again: \(error)"
    }

    /// What `--check-resume-snapshot FD` prints: this binary reads that state (or throws why not).
    public static func check(_ fd: Int32, configuration: DaemonConfiguration, logger: Logger) throws(HoldfastError) -> String {
        let resumption = try read(fd)
        // The uid the new image starts its broker as, changed by the configuration file or not:
        // another process that took it since the running broker started (a `--pid=host`
        // container's root with `setpriv --reuid`, an operator's `sudo -u holdfast`) would have
        // every start of the new broker refused once the old one quiesced — every stream
        // stopped. Checked here, before anything stops, without the running broker itself (its
        // pid in the state; only while the uid is unchanged: a changed one is not its). Before,
        // only a changed uid was checked. A state without the broker's pid (an older binary's)
        // is checked as before: only a changed uid, the running broker otherwise counting.
        let uid = Supervisor.brokerUID(of: configuration)
        let runningUID = resumption.state.configuration.map(Supervisor.brokerUID(of:))
        let runningBroker: Set<pid_t>? =
            runningUID == uid ? resumption.state.brokerPID.map { [$0] } : (runningUID == nil ? nil : [])
        if let runningBroker {
            do {
                try Supervisor.checkBrokerUIDIsItsOwn(configuration, notCounting: runningBroker, logger: logger)
            } catch {
                throw HoldfastError(.incompatibleState, error.description)
            }
        }
        // What the image needs before anything else: an I/O reactor (an epoll fd, an eventfd,
        // a watch). Where the kernel refuses one — every epoll watch of root's uid taken, which a
        // root container without a user namespace can do, as root's processes share the quota —
        // the new image would die at its start, and so would the previous one taken back;
        // refused here, the daemon runs on as it is.
        do {
            if Failpoint.fails(Failpoint.upgradeCheckReactorFails, process: "check", passes: Failpoint.everyPass) {
                throw SystemError("epoll_ctl(ADD, eventfd)", errno: .init(rawValue: ENOSPC))
            }
            _ = try Reactor()
        } catch {
            throw HoldfastError(.incompatibleState, "this binary cannot start its I/O reactor here: \(error)")
        }
        if Failpoint.fails(Failpoint.upgradeCheckSlow, process: "check", passes: Failpoint.everyPass) {
            usleep(UInt32(Failpoint.slowCheck.components.seconds * 1_000_000))
        }
        return "holdfast \(HoldfastVersion.string) reads the upgrade state of holdfast \(resumption.state.writtenBy) (version \(resumption.state.version), \(resumption.state.table.processes.count) processes)"
    }

    /// The fds of the way back prepared for a crash (`armFallBackOnCrash`): the state and the
    /// reason memfds.
    let armed = NIOLockedValueBox<[Int32]>([])

    /// Until this image takes over, a fatal signal (a crash in its start: SIGSEGV, SIGILL from a
    /// Swift trap, SIGABRT, ...) executes the previous image on its state too, as `fallBack`
    /// does for an error: everything the signal handler needs (a memfd with the state, one for
    /// the reason, the arguments, the fds to keep) is made now, the handler itself only calls
    /// what is safe in one. False if there is no way back to arm.
    @discardableResult
    func armFallBackOnCrash(logger: Logger) -> Bool {
        guard fellBack == nil, let previous = state.previousImage, fcntl(previous, F_GETFD) >= 0, let written = written.withLockedValue({ $0 }) else { return false }
        let stateFD: Int32
        let reasonFD: Int32
        do {
            stateFD = try ProcessImage.memoryFile("holdfast-upgrade", written)
            reasonFD = try ProcessImage.memoryFile("holdfast-upgrade-fell-back", [])
        } catch {
            logger.warning("live upgrade: no way back if this image crashes before it serves", metadata: ["error": "\(error)"])
            return false
        }
        armed.withLockedValue { $0 = [stateFD, reasonFD] }
        let arguments = [
            state.executable, "daemon", "--config", state.configPath, "--resume-from", String(stateFD), "--upgrade-fell-back", String(reasonFD),
        ]
        do {
            try ProcessImage.replaceOnCrash(
                executable: previous, arguments: arguments, keep: state.keptDescriptors + [stateFD, reasonFD], reasonFD: reasonFD,
                blocked: Supervisor.signalsBlockedAcrossExec)
        } catch {
            logger.warning("live upgrade: no way back if this image crashes before it serves", metadata: ["error": "\(error)"])
            return false
        }
        return true
    }

    /// This image took over: there is no way back any more (the crash handlers put back, the
    /// previous image's fd and the memfds closed, the state's bytes let go).
    func tookOver() {
        ProcessImage.keepCrashesFatal()
        for fd in armed.withLockedValue({ $0 }) { close(fd) }
        armed.withLockedValue { $0 = [] }
        written.withLockedValue { $0 = nil }
        if let previous = state.previousImage { close(previous) }
    }

    /// Every fd the previous image passed: what must stay open here.
    public var keptDescriptors: [Int32] { state.keptDescriptors }
}

/// Creates and signals pass here. A live upgrade closes it: what arrives then waits (and, once
/// the image is replaced, is never answered by this one: a host repeats its create on the next
/// bridge connection, a control client on its next connection), and the upgrade waits until
/// what was already under way has finished.
final class UpgradeGate: Sendable {
    private struct State: Sendable {
        var closed = false
        var inFlight = 0
        var waiting: [CheckedContinuation<Void, Never>] = []
    }

    private let state = NIOLockedValueBox(State())
    private let changes = ChangeSignal()

    func enter() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let open = state.withLockedValue { s -> Bool in
                guard s.closed else {
                    s.inFlight += 1
                    return true
                }
                s.waiting.append(continuation)
                return false
            }
            if open { continuation.resume() }
        }
    }

    func leave() {
        state.withLockedValue { $0.inFlight -= 1 }
        changes.notify()
    }

    /// Closes the gate and waits until nothing is under way (false: still busy at `deadline`).
    func close(until deadline: ContinuousClock.Instant) async -> Bool {
        state.withLockedValue { $0.closed = true }
        while true {
            let generation = changes.generation
            if state.withLockedValue({ $0.inFlight == 0 }) { return true }
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return false }
            await changes.wait(since: generation, timeout: left)
        }
    }

    func open() {
        let waiting = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.closed = false
            s.inFlight += s.waiting.count
            defer { s.waiting = [] }
            return s.waiting
        }
        for waiter in waiting { waiter.resume() }
    }
}

/// Live upgrade (docs/ARCHITECTURE.md, "Live upgrade"): the supervisor re-executes the binary
/// now at its path, keeping its pid, its children and every fd it holds.
extension Supervisor {
    /// Held pending across the exec, for the new image's handlers (their default action would
    /// end the daemon in between). Not SIGCHLD: its default is to do nothing, and the new image
    /// reaps every child that exited meanwhile as it starts.
    public static let signalsBlockedAcrossExec = Supervisor.handledSignals.filter { $0 != SIGCHLD }
    /// How long the new binary's check may take, and what is under way may take to finish.
    static let probeLimit = Duration.seconds(10)
    static let settleLimit = Duration.seconds(15)
    /// How long the upgrade waits for a process to let go of a pipe lock a broker thread waits
    /// for, and for the broker to finish exiting once asked.
    static let heldLockLimit = Duration.seconds(10)
    static let brokerStopLimit = Duration.seconds(15)

    /// Waits until the broker has no reactor thread stuck in the kernel (its stats), or
    /// `deadline`; returns how many are still stuck (nil: no broker, or it did not answer).
    func brokerThreadsWaitingForHeldLocks(until deadline: ContinuousClock.Instant) async -> Int? {
        var said = false
        let started = ContinuousClock.now
        while true {
            guard let broker = broker() else { return nil }
            guard let answer = await ask(broker, .stats, reply: BrokerStats.self), let stats = answer else { return nil }
            let stranded = stats.strandedReactorThreads ?? 0
            if stranded == 0, said {
                logger.info("live upgrade: the broker's stuck threads came back", metadata: ["waited": "\(ContinuousClock.now - started)"])
            }
            if stranded == 0 || ContinuousClock.now >= deadline { return stranded }
            if !said {
                // What an upgrade that takes seconds is waiting for, said while it waits.
                said = true
                logger.notice("live upgrade: waiting for broker threads stuck in the kernel on a pipe lock a container process holds", metadata: [
                    "threads": "\(stranded)", "upTo": "\(Self.describe(Self.heldLockLimit))",
                ])
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
    }

    /// The signals that ask the daemon to stop.
    static let stopSignals = [SIGTERM, SIGINT, SIGQUIT]
    /// How long an upgrade waits for the signal loop to handle what came before it held the stops.
    static let signalLoopLimit = Duration.seconds(5)

    /// What `holdStops` holds: the stops, and SIGHUP — a reload asked for once the state is
    /// being written down reaches the image that runs next, which reloads again (the binary it
    /// runs was checked before the ask).
    static let signalsHeldForTheExec = stopSignals + [SIGHUP]

    /// Holds the stop signals (and SIGHUP) pending on the spawn thread (the main thread, which
    /// executes the new image): one that comes now stays pending, across the exec too, until an
    /// image unblocks it — the new one once it has taken over, or this one if the upgrade fails.
    func holdStops() {
        SpawnThread.perform { SignalPipe.holdOnThisThread(Self.signalsHeldForTheExec) }
    }

    func letStopsThrough() {
        SpawnThread.perform { SignalPipe.letThrough(Self.signalsHeldForTheExec) }
    }

    /// Waits until the signal loop has handled every signal the handler recorded so far (a stop
    /// among them has set `shuttingDown` by then), or `deadline` (false).
    func waitForTheSignalLoop(until deadline: ContinuousClock.Instant) async -> Bool {
        let delivered = SignalPipe.recordsWritten
        while signalsHandled.withLockedValue({ $0 }) < delivered {
            guard ContinuousClock.now < deadline else { return false }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
    }

    /// `holdfast upgrade`. Returns only if the upgrade did not happen (it throws why, and
    /// everything runs on as before); on success this image is gone and the connection that
    /// asked closes: the client finds the new image through the control socket.
    func upgrade() async throws(HoldfastError) {
        guard !session.withLockedValue({ $0.shuttingDown }) else { throw HoldfastError(.shuttingDown, "the daemon is shutting down") }
        guard session.withLockedValue({ s in defer { s.upgrading = true }; return !s.upgrading }) else {
            throw HoldfastError(.upgradeFailed, "another upgrade is under way")
        }
        var undo: [() -> Void] = [{ [self] in
            let follows = session.withLockedValue { session in
                defer { (session.upgrading, session.reloadFollows) = (false, false) }
                return session.reloadFollows
            }
            serveParkedControlClients()
            if follows { reloadOnHangup() }
        }]
        func fail(_ message: String, _ code: HoldfastError.Code = .upgradeFailed) -> HoldfastError {
            for step in undo.reversed() { step() }
            logger.error("live upgrade failed: the daemon goes on as it was", metadata: ["reason": "\(message)"])
            return HoldfastError(code, message)
        }
        // A stop that began meanwhile wins: this image carries it out (asked at each step
        // before one that would disturb it).
        func giveWayToAStop() throws(HoldfastError) {
            guard !session.withLockedValue({ $0.shuttingDown }) else { throw fail("the daemon began to stop", .shuttingDown) }
        }
        guard let path = selfPath, let configPath else { throw fail("the daemon does not know its executable's path or its configuration file") }
        let started = ContinuousClock.now
        logger.info("live upgrade: checking the new binary", metadata: ["executable": "\(path)"])

        // 1. The new binary: the file we exec is the file we check (held open, exec'd by fd).
        let executable = open(path, O_RDONLY | O_CLOEXEC)
        guard executable >= 0 else { throw fail("cannot open the new binary \(path): \(String(cString: strerror(errno))) (errno \(errno))") }
        undo.append { close(executable) }
        var info = stat()
        guard fstat(executable, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else { throw fail("\(path) is not a regular file") }
        guard info.st_mode & 0o111 != 0 else { throw fail("\(path) is not executable (mode \(String(info.st_mode & 0o7777, radix: 8)))") }
        // It will run as root with every container's stdio: only root (or our own user) may
        // have been able to write it.
        guard info.st_uid == 0 || info.st_uid == geteuid(), info.st_mode & 0o022 == 0 else {
            throw fail(
                "\(path) could have been written by another user (owner uid \(info.st_uid), mode \(String(info.st_mode & 0o7777, radix: 8))): not running it as the daemon")
        }
        let probed: String
        do throws(HoldfastError) {
            probed = try await probe(executable, path: path, configPath: configPath)
        } catch {
            throw fail(error.message)
        }
        logger.info("live upgrade: the new binary reads our state", metadata: ["check": "\(probed)"])
        // A stop that began during the check wins before anything of it is disturbed: stopping
        // the roles now would take the bridge (the exits' way to the host) and the broker (the
        // drains) from under it until the upgrade noticed and started them again.
        try giveWayToAStop()

        // A broker restarted after a crash is reachable only once it has every stream back
        // (creates wait for the same): asked to quiesce before that, it never heard it and was
        // SIGKILLed 5 s later (a soak upgrade 83 ms after a broker kill took 5.2 s).
        let reaching = ContinuousClock.now
        _ = await brokerClient.wait(timeout: Self.brokerWait)
        let reached = ContinuousClock.now
        // A broker an operator stopped (SIGSTOP, Ctrl-Z) would answer neither the checks below
        // nor the quiesce: it is about to be replaced, so it is continued (else it was killed
        // after 5 s and its successor resumed as after a crash).
        if session.withLockedValue({ $0.broker })?.continueIfStopped() == true {
            logger.notice("live upgrade: the broker was stopped (SIGSTOP, or a debugger): continued, to quiesce")
        }

        // A broker thread waiting in the kernel for a lock a container process holds (README,
        // "Security") would keep a stopped broker from finishing its exit until that process
        // lets go: the upgrade would wait as long as the process pleases. It waits a while,
        // and otherwise does not happen, the broker serving on.
        if let stranded = await brokerThreadsWaitingForHeldLocks(until: ContinuousClock.now + Self.heldLockLimit), stranded > 0 {
            throw fail(
                "\(stranded) thread\(stranded == 1 ? "" : "s") of the broker still wait\(stranded == 1 ? "s" : "") in the kernel, after \(Self.describe(Self.heldLockLimit)), for a pipe lock a container process holds (the broker's log names it: \"I/O thread stuck in the kernel\"); a broker stopped now could not finish exiting until it lets go. Retry once it does, or end that process")
        }

        // 2. What is under way finishes; what arrives now waits.
        let settling = ContinuousClock.now
        // Before the gate: reaching the broker (one restarted after a crash answers once it has
        // every stream back) and asking it about stuck threads — where a slow upgrade's time
        // went before the roles stop, when not in the settling (soaks saw upgrades of 1–4 s).
        let beforeGate: Logger.Metadata = [
            "brokerReachedAfter": "\(reached - reaching)", "stuckThreadsAskedIn": "\(settling - reached)",
        ]
        guard await upgradeGate.close(until: ContinuousClock.now + Self.settleLimit) else {
            upgradeGate.open()
            throw fail("creates or signals were still under way after \(Self.describe(Self.settleLimit))")
        }
        undo.append { [self] in upgradeGate.open() }
        try giveWayToAStop()
        // Each step that can take a while is in the log (a slow upgrade explains itself).
        logger.info("live upgrade: creates and signals under way finished; stopping the roles", metadata: beforeGate.merging([
            "waited": "\(ContinuousClock.now - settling)", "sinceStart": "\(ContinuousClock.now - started)",
        ]) { $1 })

        // 3. The roles: the bridge worker ends (the host sees the bridge drop, and repeats what
        // it had in flight on the next connection); the broker quiesces and exits: every stream
        // settled in its checkpoint, nothing in a take.
        let (brokerRole, bridgeRole) = session.withLockedValue { ($0.broker, $0.bridgeWorker) }
        let bridgePID = bridgeRole?.pid
        let bridgeHolding = Task { await bridgeRole?.hold(within: .seconds(5)) { incarnation in bridgeRole?.send(SIGTERM, to: incarnation) } }
        undo.append { bridgeRole?.release() }
        // Bounded as the broker's is below: a worker a tracer holds (strace or gdb stopped with
        // it) is a zombie only its tracer can reap, and unbounded this wait kept the gate closed
        // — every create and signal waiting — for as long as the tracer lived.
        guard let bridgeExit = await bridgeHolding.value(within: Self.brokerStopLimit) else {
            let state = bridgePID.map { ProcessRunState.of($0).explanation } ?? "unknown"
            throw fail("the bridge worker did not finish stopping within \(Self.describe(Self.brokerStopLimit)): \(state); it is replaced once it is gone")
        }
        let client = broker()
        let brokerPID = brokerRole?.pid
        let holding = Task {
            await brokerRole?.hold(within: .seconds(5)) { incarnation in
                // Continued again as it is asked: a stop since the check above (the soak's broker
                // stops overlap upgrades) would otherwise hold the quiesce until it ends.
                brokerRole?.send(SIGCONT, to: incarnation)
                Task { _ = try? await client?.call(BrokerRequest.quiesce, reply: [String: String].self) }
            }
        }
        undo.append { brokerRole?.release() }
        // SIGKILL comes after 5 s, but a process cannot finish exiting while a thread of it
        // waits in the kernel (a lock taken after the check above): bounded, then no upgrade;
        // the role starts a new broker once that one is gone, as after a crash.
        guard let brokerExit = await holding.value(within: Self.brokerStopLimit) else {
            let state = brokerPID.map { ProcessRunState.of($0).explanation } ?? "unknown"
            throw fail("the broker did not finish stopping within \(Self.describe(Self.brokerStopLimit)): \(state); it is replaced once it is gone")
        }
        if let brokerExit, brokerExit != .exited(0) {
            // Not settled (a stream in a take past the limit, or it had to be killed): its
            // successor resumes as after a crash, and reports what that cost.
            logger.warning("live upgrade: the broker did not quiesce cleanly", metadata: ["status": "\(brokerExit)"])
        }

        // A stop asked for from here on is carried out by whichever image runs next: held
        // pending, it crosses the exec to the new image (or comes back to this one if the
        // upgrade fails). One this image's signal loop took after the check below would have
        // begun its stop here (every container signalled) and been forgotten by the new image,
        // which ran on: the operator's `systemctl stop` lost, and systemd's SIGKILL after
        // `TimeoutStopSec` ending every container with no drain.
        holdStops()
        undo.append { [self] in letStopsThrough() }
        guard await waitForTheSignalLoop(until: ContinuousClock.now + Self.signalLoopLimit) else {
            throw fail("the daemon's signal loop did not read its signals within \(Self.describe(Self.signalLoopLimit)): a stop among them could be lost")
        }
        try giveWayToAStop()

        // 4. The state, written down with nothing reaped from now on (exits wait as zombies).
        let reaped = reaper.freeze()
        undo.append { [self] in reaper.thaw() }
        var state = makeUpgradeState(path: path, configPath: configPath, reaped: reaped)
        // Every SIGHUP handled so far (the signal loop is caught up; later ones are held).
        if session.withLockedValue({ $0.reloadFollows }) { state.reloadFollows = true }
        // The way back, should the new image fail before it serves: this very image.
        let previousImage = open("/proc/self/exe", O_RDONLY | O_CLOEXEC)
        if previousImage >= 0 {
            state.previousImage = previousImage
            undo.append { close(previousImage) }
        } else {
            logger.warning("live upgrade: cannot open this binary to fall back to: a new image that cannot take over ends the daemon", metadata: [
                "error": "\(String(cString: strerror(errno))) (errno \(errno))",
            ])
        }
        logger.info("live upgrade: executing the new binary", metadata: [
            "executable": "\(path)", "processes": "\(state.table.processes.count)", "descriptors": "\(state.keptDescriptors.count)",
            "bridgeWorker": "\(bridgeExit.map(\.description) ?? "not running")", "broker": "\(brokerExit.map(\.description) ?? "not running")",
            "took": "\(ContinuousClock.now - started)",
        ])
        // The new image starts with an empty queue: what this one logged goes out first (a log
        // nobody reads delays the upgrade at most this long); what is left then, the new image
        // says it lost.
        DaemonLogHandler.flush(withinMilliseconds: 500)
        let unwritten = DaemonLogHandler.queue.unwritten
        state.unwrittenLogLines = unwritten > 0 ? unwritten : nil
        if Failpoint.fails(Failpoint.upgradeExecLate, process: "supervisor", passes: Failpoint.everyPass) {
            try? await Task.sleep(for: Failpoint.lateExec)
        }
        let memfd: Int32
        do {
            memfd = try ProcessImage.memoryFile("holdfast-upgrade", ControlJSON.encode(state))
        } catch {
            throw fail("cannot write the state down: \(error)")
        }
        // Once more at the last moment: a handler already past its hold check when the hold
        // began (a window of instructions) wrote its record after the signal loop was seen caught
        // up, and a stop the loop began from it since (the log flush above waits up to 500 ms)
        // would be forgotten by the new image. This image carries it out instead.
        guard await waitForTheSignalLoop(until: ContinuousClock.now + Self.signalLoopLimit) else {
            close(memfd)
            throw fail("the daemon's signal loop did not read its signals within \(Self.describe(Self.signalLoopLimit)): a stop among them could be lost")
        }
        do {
            try giveWayToAStop()
        } catch {
            close(memfd)
            throw error
        }
        let arguments = [path, "daemon", "--config", configPath, "--resume-from", String(memfd)]
        let error = ProcessImage.replace(
            executable: executable, arguments: arguments, keep: state.keptDescriptors + [memfd], blocked: Self.signalsBlockedAcrossExec)
        close(memfd)
        throw fail("cannot execute \(path): \(error)")
    }

    /// Runs the new binary on a copy of our state (`--check-resume-snapshot`): it must start,
    /// read this state's version and exit 0 within the limit. Returns what it printed.
    func probe(_ executable: Int32, path: String, configPath: String) async throws(HoldfastError) -> String {
        let copy: Int32
        do {
            copy = try ProcessImage.memoryFile("holdfast-upgrade-check", ControlJSON.encode(makeUpgradeState(path: path, configPath: configPath, reaped: [:])))
        } catch {
            throw HoldfastError(.upgradeFailed, "cannot write the state down for the new binary's check: \(error)")
        }
        defer { close(copy) }
        let output: PipeEnds
        do {
            output = try PipeEnds.make()
        } catch {
            throw HoldfastError(.upgradeFailed, "cannot make a pipe for the new binary's check: \(error)")
        }
        let environment = SpawnOptions.inheritedEnvironment().filter { entry in
            !ServiceNotify.environmentVariables.contains(String(entry.prefix { $0 != "=" }))
        }
        var options = SpawnOptions(
            executable: "/proc/self/fd/\(executable)",
            arguments: [path, "daemon", "--config", configPath, "--check-resume-snapshot", String(copy)], environment: environment)
        options.stdout = output.write
        options.stderr = output.write
        options.keepDescriptors = [copy, executable]
        options.newSession = true
        let child: ChildReaper.Child
        do {
            child = try reaper.spawn(options)
        } catch {
            close(output.read)
            close(output.write)
            // Not forked at all: nothing is wrong with the binary.
            if let failure = Launcher.forkFailure(error) {
                throw HoldfastError(.upgradeFailed, "the new binary \(path) could not be started to be checked: \(failure.message)")
            }
            let why: String
            switch error.errno {
            case ENOEXEC: why = "not a program the kernel runs (a corrupt or foreign file)"
            case EACCES: why = "permission denied"
            case ENOENT: why = "not found (or its interpreter is missing)"
            default: why = String(cString: strerror(error.errno))
            }
            throw HoldfastError(.upgradeFailed, "the new binary \(path) cannot be executed: \(why) (errno \(error.errno))")
        }
        close(output.write)
        let reading = Task { () -> [UInt8] in
            guard let reader = try? AsyncFD(adopting: output.read) else { return [] }
            defer { reader.close() }
            var bytes: [UInt8] = []
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
            defer { buffer.deallocate() }
            while bytes.count < 65536, let count = try? await reader.read(into: buffer), count > 0 {
                bytes += UnsafeRawBufferPointer(rebasing: buffer[..<count])
            }
            return bytes
        }
        let waiting = Task { [reaper] in await reaper.wait(child) }
        guard let status = await waiting.value(within: Self.probeLimit) else {
            // Through the registration: a probe that ended as its time ran out is not
            // killed by number (its pid, and its group's, may be another process's by then).
            _ = reaper.signalGroup(child, SIGKILL)
            _ = reaper.signal(child, SIGKILL)
            _ = await waiting.value
            reading.cancel()
            throw HoldfastError(.upgradeFailed, "the new binary \(path) did not finish its check within \(Self.describe(Self.probeLimit))")
        }
        let printed = await reading.value(within: .seconds(2)) ?? []
        if printed.isEmpty { reading.cancel() }
        let text = String(decoding: printed, as: UTF8.self).split(separator: "\n").map { String($0) }.filter { !$0.isEmpty }
        guard status == .exited(0) else {
            let said = text.suffix(3).joined(separator: " / ")
            throw HoldfastError(.upgradeFailed, "the new binary \(path) failed its check (\(status))\(said.isEmpty ? "" : ": \(said)")")
        }
        return text.last ?? "(it printed nothing)"
    }

    /// The state as it stands (`reaped`: exits reaped but not yet written down).
    func makeUpgradeState(path: String, configPath: String, reaped: [pid_t: HoldfastPosix.ExitStatus]) -> UpgradeState {
        let (upgrades, fellBack, lastFailure, broker, bridge) = session.withLockedValue {
            ($0.upgrades, $0.upgradesFellBack, $0.lastUpgradeFailure, $0.broker, $0.bridgeWorker)
        }
        let roles = [broker, bridge].compactMap { $0 }.map { UpgradeState.Role(name: $0.name, restarts: $0.restarts, lastExit: $0.lastExit) }
        let uptime = ContinuousClock.now - startedAt
        let kernelLog = self.kernelLog?.handover()
        return UpgradeState(
            version: UpgradeState.currentVersion, writtenBy: HoldfastVersion.string, upgrades: upgrades + 1,
            uptimeSeconds: Double(uptime.components.seconds) + Double(uptime.components.attoseconds) / 1e18, executable: path,
            configPath: configPath, ringCapacity: configuration.streams.ringCapacity, runDirectory: configuration.runDirectory,
            controlSocket: configuration.control.socket, handoffSocket: configuration.handoff.socket,
            descriptors: UpgradeState.Descriptors(
                control: controlListener.withLockedValue { $0 } ?? -1, handoff: handoffListener.withLockedValue { $0 },
                checkpoints: checkpoints?.descriptor, rings: rings?.descriptor, metrics: metricsListener.withLockedValue { $0 },
                parkedControl: parkedControl.withLockedValue { $0 }, runLock: runLockDescriptor.withLockedValue { $0 }),
            table: snapshot(), stdio: stdio.withLockedValue { $0.snapshot() },
            reaped: reaped.map { UpgradeState.Reaped(pid: $0.key, status: $0.value) }.sorted { $0.pid < $1.pid }, roles: roles,
            childOpenFileLimit: ResourceLimits.childOpenFileSoftLimit, childOOMScoreAdjustment: OOMScore.childAdjustment,
            childScheduling: .current, upgradesFellBack: fellBack > 0 ? fellBack : nil, lastUpgradeFailure: lastFailure, configuration: configuration,
            kernelLog: kernelLog, brokerPID: broker?.pid)
    }

    /// After a live upgrade: every process the previous image ran is watched again (its exit,
    /// reaped there or here, reported once); one that exited there but had not drained is told
    /// to the first broker with its streams (`readopt`). Each is registered with this image's
    /// reaper first (`adopt`), before anything is forked here: its exit and signals stay its own.
    func watchResumedProcesses() {
        for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase == .running {
            // A terminal's slave end held again (the previous image's closed with its exec):
            // `TIOCGPTPEER` on the kept first host end succeeds only for a pty master. Before any
            // broker runs here, so no EIO of the moment between was read.
            if let master = stdio.withLockedValue({ $0.firstHostEnd(of: entry.id) }), let peer = PseudoTerminal.openPeer(ofMaster: master) {
                terminalPeers.withLockedValue { $0[entry.id] = peer }
            }
            let child = reaper.adopt(entry.pid)
            if let child { forked.withLockedValue { $0[entry.id] = child } }
            Task { await watch(entry, child: child) }
        }
    }

    /// After a live upgrade: the processes the previous image had seen exit but not reported
    /// yet. A watcher records an exit in the table first and reports it after (at once, or once
    /// the broker drained the streams); a state written in between hands this image a process
    /// already `exited` that no watcher here would ever report (the 20-upgrade test lost one
    /// create's exit so, once under load). Reported here: one without streams at once; one with
    /// streams once the first broker has drained them (the store is told it exited, so the
    /// readoption tells that broker). Called once the cgroups are known, so that a process's
    /// cgroup goes with it, and before any broker or bridge worker runs.
    func reportExitsRecordedBeforeTheUpgrade() {
        let recorded = table.withLockedValue { $0.entries.filter { $0.phase == .exited } }
        for entry in recorded {
            guard let report = entry.report else { continue }
            let known = entry.streams.isEmpty ? nil : stdio.withLockedValue { $0.knowsExited(entry.id) }
            // Told already: its streams are draining, and the first broker is told again with
            // them (the usual case: nothing was missed).
            if known == true { continue }
            let drainsFirst = known == false
            if drainsFirst { stdio.withLockedValue { $0.exited(entry.id) } }
            logger.notice("process exited before the live upgrade, not reported yet: reported by this image", metadata: [
                "process": "\(entry.id)", "status": "\(report.signal.map { "killed by signal \($0)" } ?? "exit code \(report.exitCode)")",
                "after": "\(drainsFirst ? "its output drains" : "nothing")",
            ])
            if !drainsFirst { complete(entry.id, report) }
        }
    }

    /// The sha256 of the executable this image runs (/proc/self/exe), read once.
    func runningExecutableSHA256() -> String? {
        if let known = executableDigest.withLockedValue({ $0 }) { return known }
        let digest = Self.sha256(ofFile: "/proc/self/exe")
        executableDigest.withLockedValue { $0 = .some(digest) }
        return digest
    }

    static func sha256(ofFile path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var hasher = StreamingSHA256()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let count = read(fd, buffer.baseAddress, buffer.count)
            if count < 0, errno == EINTR { continue }
            guard count >= 0 else { return nil }
            if count == 0 { return hasher.hex() }
            hasher.update(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
        }
    }
}
