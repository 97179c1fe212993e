import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A place where a test makes a holdfast process die, as a crash would, at an instant no signal
/// sent from outside could hit: `HOLDFAST_FAILPOINT=NAME:PROCESS` kills the process that passes
/// `NAME` for process `PROCESS` with SIGKILL (`pass`), or fails a step a scarce resource could
/// fail (`fails`). Debug builds only: a release build (the package)
/// has no failpoints, so no environment can make it die. Only a role's first incarnation is armed
/// (`environment(_:forRole:)`): the one restarted after the kill runs on, as it would after a crash.
public enum Failpoint {
    /// A live upgrade's new image (not one fallen back to) fails where it adopts the metrics
    /// listener, the last step of its take-over that can fail: it must fall back with every
    /// passed listener still open.
    public static let metricsAdoptionFails = "metrics-adoption-fails"
    /// A live upgrade's new image (not one fallen back to) cannot map the checkpoint area it
    /// was handed: it must fall back, the area's fd open for the previous image.
    public static let inheritedAreaFails = "inherited-area-fails"
    /// The broker stopped a handoff peer's process's streams and told the supervisor it is
    /// releasing it; the answer with the fds is not written yet.
    public static let brokerReleaseMarked = "broker-release-marked"
    /// The broker received a `release` of the process and has not looked it up yet (`fails`
    /// with `everyPass`): it holds (`hold`, gated), as a broker whose pool threads are all busy
    /// would, while the process the request names is adopted.
    public static let brokerReleaseReceived = "broker-release-received"
    /// The broker wrote the answer to a `release`; the supervisor was not told it ended yet.
    public static let brokerReleaseAnswered = "broker-release-answered"
    /// The broker received a handoff peer's `adopt` with its fds; it has not handed copies to
    /// the supervisor yet (the fds die with it).
    public static let brokerAdoptReceived = "broker-adopt-received"
    /// The broker handed a handoff peer's process to the supervisor and relays it; the answer
    /// is not written yet (the next broker is handed the process).
    public static let brokerAdoptTaken = "broker-adopt-taken"
    /// The broker received the supervisor's `adopt` of a process it starts (a create); it has
    /// not adopted it yet.
    public static let brokerCreateReceived = "broker-create-received"
    /// The broker adopted a process the supervisor starts and relays it; the answer is not
    /// written yet.
    public static let brokerCreateTaken = "broker-create-taken"
    /// The broker holds the supervisor's `adopt` of a process it starts (until the gate opens,
    /// or `lateAnswer`), then refuses it: what a broker out of room does, after the create was
    /// answered. Not a kill: checked with `once`.
    public static let brokerCreateRefusedLate = "broker-create-refused-late"
    /// The broker closed the process's stdin for the host's `close-stdin`; neither the answer
    /// nor its `input-ended` is written yet.
    public static let brokerStdinClosed = "broker-stdin-closed"
    /// A checkpointed stdin (in the broker: PROCESS `stdin`) wrote its END echo to the host,
    /// which may now forget the stream.
    public static let brokerEndEchoed = "broker-end-echoed"
    /// The broker told the supervisor a handoff peer's process exited; its drain has not begun.
    public static let brokerExitMarked = "broker-exit-marked"
    /// The supervisor asked the broker to quiesce for a live upgrade; it has not begun (PROCESS:
    /// `broker`). The kill lands wherever the broker's other threads are, a take included.
    public static let brokerQuiescing = "broker-quiescing"

