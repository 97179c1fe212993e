import CHoldfastShims
import HoldfastCore
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A signal as the self-pipe delivered it: its number and, when a process sent it, which one.
public struct ReceivedSignal: Sendable, Equatable {
    public var number: Int32
    /// The process that sent it (kill(2), sigqueue(3)) and its real uid; nil when the kernel did
    /// (SIGCHLD, SIGXCPU, a terminal's SIGINT...).
    public var senderPID: pid_t?
    public var senderUID: uid_t?

    public init(number: Int32, senderPID: pid_t? = nil, senderUID: uid_t? = nil) {
        self.number = number
        self.senderPID = senderPID
        self.senderUID = senderUID
    }

    /// Who sent it, for a log line: `pid 4242 (uid 0, kill)`, or `the kernel`.
    public var sender: String {
        guard let senderPID, senderPID > 0 else { return "the kernel" }
        let command = ProcessRunState.firstLine(of: "/proc/\(senderPID)/comm").map { ", \($0)" } ?? ""
        return "pid \(senderPID) (uid \(senderUID.map(String.init) ?? "?")\(command))"
    }
}

/// Signals that ask nothing of a Holdfast process, yet whose default action would end it: an
/// operator's `kill -USR1` (a dump, in other daemons), `kill -ALRM`, a `kill -s RTMIN+3` meant for
/// another program, SIGXCPU from a `LimitCPU=` in the unit. The supervisor says and ignores
/// them (its death would end every container); the roles ignore them. SIGHUP is not here: the
/// supervisor reloads on it. The signals a crash raises (SIGSEGV, SIGILL, SIGABRT, ...) are not
/// either: those must still end a process that hit a bug.
public enum StraySignals {
    public static let all: [Int32] =
        [SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGXCPU, SIGXFSZ]
        + Array(hf_sigrtmin()...hf_sigrtmax())

    /// The first realtime signal a program may use (glibc keeps the two below it, 32 and 33, for
    /// itself: a process cannot handle them, and 32 ends a Swift one by its default action).
    public static var firstRealtime: Int32 { hf_sigrtmin() }

    /// SIG_IGN for each of them and for SIGHUP, SIGINT and SIGQUIT, in a process that starts no
    /// other program (a role: an ignored signal stays ignored across an exec). A role is stopped
    /// by its supervisor's SIGTERM alone; `pkill -INT holdfast` or `killall -QUIT holdfast` ended
    /// both roles (a raw stream's bytes in flight lost), as `pkill holdfast` did before SIGTERM
    /// was taken from the parent only.
    public static func ignoreInThisRole() {
        for signal in all + [SIGHUP, SIGINT, SIGQUIT] { SignalDisposition.ignore(signal) }
    }
}

/// A role's stop signal taken from its parent, the supervisor, alone. From the supervisor (or
/// the kernel) SIGTERM ends the role at once, by its default action, as before; from any other
/// process — a container's `pkill holdfast`, which matches every holdfast process by name — it
/// is ignored, and `next` (or `sayRefusals`) gives it with its sender for the log. Before, such
/// a kill ended the broker (its successor resumed the streams, but a raw stream's bytes in
/// flight were lost) and the bridge worker. SIGKILL, which no handler sees, still ends a role:
/// the supervisor restarts it.
public final class StopFromParentOnly: Sendable {
    private let reader: AsyncFD

    public init(_ signal: Int32 = SIGTERM) throws(SystemError) {
        let ends = try PipeEnds.make()
        let flags = fcntl(ends.write, F_GETFL)
        _ = fcntl(ends.write, F_SETFL, flags | O_NONBLOCK)
        reader = try AsyncFD(adopting: ends.read)
        guard hf_signal_from_parent_only(signal, ends.write) == 0 else { throw .last("sigaction(\(signalName(signal)))") }
    }

    /// The next signal refused, with its sender.
    public func next() async -> ReceivedSignal? {
        await SignalPipe.nextRecord(from: reader)
    }

