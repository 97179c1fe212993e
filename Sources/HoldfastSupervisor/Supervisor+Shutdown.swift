import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// The first part of a stop: every container process ends and its exit reaches the host.
extension Supervisor {
    // MARK: Shutdown

    /// The first step of a stop (the `ShutdownSequence` service, run while the roles, the bridge
    /// and the control socket still serve): signals every container process (then SIGKILL after
    /// the grace period), lets the relays drain, reports every exit — all within the shutdown
    /// timeout, whose last part belongs to the host's acknowledgements. The roles stop after it.
    func stopProcesses() async {
        session.withLockedValue { $0.shuttingDown = true }
        let timeout = Duration.milliseconds(configuration.shutdown.timeout)
        let deadline = ContinuousClock.now + timeout
        // The last part of the timeout belongs to the exits: every drain ends before it, so each
        // exit this stop causes is reported while the bridge is still up.
        let acknowledgementWindow = min(.seconds(2), timeout / 4)
        let drainsEnd = deadline - acknowledgementWindow
        session.withLockedValue { $0.drainDeadline = drainsEnd }
        // A role an operator stopped (SIGSTOP, Ctrl-Z) would hold what goes through it — the
        // broker the drains and the creates waiting for its adopt, the bridge worker the exits —
        // until its own SIGTERM at the end, too late for all of them: before, the output in a
        // stopped broker's pipes was lost and a stopped worker's exits with it. It is continued
        // now, as a live upgrade does. (A debugger's stop is not ended by SIGCONT: what goes
        // through that role waits until the timeout, as before.)
        let (broker, worker) = session.withLockedValue { ($0.broker, $0.bridgeWorker) }
        for (name, role) in [("broker", broker), ("bridge worker", worker)] where role?.continueIfStopped() == true {
            logger.notice("stopping: the \(name) was stopped (SIGSTOP, or a debugger): continued, so that the output drains and the exits go out")
        }
        // The bridge stays up while the processes stop (new creates are refused as
        // `shutting-down`): their exits, after their output, still reach the host.
        let signal = configuration.shutdown.signal
        var signalled: Set<String> = []
        func signalEveryProcessNotYetSignalled() {
            for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase == .running && !signalled.contains(entry.id) {
                signalled.insert(entry.id)
                signalProcess(entry, signal)
                // Followed by SIGCONT (`EndingSignal`): a stopped process would keep the signal
                // pending until the grace's SIGKILL, and end killed instead of its own way. Its
                // group too: what job control stopped with it.
                guard EndingSignal.isFollowedByContinue(signal) else { continue }
                signalProcess(entry, SIGCONT)
                if entry.leadsProcessGroup { signalProcessGroup(entry, SIGCONT) }
            }
        }
        signalEveryProcessNotYetSignalled()
        let graceEnd = min(drainsEnd, ContinuousClock.now + .milliseconds(configuration.shutdown.grace))
        // A create that was past its last check when the stop began puts its process in the
        // table after the round above (a runc create takes a while; every create waits for the
        // broker's adopt): it is signalled once it is there, not left to the grace's SIGKILL —
        // nor, for a runc container, to run on past the daemon. No create starts one after.
        if await waitUntil(graceEnd, { session.withLockedValue { $0.spawnsUnderWay == 0 } }) { signalEveryProcessNotYetSignalled() }
        var clean = await waitUntilEveryProcessIsDone(until: graceEnd)
        if !clean {
            // SIGKILL for every process not yet done — and for one a create still spawning
            // when the grace ended puts in the table later (a runc create slower than the
            // grace, a slow broker adopt), once it is there: before, the empty table counted
            // as every process done, so its exit was never reported and a runc container,
            // in no cgroup of ours, ran on past the daemon.
            var killed: Set<String> = []
            func notYetKilled() -> [ProcessTable.Entry] {
                table.withLockedValue { t in t.entries.filter { $0.phase != .done && !killed.contains($0.id) } }
            }
            while true {
                for entry in notYetKilled() {
                    killed.insert(entry.id)
                    if entry.phase == .running {
                        logger.warning("process did not stop in time: SIGKILL", metadata: ["process": "\(entry.id)"])
                        signalProcess(entry, SIGKILL)
                    }
                    // What a direct process left behind (an orphan holding its output open,
                    // which would hold the drain) ends with it: everything in its cgroup, else
                    // its process group (which misses what called setsid).
                    if let cgroup = entry.cgroup, let cgroups, cgroups.kill(cgroup) {
                        continue
                    }
                    if entry.leadsProcessGroup { signalProcessGroup(entry, SIGKILL) }
                }
                var newcomer = false
                clean = await waitUntil(drainsEnd) { [self] in
                    newcomer = !notYetKilled().isEmpty
                    return newcomer || everyProcessIsDone()
                }
                if !clean || !newcomer { break }
            }
        }
        // A create still waiting for the broker's adopt (a broker held in a debugger answers
        // nothing) fails now and ends its process (`AdoptsUnderWay`), so that its answer reaches
        // the host before the bridge worker stops.
        if session.withLockedValue({ $0.spawnsUnderWay > 0 }) {
            let ended = adoptsUnderWay.endAll()
            if ended > 0 {
                logger.warning("a create was still waiting for the broker's adopt when the drains ended: it fails", metadata: ["creates": "\(ended)"])
                // Their processes end (milliseconds): only a runc command still running is
                // left for the ending below.
                await waitUntil(ContinuousClock.now + Self.undoneCreateWait) { [self] in
                    session.withLockedValue { $0.spawnsUnderWay == 0 }
                }
            }
        }
        // A create still under way at the drains' end (a runc create whose OCI hook hangs)
        // would go on past the daemon and make a container nobody serves: its runc command
        // ends now, with its hooks, and the create deletes what it made as it fails.
        for ending in [RuncRuntime.CommandEnding.itsChildren, .withItsGroup] where session.withLockedValue({ $0.spawnsUnderWay > 0 }) {
            let ended = runc.endCommandsUnderWay(ending)
            logger.warning("a create was still under way when the drains ended: its runc command ended", metadata: [
                "runcCommands": "\(ended)", "how": "\(ending)",
            ])
            await waitUntil(ContinuousClock.now + Self.undoneCreateWait) { [self] in
                session.withLockedValue { $0.spawnsUnderWay == 0 }
            }
        }
        // A process that exited but whose output could not drain in time (a host that reads
        // nothing, a stream parked with the bridge down) is reported now, marked as cut short:
        // never an exit the host waits for forever.
        for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase == .exited {
            guard var report = entry.report else { continue }
            report.outputCutShort = true
            logger.warning("process output not drained before the stop: exit reported now", metadata: ["process": "\(entry.id)"])
            complete(entry.id, report)
        }
        // A bridge that is down is waited for a moment first (`bridgeWaitAtStop`, within the
        // timeout): one coming back from a migration, or the new bridge worker of a live
        // upgrade the stop came right after, would otherwise lose every exit of this stop (a
        // loaded run's stop ended 0.6 s after an upgrade, its new worker not connected yet).
        // A host that is gone for good costs the stop that moment, no more.
        if table.withLockedValue({ !$0.unacknowledgedExits.isEmpty }), session.withLockedValue({ $0.bridge != .up }) {
            await waitUntil(min(deadline, ContinuousClock.now + Self.bridgeWaitAtStop)) { [self] in
                session.withLockedValue { $0.bridge == .up } || table.withLockedValue { $0.unacknowledgedExits.isEmpty }
            }
        }
        // Give a connected host a moment to acknowledge those exits (bounded: a host that does
        // not answer must not hold the stop); what it did not acknowledge is lost with us.
        await waitUntil(deadline) { [self] in
            session.withLockedValue { $0.bridge != .up } || table.withLockedValue { $0.unacknowledgedExits.isEmpty }
        }
        stopWasClean.withLockedValue { $0 = clean }
        // What processes left running after they were done (a daemon started with setsid, an
        // orphan whose exit was taken long ago) ends with the daemon, as systemd would end it
        // in the unit's control group; the daemon's cgroup directory goes with them.
        if let cgroups {
            let stuck = await cgroups.endEverything(within: .seconds(2))
            if stuck.isEmpty {
                cgroups.removeDirectory()
            } else {
                logger.warning("processes left running in cgroups after SIGKILL", metadata: ["cgroups": "\(stuck)"])
            }
        }
        // Likewise a runc container this daemon made that runc still has: every process is done.
        let leftovers = await runc.deleteRecordedContainers()
        if !leftovers.isEmpty {
            logger.warning("deleted runc containers left after every process was done", metadata: ["containers": "\(leftovers.sorted())"])
        }
        // The bridge worker stops soon after: what it owes the host goes out first (a create the
        // drains' end failed was answered a moment ago, and the worker may not have written it).
        await finishTheBridge(until: max(deadline, ContinuousClock.now + Self.bridgeFinishWait))
    }