    /// host serve (PROCESS `host-serve`) received a chunk of a process's output and has not
    /// written it to its state directory yet (`fails`, its 20th chunk): it waits long enough for
    /// any acknowledgement of the chunk to reach the guest, then dies (SIGKILL). None may have.
    public static let hostServeChunkReceived = "host-serve-chunk-received"
    /// host serve (PROCESS `host-serve`) had its create answered and has not written the pid
    /// down yet: it dies (SIGKILL). The next one finds the create unanswered.
    public static let hostServeCreateAnswered = "host-serve-create-answered"
    /// A start of the role (PROCESS: its name) fails before its spawn, as a fork refused under
    /// a pids limit would (`fails`: its 2nd to 11th starts).
    public static let roleStartFails = "role-start-fails"
    /// A start of the role spawns it, then fails before its channel is watched, as epoll at its
    /// watch limit would (`fails`: its 2nd to 11th starts).
    public static let roleChannelFails = "role-channel-fails"
    /// The bridge worker, its bridge up, sends the supervisor a message that is not a control
    /// frame (`once`), as a worker gone wrong would.
    public static let workerBreaksFraming = "worker-breaks-framing"
    /// The supervisor's copy of the process's (PROCESS: its id) fds for a broker started after
    /// a crash fails as at its open-file limit (EMFILE): its first 10 tries
    /// (`fails(_:process:passes:)` with `firstTries`).
    public static let readoptionCopyFails = "readoption-copy-fails"
    /// The same, every try.
    public static let readoptionCopyAlwaysFails = "readoption-copy-always-fails"
    /// The broker refuses the supervisor's readoption of the process (PROCESS: its id) as
    /// `too-many-open-files`, as when the fds it was sent could not all be installed at its
    /// limit (MSG_CTRUNC): its first 10 tries (`fails(_:process:passes:)` with `firstTries`).
    /// Roles get failpoints in the first incarnation of each image only: reached after a live
    /// upgrade, whose new image's first broker takes every stream over.
    public static let readoptionRefusedForFds = "readoption-refused-for-fds"
    /// The broker cannot watch the fds of a process it takes over (epoll's ENOSPC: the uid's
    /// `fs.epoll.max_user_watches` used up): its first 10 tries. Reached after a live upgrade.
    public static let readoptionWatchRefused = "readoption-watch-refused"
    /// `runc delete` of the container (named by its id) fails its first two tries, as it does
    /// when runc cannot run (no task left, no inode for its log).
    public static let runcDeleteFails = "runc-delete-fails"
    /// The broker's first `injectedShortages` reads, writes and splices on each fd of the
    /// process (PROCESS: its id) it adopts fail as the kernel's do short of memory (ENOMEM,
    /// EFAULT): not a stream's end. `fails` with `everyPass`.
    public static let streamShortage = "stream-shortage"
    public static let injectedShortages = 6
    /// The broker finds no free checkpoint slot for the handoff peer's process (PROCESS: its
    /// id), as with every slot of its range taken (`fails` with `everyPass`).
    public static let handoffSlotsTaken = "handoff-slots-taken"
    /// The supervisor keeps a handoff peer's process's deposit (PROCESS: its id) and answers it
    /// only after `lateAnswer` (`fails` with `everyPass`), as a supervisor stopped a moment by a
    /// debugger, or starved of CPU, would: the broker's adopt stops waiting before the word comes.
    public static let depositAnsweredLate = "deposit-answered-late"
    /// How late `depositAnsweredLate` answers: past the broker's 5 s wait.
    public static let lateAnswer: Duration = .seconds(7)
    /// A live upgrade has written its state down (PROCESS: `supervisor`); its exec waits
    /// `lateExec` (`fails` with `everyPass`), as a slow state write or log flush would.
    public static let upgradeExecLate = "upgrade-exec-late"
    public static let lateExec: Duration = .seconds(3)
    /// A live upgrade's check of the new binary (`--check-resume-snapshot`; PROCESS: `check`)
    /// takes `slowCheck` (`fails` with `everyPass`), as a loaded machine's would.
    public static let upgradeCheckSlow = "upgrade-check-slow"
    /// The check cannot start an I/O reactor (PROCESS: `check`; `fails` with `everyPass`), as
    /// with every epoll watch of root's uid taken (ENOSPC).
    public static let upgradeCheckReactorFails = "upgrade-check-reactor-fails"
    public static let slowCheck: Duration = .seconds(3)
    /// The bridge worker holds its reply to the host's request of a kind (PROCESS: `list`,
    /// `create`...) `lateReply` after the supervisor answered it (`fails` with `everyPass`), as a
    /// worker starved of CPU, or a host connection whose buffers are full, would.
    public static let bridgeReplyLate = "bridge-reply-late"
    public static let lateReply: Duration = .seconds(1)
    /// With a gate (`HOLDFAST_FAILPOINT_GATE=PATH`), a hold (`hold`) lasts until the file PATH
    /// exists — at most `gateBound` — instead of its fixed time: a test opens the gate once it
    /// has done what must happen meanwhile, so a machine too loaded to do it within a second
    /// cannot let the held step through first.
    public static let gateVariable = "HOLDFAST_FAILPOINT_GATE"
    public static let gateBound: Duration = .seconds(60)
    /// A create's process (PROCESS: its id) is started; it is not in the process table for
    /// `lateSpawn` more (`fails` with `everyPass`), as a runc create or a slow broker adopt
    /// would keep it.
    public static let createSpawnedLate = "create-spawned-late"
    public static let lateSpawn: Duration = .seconds(2)
    /// How many starts `fails` fails.
    public static let failedStarts = 10
    /// The passes `fails` fails by default: the first succeeds (the daemon starts and serves),
    /// the `failedStarts` after it fail.
    public static let afterTheFirst: ClosedRange<Int> = 2...(failedStarts + 1)
    /// The first `failedStarts` passes.
    public static let firstTries: ClosedRange<Int> = 1...failedStarts
    /// Every pass.
    public static let everyPass: ClosedRange<Int> = 1...Int.max