    /// Says each refusal through `say` — the signal, and how many went unsaid since the last
    /// one said — at most once per `interval` for each signal: a process sending it in a loop
    /// must not flood the journal.
    public func sayRefusals(every interval: Duration = .seconds(10), _ say: @escaping @Sendable (ReceivedSignal, Int) -> Void) {
        Task { [self] in
            var pacer = LogPacer<Int32>(interval: interval)
            while let refused = await next() {
                guard let unsaid = pacer.note(refused.number) else { continue }
                say(refused, unsaid)
            }
        }
    }
}

/// Delivers signals to a task through a self-pipe: the handler only writes a record of the
/// signal (`hf_signal_record`: its number and sender) to a non-blocking pipe, which is safe
/// whatever the process's threads are doing, and a task reads them in order. A signal goes to the
/// last pipe made for it (a signal has one handler); different signals may go to different pipes.
public final class SignalPipe: Sendable {
    private let reader: AsyncFD
    private let writer: Int32

    /// Routes `signals` (e.g. SIGCHLD, SIGTERM, SIGINT) to this pipe.
    public init(signals: [Int32]) throws(SystemError) {
        let ends = try PipeEnds.make()
        let flags = fcntl(ends.write, F_GETFL)
        _ = fcntl(ends.write, F_SETFL, flags | O_NONBLOCK)
        reader = try AsyncFD(adopting: ends.read)
        writer = ends.write
        for signal in signals {
            guard hf_signal_to_pipe(signal, writer) == 0 else { throw .last("sigaction(\(signalName(signal)))") }
        }
    }

    /// How many records the handler has written into the pipe since the process began (a record
    /// the full pipe refused is not counted): a reader that counts what it handled knows when it
    /// has handled every signal delivered before a moment.
    public static var recordsWritten: UInt64 { UInt64(hf_signal_records_written()) }

    /// Holds `signals` for the calling thread: blocks them here, and from now on the handler
    /// writes none of them into the pipe: taken by whichever thread, each is queued again,
    /// sender and all, on this one, where it stays pending (across an exec by this thread too)
    /// until `letThrough`, or until the image after the exec unblocks it. Blocking alone would
    /// not hold them: not every thread of the process blocks them (the first libdispatch
    /// thread, started from the main thread, has the main thread's mask).
    public static func holdOnThisThread(_ signals: [Int32]) {
        ProcessImage.block(signals)
        signals.withUnsafeBufferPointer { hf_signal_hold(hf_gettid(), $0.baseAddress, Int32($0.count)) }
    }

    /// Ends `holdOnThisThread` (on the same thread): what it held arrives now, to the pipe.
    public static func letThrough(_ signals: [Int32]) {
        hf_signal_release()
        ProcessImage.unblock(signals)
    }

    /// Lets the kernel discard `signal` (SIG_IGN) until `hear` is called: for a signal that
    /// comes in a flood. Pending ones are dropped too.
    public func mute(_ signal: Int32) {
        SignalDisposition.ignore(signal)
    }

    /// Routes `signal` to this pipe again after `mute`.
    public func hear(_ signal: Int32) {
        _ = hf_signal_to_pipe(signal, writer)
    }

    /// The next signal delivered, in order. SIGCHLDs arrive as fewer records than children
    /// exited (one is in the pipe at a time); a reaper must loop on waitpid anyway.
    public func next() async -> ReceivedSignal? {
        await Self.nextRecord(from: reader)
    }

    /// The next `hf_signal_record` a handler wrote into the pipe `reader` reads.
    static func nextRecord(from reader: AsyncFD) async -> ReceivedSignal? {
        // Each record was one write under PIPE_BUF, so a read of one record's size takes a whole one.
        let size = MemoryLayout<hf_signal_record>.size
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: MemoryLayout<hf_signal_record>.alignment)
        defer { buffer.deallocate() }
        guard let count = try? await reader.read(into: buffer), count == size else { return nil }
        let record = buffer.load(as: hf_signal_record.self)
        // Before the caller reaps: a SIGCHLD from here on writes a record again.
        hf_signal_record_taken(record.signo)
        guard record.sender_pid > 0 else { return ReceivedSignal(number: record.signo) }
        return ReceivedSignal(number: record.signo, senderPID: record.sender_pid, senderUID: record.sender_uid)
    }
}