    /// Asks a connected bridge worker to write every reply it owes the host, and waits until it
    /// says it did (or the bridge went down, or `deadline`). Before, the stop's SIGTERM could end
    /// the worker with a reply unwritten: the host's create then waited for the guest until its
    /// own timeout (`no-guest` after 30 s) instead of reading `shutting-down`.
    func finishTheBridge(until deadline: ContinuousClock.Instant) async {
        guard let channel = session.withLockedValue({ $0.bridge == .up ? $0.bridgeChannel : nil }) else { return }
        let before = session.withLockedValue { $0.bridgeFinishes }
        do {
            try await channel.send(ControlFrame(type: SupervisorMessageType.bridgeFinish.rawValue, id: 0, body: []).encoded)
        } catch {
            return  // the worker is gone: nothing of it to wait for
        }
        let finished = await waitUntil(deadline) { [self] in
            session.withLockedValue { $0.bridgeFinishes > before || $0.bridge != .up || $0.bridgeChannel !== channel }
        }
        if !finished {
            logger.warning("the bridge worker did not say it wrote every reply to the host in time: some may be lost with its stop")
        }
    }

    /// How long a stop waits, at least, for the bridge worker to write what it owes the host.
    static let bridgeFinishWait = Duration.seconds(1)

    /// How long a stop waits for a create whose runc command it ended to undo itself (`runc
    /// delete`: milliseconds).
    static let undoneCreateWait = Duration.seconds(2)

    /// How long a stop waits for a bridge that is down to come back, when it has exits to report.
    static let bridgeWaitAtStop = Duration.seconds(2)

    /// Waits until every process reported its exit (output drained), or `deadline`.
    func waitUntilEveryProcessIsDone(until deadline: ContinuousClock.Instant) async -> Bool {
        await waitUntil(deadline) { [self] in everyProcessIsDone() }
    }

    /// Every process reported its exit, and no create is still starting one (its process is
    /// not in the table yet: an empty table is not a stop that is done).
    func everyProcessIsDone() -> Bool {
        session.withLockedValue { $0.spawnsUnderWay == 0 } && table.withLockedValue { t in t.entries.allSatisfy { $0.phase == .done } }
    }

    /// Waits until `condition` holds or `deadline` passes; re-checked at every change (a
    /// process done, an exit acknowledged, the bridge up or down), never polled.
    @discardableResult
    func waitUntil(_ deadline: ContinuousClock.Instant, _ condition: () -> Bool) async -> Bool {
        while true {
            let generation = changes.generation
            if condition() { return true }
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return false }
            await changes.wait(since: generation, timeout: left)
        }
    }
}