    /// `HOLDFAST_SLOT_QUARANTINE=N` (debug builds only): a freed checkpoint slot waits N other
    /// frees before it is reused, not 1,024, so a test reaches reuse without a thousand
    /// processes. Nil otherwise.
    public static let slotQuarantine: Int? = {
        #if DEBUG
        getenv("HOLDFAST_SLOT_QUARANTINE").flatMap { Int(String(cString: $0)) }
        #else
        nil
        #endif
    }()

    /// Whether this build has failpoints (tests that need one skip without).
    public static var compiledIn: Bool {
        #if DEBUG
        true
        #else
        false
        #endif
    }

    #if DEBUG
    private static let armed: String? = getenv(variable).map { String(cString: $0) }
    #endif

    static let variable = "HOLDFAST_FAILPOINT"
    private static let rolesStarted = NIOLockedValueBox<Set<String>>([])

    /// The environment to start `role` with: without `HOLDFAST_FAILPOINT` once the role was
    /// started before, so a failpoint kills one incarnation and a retry the test makes of the same
    /// request (an `adopt` asked again) reaches a broker that answers it.
    public static func environment(_ environment: [String], forRole role: String) -> [String] {
        let first = rolesStarted.withLockedValue { $0.insert(role).inserted }
        if first { return environment }
        return environment.filter { !$0.hasPrefix(variable + "=") }
    }

    private static let passes = NIOLockedValueBox<[String: Int]>([:])

    /// Whether a test armed `name` for `process` and this pass is one to fail: one of `passes`
    /// (by default the second to the `failedStarts + 1`th: the first succeeds, so the daemon
    /// starts and serves before its role's restarts fail, and the one after them succeeds
    /// again). Never in a release build.
    public static func fails(_ name: String, process: String, passes failing: ClosedRange<Int> = afterTheFirst) -> Bool {
        #if DEBUG
        guard let armed, armed == "\(name):\(process)" else { return false }
        let pass = passes.withLockedValue { counts in
            counts[name, default: 0] += 1
            return counts[name, default: 0]
        }
        return failing.contains(pass)
        #else
        return false
        #endif
    }

    /// Whether a test armed `name` for `process` and this is its first pass. Never in a release
    /// build.
    public static func once(_ name: String, process: String) -> Bool {
        #if DEBUG
        guard let armed, armed == "\(name):\(process)" else { return false }
        return passes.withLockedValue { counts in
            counts[name, default: 0] += 1
            return counts[name] == 1
        }
        #else
        return false
        #endif
    }

    #if DEBUG
    private static let gate: String? = getenv(gateVariable).map { String(cString: $0) }
    #endif

    /// Holds an armed step: until the gate's file exists when a test named one
    /// (`gateVariable`, at most `gateBound`), otherwise for `duration`. Ends early if the task
    /// is cancelled. Does nothing in a release build.
    public static func hold(_ duration: Duration) async {
        #if DEBUG
        guard let gate else {
            try? await Task.sleep(for: duration)
            return
        }
        let deadline = ContinuousClock.now + gateBound
        while access(gate, F_OK) != 0, ContinuousClock.now < deadline, !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(10))
        }
        #endif
    }

    /// Dies here if a test armed `name` for `process` (debug builds only).
    @inline(__always)
    public static func pass(_ name: String, process: String) {
        #if DEBUG
        guard let armed, armed == "\(name):\(process)" else { return }
        // tgkill to itself: the one kill the broker's seccomp filter allows.
        raise(SIGKILL)
        #endif
    }
}