/// pidfd_open(2) and pidfd_send_signal(2): a signal that reaches the process the pidfd was
/// opened on, or no one (never a later holder of its pid).
public enum PidFD {
    /// A pidfd for `pid` (close-on-exec), or -1 with errno.
    public static func open(_ pid: pid_t) -> Int32 { hf_pidfd_open(pid) }

    public static func send(_ signal: Int32, through pidfd: Int32) -> Bool { hf_pidfd_send_signal(pidfd, signal) == 0 }

    /// Sends `signal` to each child `parent` has now (`/proc/PARENT/task/*/children`), through a
    /// pidfd opened on it and then checked to name a child of `parent` still: never a later
    /// holder of a pid `parent` reaped meanwhile. Returns how many were signalled.
    @discardableResult
    public static func signalChildren(of parent: pid_t, _ signal: Int32) -> Int {
        var children: Set<pid_t> = []
        for task in DirectoryListing.names("/proc/\(parent)/task") ?? [] {
            guard let listed = WholeFile.read("/proc/\(parent)/task/\(task)/children") else { continue }
            for field in String(decoding: listed, as: UTF8.self).split(separator: " ") { if let pid = pid_t(field) { children.insert(pid) } }
        }
        var signalled = 0
        for child in children {
            let pidfd = open(child)
            guard pidfd >= 0 else { continue }
            defer { close(pidfd) }
            guard parentPID(of: child) == parent, send(signal, through: pidfd) else { continue }
            signalled += 1
        }
        return signalled
    }

    /// The parent of `pid` (`/proc/PID/stat`'s fourth field), or nil.
    static func parentPID(of pid: pid_t) -> pid_t? {
        guard let bytes = WholeFile.read("/proc/\(pid)/stat"), let close = bytes.lastIndex(of: UInt8(ascii: ")")) else { return nil }
        let fields = String(decoding: bytes[(close + 1)...], as: UTF8.self).split(separator: " ")
        return fields.count > 1 ? pid_t(fields[1]) : nil
    }
}

/// A signal sent to ask a process to end is followed by SIGCONT, as systemd does: a process
/// that is stopped (SIGSTOP, a Ctrl-Z, its own `kill -STOP 0`) would otherwise keep the signal
/// pending until it is continued, or killed.
public enum EndingSignal {
    /// Whether SIGCONT follows `signal`: not SIGKILL (it needs none), nor a signal that itself
    /// stops or continues.
    public static func isFollowedByContinue(_ signal: Int32) -> Bool {
        ![SIGKILL, SIGSTOP, SIGCONT, SIGTSTP, SIGTTIN, SIGTTOU].contains(signal)
    }
}

public enum SignalDisposition {
    /// SIG_IGN for `signal` in this process (children get default dispositions back).
    public static func ignore(_ signal: Int32) {
        _ = hf_ignore_signal(signal)
    }

    /// Whether `signal` is ignored now (SIG_IGN): as `nohup` starts a program with SIGHUP.
    public static func isIgnored(_ signal: Int32) -> Bool {
        hf_signal_is_ignored(signal) != 0
    }
}

/// Becomes the subreaper of every descendant: orphaned grandchildren are reparented here, not
/// to init, so their exits are seen and reaped.
public enum Subreaper {
    public static func become() throws(SystemError) {
        guard hf_set_child_subreaper() == 0 else { throw .last("prctl(PR_SET_CHILD_SUBREAPER)") }
    }
}

/// Reaps every child of the process and hands each exit status to whoever waits for that pid.
/// Must be the only caller of waitpid in the process. An exit nobody waits for yet is kept (the
/// last 4,096), because a child can exit before its starter gets to `wait`; with a subreaper,
/// orphans' exits land here too.
///
/// A kept exit can be stale: an orphan (a container's background job, reparented to us) exits
/// and is kept under its pid, and the kernel hands that pid to a process we start later. Its
/// `wait` must not get the orphan's exit (the soak found a live `sleep` reported as killed by
/// SIGTERM). So a kept exit is given to a waiter only if no child of ours has that pid now;
/// reaping and recording happen under one lock, so "no child has it" cannot mean "its exit is
/// being recorded this very moment".
///
/// That rule cannot tell two children of ours apart when the kernel reuses a pid at once (pids
/// run short: pid_max 32,768 and a busy guest, or a container that forks until it cannot): a
/// child exits and is reaped before its watcher asks, the next child gets its pid, and the first
/// watcher's `wait(pid)` finds a child of ours under that pid, drops the exit as stale and then
/// gets the second child's — whose own watcher waits for ever (a full test run lost two exits
/// so). So the children the daemon starts are registered as they are forked (`spawn`), under
/// the lock reaping takes, and each exit goes to its own registration (`wait(_: Child)`),
/// whatever pid reuse. `wait(pid)` and its rule stay for children that are not forked here: a
/// runc container's init (reparented to us) and processes an earlier image started.
public final class ChildReaper: Sendable {
    /// A child registered as it was forked: its exit is its own, even if its pid is reused.
    public struct Child: Sendable, Hashable {
        public let pid: pid_t
        let registration: UInt64
    }

    private struct State: Sendable {
        var waiters: [pid_t: CheckedContinuation<ExitStatus, Never>] = [:]
        var exited = KeptExits(limit: ChildReaper.kept)
        /// Pids whose exit matters beyond the waiter's task (`waitTracked`), and the exits
        /// handed to those waiters that they have not `settle`d yet.
        var tracked: Set<pid_t> = []
        var handed: [pid_t: ExitStatus] = [:]
        /// A live upgrade is writing down what was reaped: nothing more is (`freeze`).
        var frozen = false
        /// Registered children not reaped yet, by pid (a pid names one live child at a time).
        var registered: [pid_t: UInt64] = [:]
        var nextRegistration: UInt64 = 0
        /// Registered children's exits their waiter has not asked for yet, and waiters for
        /// exits not reaped yet, by registration.
        var registeredExits: [UInt64: (pid: pid_t, status: ExitStatus)] = [:]
        var registeredWaiters: [UInt64: CheckedContinuation<ExitStatus, Never>] = [:]
        /// Registrations whose exit nobody will ask for (the child failed before exec).
        var abandoned: Set<UInt64> = []
        /// Stops of tracees let go (`reapOne`), and how many of them were held first.
        var traceesLetGo = TraceeStops()
        /// Tracees found stopped by the reap in progress, let go after it (`reapAll`).
        var stopped: [(pid: pid_t, signal: Int32)] = []
        /// When each tracee stop is let go (`TraceeLetGoPace`), and the stops it holds, by pid:
        /// the signal to hand on and when (`letGoHeld`). A task serves them while any are held.
        var pace = TraceeLetGoPace()
        var held: [pid_t: (signal: Int32, due: ContinuousClock.Instant)] = [:]
        var servingHeld = false
        /// The last exits reaped, with when: a signal's sender that has just exited is still
        /// known as a child (`isOrWasChild`).
        var recentlyReaped: [(pid: pid_t, at: ContinuousClock.Instant)] = []
    }

    /// What the reaper has done with the stops of children that made this process their
    /// tracer (for the daemon's log and metrics).
    public struct TraceeStops: Sendable, Equatable {
        /// Stops let go, held ones included once let go.
        public var count: UInt64 = 0
        /// The pid of the last one.
        public var last: pid_t?
        /// Let-gos that failed (the process was killed meanwhile, or another thread traces it).
        public var failed: UInt64 = 0
        /// Stops held for a while before their let-go (`TraceeLetGoPace`: a process that
        /// stops more often than a debugger check does).
        public var held: UInt64 = 0
        /// The pid of the last one held.
        public var lastHeld: pid_t?

        public init() {}
    }

    private let state = NIOLockedValueBox(State())
    static let kept = 4096
    /// Whether `pid` is a child of this process now (live or a zombie not reaped yet).
    private let isChild: @Sendable (pid_t) -> Bool

    /// Exits collected per hold of the lock (`reapAll`).
    public static let reapBatch = 64
    /// Tests: called between two batches of one `reapAll`, outside the lock.
    private let betweenBatches: (@Sendable () -> Void)?

    public init(
        isChild: @escaping @Sendable (pid_t) -> Bool = ChildReaper.isChildOfThisProcess, betweenBatches: (@Sendable () -> Void)? = nil
    ) {
        self.isChild = isChild
        self.betweenBatches = betweenBatches
    }

    /// /proc/PID/stat's parent pid is ours.
    @Sendable public static func isChildOfThisProcess(_ pid: pid_t) -> Bool {
        guard let stat = readSmallFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return false }
        // After "pid (comm)": state, then the parent's pid.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 1 && pid_t(fields[1]) == getpid()
    }

    /// Starts a child registered as it is forked (see the type's comment): wait for it with
    /// `wait(_: Child)`.
    public func spawn(_ options: SpawnOptions) throws(SpawnError) -> Child {
        let spawned = try Spawner.spawn(options, reaper: self)
        guard let child = spawned.child else { preconditionFailure("a child forked for a reaper is registered") }
        return child
    }

    /// `spawn`, waiting for the child's exec through the reactor, not on the calling thread
    /// (`Spawner.spawnAwaitingExec`): for a program whose start can hang (a container's
    /// directory or binary on a stalled file system).
    public func spawnAwaitingExec(_ options: SpawnOptions, within limit: Duration? = nil) async throws(SpawnError) -> Child {
        let spawned = try await Spawner.spawnAwaitingExec(options, reaper: self, within: limit)
        guard let child = spawned.child else { preconditionFailure("a child forked for a reaper is registered") }
        return child
    }

    /// Runs `fork` (which returns a pid, or ≤ 0) under the lock reaping takes, and registers the
    /// child it forked: its exit cannot be reaped before it is registered.
    func registering(_ fork: () -> pid_t) -> (pid: pid_t, child: Child?) {
        state.withLockedValue { s in
            let pid = fork()
            guard pid > 0 else { return (pid, nil) }
            s.nextRegistration += 1
            s.registered[pid] = s.nextRegistration
            return (pid, Child(pid: pid, registration: s.nextRegistration))
        }
    }

    /// Registers a child this image did not fork, as soon as its pid is known: a runc init or
    /// exec'd process (reparented to us, the subreaper, when runc exits; its pid from runc's
    /// pid file) and, after a live upgrade, each process the earlier image forked. From here on
    /// its exit and its signals are its own, as if `spawn` had forked it. Nil when the pid
    /// names no child of ours and no exit is kept for it (the caller falls back to `wait(pid)`).
    ///
    /// Until this call only the pid tells it apart: an exit reaped before it is taken to be this
    /// child's unless an unregistered child holds the pid now (then that child is this one, and
    /// the kept exit an earlier process's, `wait(pid)`'s rule). Two unregistered children given
    /// the pid in turn, both reaped, within that moment, still cannot be told apart.
    public func adopt(_ pid: pid_t) -> Child? {
        state.withLockedValue { s in
            let holder = s.registered[pid] != nil ? nil : (isChild(pid) ? pid : nil)
            let kept = s.exited[pid]
            guard kept != nil || holder != nil else { return nil }
            s.nextRegistration += 1
            let child = Child(pid: pid, registration: s.nextRegistration)
            if holder != nil {
                // Alive or a zombie not reaped yet: its pid is its own until reaped here.
                if kept != nil { _ = s.exited.take(pid) }
                s.registered[pid] = child.registration
            } else if let kept {
                _ = s.exited.take(pid)
                s.registeredExits[child.registration] = (pid, kept)
            }
            return child
        }
    }

    /// Registrations of children not reaped, exits not asked for and failed children not
    /// reaped yet (tests: nothing is held for ever).
    var registrationsHeld: Int {
        state.withLockedValue { $0.registered.count + $0.registeredExits.count + $0.abandoned.count }
    }

    /// What `signal(_:_:)` did.
    public enum SignalOutcome: Sendable, Equatable {
        case sent
        /// The child was reaped already: its pid may name another process by now, so nothing
        /// was sent (its exit is known, or on its way to its waiter).
        case reaped
        /// kill(2) failed with this errno.
        case failed(errno: Int32)
    }

    /// Whether `child` is not reaped yet: alive or a zombie, its pid still its own.
    public func isUnreaped(_ child: Child) -> Bool {
        state.withLockedValue { $0.registered[child.pid] == child.registration }
    }

    /// Sends `signal` to `child` only while it is not reaped, under the lock reaping takes: until
    /// then its pid cannot name anything else (a zombie keeps it), so a signal for a process that
    /// just exited never reaches whichever process the kernel gave its pid to next.
    public func signal(_ child: Child, _ signal: Int32) -> SignalOutcome {
        state.withLockedValue { s in
            guard s.registered[child.pid] == child.registration else { return .reaped }
            return Glibc.kill(child.pid, signal) == 0 ? .sent : .failed(errno: Glibc.errno)
        }
    }

    /// Sends `signal` to the process group `child` leads (kill(-pid)), only while `child` is not
    /// reaped: until then its pid, and so the group's number, names nothing else.
    public func signalGroup(_ child: Child, _ signal: Int32) -> SignalOutcome {
        state.withLockedValue { s in
            guard s.registered[child.pid] == child.registration else { return .reaped }
            return Glibc.kill(-child.pid, signal) == 0 ? .sent : .failed(errno: Glibc.errno)
        }
    }

    /// Nobody will wait for `child` (it failed before exec, or its start was undone): its exit
    /// is dropped when reaped.
    public func abandon(_ child: Child) {
        state.withLockedValue { s in
            if s.registeredExits.removeValue(forKey: child.registration) == nil { s.abandoned.insert(child.registration) }
        }
    }

    /// Waits for a registered child's exit status: its own, whatever pid reuse.
    public func wait(_ child: Child) async -> ExitStatus {
        await withCheckedContinuation { continuation in
            let done = state.withLockedValue { s -> ExitStatus? in
                if let exit = s.registeredExits.removeValue(forKey: child.registration) {
                    if s.tracked.contains(child.pid) { s.handed[child.pid] = exit.status }
                    return exit.status
                }
                s.registeredWaiters[child.registration] = continuation
                return nil
            }
            if let done { continuation.resume(returning: done) }
        }
    }

    /// `wait(_: Child)`, tracked like `waitTracked(_: pid_t)`.
    public func waitTracked(_ child: Child) async -> ExitStatus {
        state.withLockedValue { _ = $0.tracked.insert(child.pid) }
        let status = await wait(child)
        state.withLockedValue { s in if s.tracked.contains(child.pid) { s.handed[child.pid] = status } }
        return status
    }

    /// Waits for a child's exit status.
    public func wait(_ pid: pid_t) async -> ExitStatus {
        await withCheckedContinuation { continuation in
            let done = state.withLockedValue { s -> ExitStatus? in
                if let status = s.exited.take(pid) {
                    // A child of ours has this pid: the kept exit was an earlier process's —
                    // unless that child is a registered one, whose exit is never kept here: then
                    // the kept exit is this waiter's (a runc init whose pid went to our next fork).
                    if !isChild(pid) || s.registered[pid] != nil {
                        if s.tracked.contains(pid) { s.handed[pid] = status }
                        return status
                    }
                }
                s.waiters[pid] = continuation
                return nil
            }
            if let done { continuation.resume(returning: done) }
        }
    }

    /// `wait`, for an exit that must outlive this process image: until the waiter `settle`s it
    /// (it recorded the exit where a live upgrade writes its state down), `freeze` returns it.
    public func waitTracked(_ pid: pid_t) async -> ExitStatus {
        state.withLockedValue { _ = $0.tracked.insert(pid) }
        let status = await wait(pid)
        state.withLockedValue { s in if s.tracked.contains(pid) { s.handed[pid] = status } }
        return status
    }

    /// The waiter of `pid` recorded its exit.
    public func settle(_ pid: pid_t) {
        state.withLockedValue { s in
            s.tracked.remove(pid)
            s.handed.removeValue(forKey: pid)
        }
    }

    /// Stops reaping (a live upgrade is about to replace this image: its children stay zombies
    /// for the next one to reap) and returns every exit reaped but not recorded by its tracked
    /// waiter, or not waited for at all, for the next image to `seed`.
    ///
    /// A tracee stop held for later (`TraceeLetGoPace`) is let go now: its stop has been reported
    /// and the next image's waitpid would not see it again, so it would stay stopped for ever.
    public func freeze() -> [pid_t: ExitStatus] {
        let (exits, held) = state.withLockedValue { s in
            s.frozen = true
            var exits = s.exited.all
            for exit in s.registeredExits.values { exits[exit.pid] = exit.status }
            for (pid, status) in s.handed { exits[pid] = status }
            let held = s.held.map { (pid: $0.key, signal: $0.value.signal) }
            s.held = [:]
            return (exits, held)
        }
        letGo(held)
        return exits
    }

    /// Reaps again (the upgrade did not happen).
    public func thaw() {
        state.withLockedValue { $0.frozen = false }
        reapAll()
    }

    /// Exits an earlier image of this process reaped (`freeze`), kept for their waiters here.
    public func seed(_ exits: [pid_t: ExitStatus]) {
        state.withLockedValue { s in
            for (pid, status) in exits where s.exited[pid] == nil { s.exited.keep(pid, status) }
        }
    }

    /// Reaps every child that has exited (call on SIGCHLD, and once at start).
    ///
    /// In batches of `reapBatch`, each one's waiters woken before the next: the lock is also what
    /// every fork, every signal to a child and every exit wait takes, and a process that makes
    /// children faster than they are reaped (`clone(CLONE_PARENT)` in a loop makes each one
    /// ours) held it for as long as it went on — no create, no signal, no exit report for anyone,
    /// and no exit handed over until the flood ended.
    ///
    /// At most 16 batches per call: past them the rest is reaped by a task of its own, so that
    /// the caller (the daemon's signal loop) is back for its other signals — a SIGTERM — however
    /// long a flood goes on.
    public func reapAll() {
        var batches = 0
        while reapBatch() {
            betweenBatches?()
            batches += 1
            if batches == 16 {
                Task.detached { self.reapAll() }
                break
            }
        }
        serveHeldStops()
    }

    /// One batch; true if it was full (more may be waiting).
    private func reapBatch() -> Bool {
        // waitpid(WNOHANG) under the lock: a `wait` never sees a pid reaped but not recorded.
        let (woken, stopped, full) = state.withLockedValue {
            s -> ([(CheckedContinuation<ExitStatus, Never>, ExitStatus)], [(pid: pid_t, signal: Int32)], Bool) in
            var woken: [(CheckedContinuation<ExitStatus, Never>, ExitStatus)] = []
            guard !s.frozen else { return (woken, [], false) }
            defer { s.stopped = [] }
            var reaped = 0
            while reaped < Self.reapBatch, let (pid, status) = Self.reapOne(&s) {
                reaped += 1
                if let registration = s.registered.removeValue(forKey: pid) {
                    if s.abandoned.remove(registration) != nil { continue }
                    if let waiter = s.registeredWaiters.removeValue(forKey: registration) {
                        if s.tracked.contains(pid) { s.handed[pid] = status }
                        woken.append((waiter, status))
                    } else {
                        s.registeredExits[registration] = (pid, status)
                    }
                    continue
                }
                if let waiter = s.waiters.removeValue(forKey: pid) {
                    // Handed over from here on: a freeze before its waiter settles keeps it.
                    if s.tracked.contains(pid) { s.handed[pid] = status }
                    woken.append((waiter, status))
                    continue
                }
                s.exited.keep(pid, status)
            }
            return (woken, s.stopped, reaped == Self.reapBatch)
        }
        for (waiter, status) in woken { waiter.resume(returning: status) }
        letGo(stopped)
        return full
    }

    /// Lets go of tracees found stopped (on the spawn thread, outside the lock) and counts them.
    private func letGo(_ tracees: [(pid: pid_t, signal: Int32)]) {
        guard let last = tracees.last else { return }
        let failed = UnwantedTracee.letGo(tracees)
        state.withLockedValue { s in
            s.traceesLetGo.count += UInt64(tracees.count)
            s.traceesLetGo.last = last.pid
            s.traceesLetGo.failed += UInt64(failed)
        }
    }

    /// Starts the task that lets go of held stops when they are due, unless it runs.
    private func serveHeldStops() {
        let start = state.withLockedValue { s in
            guard !s.held.isEmpty, !s.servingHeld else { return false }
            s.servingHeld = true
            return true
        }
        guard start else { return }
        Task.detached { await self.letGoHeldStops() }
    }

    /// Until none is held: sleeps until the next held stop is due, then lets go of every one
    /// that is. A held process that exits meanwhile (killed: SIGKILL ends a stopped tracee) is
    /// dropped from `held` by the reap that finds its exit.
    private func letGoHeldStops() async {
        while true {
            let now = ContinuousClock.now
            let (due, next) = state.withLockedValue { s -> ([(pid: pid_t, signal: Int32)], ContinuousClock.Instant?) in
                let due = s.held.filter { $0.value.due <= now }
                for pid in due.keys { s.held.removeValue(forKey: pid) }
                let next = s.held.values.map(\.due).min()
                if next == nil { s.servingHeld = false }
                return (due.map { (pid: $0.key, signal: $0.value.signal) }, next)
            }
            letGo(due)
            guard let next else { return }
            try? await Task.sleep(until: next, clock: .continuous)
        }
    }

    /// The next exit, if any. A stop on the way is a child that made this process its tracer
    /// (`UnwantedTracee`): never taken for an exit, kept in `s.stopped` to be let go now, or in
    /// `s.held` to be let go later (`TraceeLetGoPace`).
    private static func reapOne(_ s: inout State) -> (pid_t, ExitStatus)? {
        while true {
            switch Spawner.waitOnce(-1) {
            case .nothing, .failed: return nil
            case .exited(let pid, let status):
                s.pace.exited(pid)
                s.held.removeValue(forKey: pid)
                if s.recentlyReaped.count >= Self.recentlyReapedKept { s.recentlyReaped.removeFirst() }
                s.recentlyReaped.append((pid, .now))
                return (pid, status)
            case .stopped(let pid, let signal):
                // Let go once the lock is released: on the spawn thread, which takes this lock
                // to register what it forks.
                if let due = s.pace.stopped(pid, at: .now) {
                    s.held[pid] = (signal, due)
                    s.traceesLetGo.held += 1
                    s.traceesLetGo.lastHeld = pid
                } else {
                    s.stopped.append((pid, signal))
                }
            }
        }
    }

    static let recentlyReapedKept = 64

    /// Whether `pid` is a child of this process (alive, or a zombie not reaped yet), or was one
    /// reaped within `window`: who sent a signal is looked up after it was sent, and a sender
    /// that exited at once (`sh -c 'kill $PPID'`) may be reaped by then — always by us, if it
    /// was our child. A pid reused within the window by a process that is not our child would
    /// still count as one; the window is short for that.
    public func isOrWasChild(_ pid: pid_t, within window: Duration) -> Bool {
        if isChild(pid) { return true }
        let now = ContinuousClock.now
        return state.withLockedValue { s in s.recentlyReaped.contains { $0.pid == pid && now - $0.at <= window } }
    }

    /// What became of the stops of children that had made this process their tracer (for the
    /// daemon's log and metrics).
    public var traceesLetGo: TraceeStops { state.withLockedValue { $0.traceesLetGo } }
}

/// Exits reaped that no waiter asked for yet, the last `limit` of them, by pid. Each is numbered
/// as it is kept, and the eviction list names the number: an exit taken by its waiter leaves its
/// entry in the list, and once the pid was given to a later child whose exit is kept too, that
/// stale entry's eviction took the later exit — a `runc exec` process that exited before it was
/// adopted then had no exit, and its waiter waited for ever.
struct KeptExits: Sendable {
    let limit: Int
    private var byPID: [pid_t: (status: ExitStatus, number: UInt64)] = [:]
    /// Oldest first; entries whose exit was taken stay until their turn (then do nothing).
    private var order: [(pid: pid_t, number: UInt64)] = []
    private var next: UInt64 = 0

    init(limit: Int) {
        self.limit = limit
    }

    subscript(pid: pid_t) -> ExitStatus? { byPID[pid]?.status }

    var all: [pid_t: ExitStatus] { byPID.mapValues(\.status) }

    var count: Int { byPID.count }

    mutating func keep(_ pid: pid_t, _ status: ExitStatus) {
        next &+= 1
        byPID[pid] = (status, next)
        order.append((pid, next))
        while order.count > limit {
            let oldest = order.removeFirst()
            if byPID[oldest.pid]?.number == oldest.number { byPID.removeValue(forKey: oldest.pid) }
        }
    }

    mutating func take(_ pid: pid_t) -> ExitStatus? {
        byPID.removeValue(forKey: pid)?.status
    }
}
