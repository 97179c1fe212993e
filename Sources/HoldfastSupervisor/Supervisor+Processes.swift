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

/// Container processes: create (once per id and key), watch, wait, signal; and status.
extension Supervisor {
    // MARK: Processes

    /// Starts a process and hands its stdio to the broker; on any failure the process is gone
    /// and every fd closed. A repeat of a create (same id and idempotency key) starts nothing:
    /// it answers with the first one's pid, waiting for the first if it is still starting.
    public func launch(_ spec: ProcessSpec, viaBridge: Bool = false) async throws(HoldfastError) -> LaunchResponse {
        var answered = false
        defer { if !answered { metrics.processStartFailed() } }
        guard !session.withLockedValue({ $0.shuttingDown }) else {
            throw HoldfastError(.shuttingDown, "the daemon is shutting down")
        }
        // A live upgrade switching binaries holds it here (it is answered by the next image).
        await upgradeGate.enter()
        defer { upgradeGate.leave() }
        try Launcher.validate(spec)
        try await refuseTheBrokersUID(spec)
        let decision = table.withLockedValue { table in
            table.creates.decide(id: spec.id, key: spec.idempotencyKey, live: table[spec.id].map { ($0.idempotencyKey, $0.pid) })
        }
        let reservation: CreateLedger.PendingStart
        switch decision {
        case .exists:
            throw HoldfastError(.processExists, "a process with id '\(spec.id)' exists")
        case .repeated(let pid):
            logger.info("create repeated: already started", metadata: ["process": "\(spec.id)", "pid": "\(pid)"])
            answered = true
            return LaunchResponse(pid: pid, repeated: true)
        case .join(let first):
            logger.info("create repeated while the first is starting: waiting for it", metadata: ["process": "\(spec.id)"])
            switch await first.wait() {
            case .success(let pid):
                answered = true
                return LaunchResponse(pid: pid, repeated: true)
            case .failure(let error): throw error
            }
        case .start(let pending):
            reservation = pending
        }
        // An id a runtime's handed-over process has (the broker would refuse the adopt only after
        // the program had run, then killed it): refused before anything starts.
        if stdio.withLockedValue({ $0.isHandoff(spec.id) }) {
            table.withLockedValue { $0.creates.release(id: spec.id) }
            let error = HoldfastError(.processExists, "a process with id '\(spec.id)' exists: a runtime handed it over on the handoff socket")
            reservation.resolve(.failure(error))
            throw error
        }
        // Only a create that starts something is refused for want of fds: a repeat of one that
        // started (its reply lost with the bridge) is answered `repeated` whatever the count —
        // refused, the host was told "nothing was started" of a process that runs.
        do {
            try refuseWhenShortOfDescriptors()
        } catch {
            table.withLockedValue { $0.creates.release(id: spec.id) }
            reservation.resolve(.failure(error))
            throw error
        }
        do {
            let pid = try await startProcess(spec, viaBridge: viaBridge)
            reservation.resolve(.success(pid))
            answered = true
            return LaunchResponse(pid: pid)
        } catch {
            table.withLockedValue { $0.creates.release(id: spec.id) }
            reservation.resolve(.failure(error))
            // Said here too: before, only the host's client heard why (a runc error, a start
            // timeout on a hung mount, no terminal left), and the guest's journal nothing.
            if let unsaid = startFailureLog.withLockedValue({ $0.note(error.code) }) {
                var metadata: Logger.Metadata = [
                    "process": "\(spec.id)", "runtime": "\(spec.runtime ?? .direct)", "code": "\(error.code.rawValue)", "error": "\(error.message)",
                ]
                if unsaid > 0 { metadata["unsaid"] = "\(unsaid)" }
                logger.warning("a create failed: the process did not start", metadata: metadata)
            }
            throw error
        }
    }

    /// Refuses a create that would leave fewer than `descriptorReserve` fds free: a broker that
    /// restarts then needs its socketpair, its start-up pipe and copies of a batch of processes'
    /// fds, and without them it could take no process over (it did: at systemd's default soft
    /// limit, before the daemon raised its own, a broker restart failed with EMFILE).
    func refuseWhenShortOfDescriptors() throws(HoldfastError) {
        try ProcessFigures.ensureDescriptorRoom(
            needed: Self.descriptorsPerStart, reserve: Self.descriptorReserve, holder: "the daemon", keptFor: "for a broker restart")
        // The broker's too, before anything is started: it checks its own room only at the
        // adopt, after the program had run — and a create it refused then had run its program
        // (files written, output made) and been killed, answered as if refused before it
        // started, so a host's retry ran it again. It runs out first wherever its limit is
        // below the daemon's share (each process costs it more fds than the supervisor).
        // Every create admitted and not yet adopted counts (this one included): they read the
        // same count, and each will take its share.
        let admitted = max(1, table.withLockedValue { $0.creates.starting.count })
        if let pid = session.withLockedValue({ $0.broker?.pid }), let broker = ProcessFigures.descriptors(of: pid),
            UInt64(broker.open + admitted * Self.brokerDescriptorsPerStart + Self.brokerDescriptorReserve) > broker.limit
        {
            throw HoldfastError(
                .tooManyOpenFiles,
                "the broker holds \(broker.open) fds of its limit of \(broker.limit) and keeps \(Self.brokerDescriptorReserve) for the streams it serves "
                    + "to redial; nothing was started: raise the daemon's hard limit (LimitNOFILE= in its unit: README, \"Open files\") or end some processes")
        }
    }

    /// What a new process costs the broker at most (a socket and a relay's fds per stream, a
    /// tty's two) and what it keeps free (`BrokerService.descriptorReserve`).
    static let brokerDescriptorsPerStart = 12
    static let brokerDescriptorReserve = 64

    /// Starts the process of a create that holds its id's reservation; the record replaces the
    /// reservation in one step.
    func startProcess(_ spec: ProcessSpec, viaBridge: Bool) async throws(HoldfastError) -> pid_t {
        // A broker starting (the daemon just came up) or restarting is waited for, not an error.
        guard let broker = await brokerClient.wait(timeout: Self.brokerWait) else {
            throw HoldfastError(.brokerUnavailable, "the broker has not been running for \(Self.describe(Self.brokerWait))")
        }
        // A stop that began while this create waited (for the broker, or behind a live
        // upgrade) is not handed a new process to end. One that begins from here on waits for
        // this spawn to be in the table (or to have failed) before its last round of signals.
        let spawning = session.withLockedValue { s -> Bool in
            guard !s.shuttingDown else { return false }
            s.spawnsUnderWay += 1
            return true
        }
        guard spawning else { throw HoldfastError(.shuttingDown, "the daemon is shutting down") }
        defer {
            session.withLockedValue { $0.spawnsUnderWay -= 1 }
            changes.notify()
        }
        let started: Launcher.Started
        var container: ProcessTable.Entry.Container?
        // The kernel's log read up to now, before the pid is taken: a record naming the pid
        // after this is the new process's (`KernelOOMLog`).
        let oomMark = kernelLog?.mark()
        switch spec.runtime ?? .direct {
        case .direct:
            started = try await Launcher.start(
                spec, reaper: reaper, cgroups: cgroups, signalGuard: signalGuard,
                startTimeout: .milliseconds(configuration.processes?.startTimeout ?? DaemonConfiguration.Processes.defaultStartTimeout))
            if let failure = started.cgroupFailure {
                logger.warning("process runs without a cgroup: a stop ends its process group only", metadata: [
                    "process": "\(spec.id)", "error": "\(failure)",
                ])
            }
        case .runc:
            if let target = spec.container {
                guard let found = entry(target), let targetContainer = found.container else {
                    // A direct process of that id: exec runs inside a runc container only.
                    if entry(target) != nil {
                        throw HoldfastError(
                            .noSuchContainer,
                            "'\(target)' is a direct process, not a runc container: exec runs a command inside a container started with --runtime runc --bundle PATH")
                    }
                    throw HoldfastError(.noSuchContainer, "no runc container '\(target)'")
                }
                let target = found
                guard target.phase == .running else {
                    throw HoldfastError(.notRunning, "container '\(target.id)' has exited")
                }
                // The container's count, read before the exec runs (the exec's own cgroup file
                // would be read after it ran, and from a process the container controls).
                let containerCounter = target.oomCounter.flatMap { OOMKillCounter.reading($0.file) }
                started = try await runc.exec(spec, in: targetContainer.id, bundle: targetContainer.bundle, oomCounter: containerCounter)
            } else {
                started = try await runc.create(spec)
                container = .init(id: spec.id, bundle: spec.bundle!)
            }
        }
        if let oomMark { kernelLog?.watch(spec.id, pid: started.pid, since: oomMark) }
        if Failpoint.fails(Failpoint.createSpawnedLate, process: spec.id, passes: Failpoint.everyPass) {
            try? await Task.sleep(for: Failpoint.lateSpawn)
        }
        // Each resumable stream keeps its progress in a slot of the checkpoint area, so a broker
        // started after a crash resumes it.
        var adopt = started.adopt
        var descriptors = started.descriptors
        if spec.tty, !adopt.streams.isEmpty, let master = descriptors.first, let peer = PseudoTerminal.openPeer(ofMaster: master) {
            terminalPeers.withLockedValue { $0[spec.id] = peer }
        }
        let incarnation = stdio.withLockedValue { store -> Int in
            store.assignCheckpoints(&adopt)
            return store.incarnation(of: broker)
        }
        let entry = ProcessTable.Entry(
            id: spec.id, pid: started.pid, viaBridge: viaBridge, container: container, idempotencyKey: spec.idempotencyKey,
            leadsProcessGroup: (spec.runtime ?? .direct) == .direct, cgroup: started.cgroup, streams: adopt.streams,
            oomCounter: started.oomCounter)
        metrics.processStarted(spec.runtime ?? .direct)
        var lateAdopt: Task<Result<Void, HoldfastError>, Never>?
        if !adopt.streams.isEmpty {
            do throws(HoldfastError) {
                // And a window each, which a crash inside a read or a write is measured by.
                do {
                    try StreamWindows.add(to: &adopt, descriptors: &descriptors, outputCapacity: Launcher.outputPipeCapacity)
                } catch {
                    throw HoldfastError(.stdioFailed, "cannot make the streams' windows: \(error)")
                }
                // The adopt sends copies of its own, closed once it has its answer: a create
                // answered before that (`late`) keeps these, and its process may end and close
                // them while the send is still under way (a number reused by then would go to
                // the broker as this process's stream).
                let sent = try Self.copies(of: descriptors)
                do {
                    let outcome = try await adoptsUnderWay.await(within: Self.brokerRequestBound, notStarted: { for fd in sent { close(fd) } }) {
                        [adopt, sent] () async throws(HoldfastError) in
                        defer { for fd in sent { close(fd) } }
                        _ = try await broker.request(BrokerRequest.adopt(adopt).frameType, body: BrokerRequest.adopt(adopt).body, descriptors: sent)
                    }
                    if case .late(let adopting) = outcome {
                        // The broker is stopped, held in a debugger or swamped: the process runs
                        // and its output waits in its pipes, as every other process's does until
                        // the broker goes on. The create is answered now, not when it does.
                        lateAdopt = adopting
                        logger.warning("the broker has not taken a new process's stdio yet: the create is answered, the output waits in its pipes", metadata: [
                            "process": "\(spec.id)", "broker": "\(brokerUnavailableExplanation())", "waited": "\(Self.describe(Self.brokerRequestBound))",
                        ])
                    }
                } catch where error.code == .channelClosed {
                    // The broker died with the adopt: whether it took the process or not, the
                    // fds are ours and the slots clean or its own, so its successor is handed
                    // the process like every other one it held (below: `keep`, then
                    // `readoptIfBehind`). Killing it here, as before, made the host's create come
                    // again (`bridge-lost`) and start the command twice — after output of the
                    // first had been relayed, when the broker died after the adoption.
                    logger.warning("the broker died while it was handed a new process: its successor takes it", metadata: [
                        "process": "\(spec.id)", "broker": "\(incarnation)",
                    ])
                }
            } catch {
                _ = stdio.withLockedValue { $0.freeCheckpoints(of: adopt) }
                // The process (and all it started) ends before its pipes are let go: the last
                // close of a pipe takes the pipe's lock, which the process may hold as long as it
                // likes (a write from a page it never lets arrive). Closed first, on a thread of
                // the cooperative pool, that close waited for ever — two such creates and every
                // task of the supervisor stood still. Killed first, it holds nothing; and the
                // closes go to the reactor's loop, whose watchdog takes over a stuck thread.
                if let child = started.child {
                    _ = reaper.signal(child, SIGKILL)
                    _ = await reaper.wait(child)
                } else {
                    kill(started.pid, SIGKILL)
                    _ = await reaper.wait(started.pid)
                }
                if let cgroup = started.cgroup, let cgroups {
                    cgroups.kill(cgroup)
                    cgroups.release(cgroup)
                }
                // The adopt sends (and closes) copies of its own: these are ours to close.
                for fd in descriptors { Reactor.shared.closeOnLoop(fd) }
                closeTerminalPeer(spec.id)
                if let container { await runc.delete(container.id) }
                kernelLog?.forget(spec.id)
                throw error
            }
            // The broker has copies; ours stay until the process is done (Supervisor+Stdio.swift).
            let evicted = stdio.withLockedValue { store in
                // An earlier process of this id still kept for its stdin's echo gives it up; a
                // handoff process's copies the broker is done with close.
                let evicted = store.keep(spec.id, request: adopt, descriptors: descriptors, adoptedBy: incarnation, stillAdopting: lateAdopt != nil)
                for slot in evicted.slots {
                    checkpoints?.checkpoint(slot)?.clear()
                    rings?.clear(slot)
                }
                return evicted.descriptors
            }
            for fd in evicted { Reactor.shared.closeOnLoop(fd) }
        }
        // Before the process is in the table: a request for it finds its adopt under way.
        if let lateAdopt { lateAdopts.withLockedValue { $0[spec.id] = lateAdopt } }
        table.withLockedValue { $0.started(entry) }
        if let child = started.child { forked.withLockedValue { $0[spec.id] = child } }
        logger.info("process started", metadata: [
            "process": "\(spec.id)", "pid": "\(started.pid)", "runtime": "\((spec.runtime ?? .direct).rawValue)", "argv": "\(spec.argv)",
        ])
        Task { [child = started.child] in await watch(entry, child: child) }
        // Followed from here, once the process is in the table: a refusal ends it as a process.
        if let lateAdopt {
            Task { [pid = started.pid] in await lateAdoptFinished(spec.id, pid: pid, await lateAdopt.value, incarnation: incarnation) }
        }
        // The broker that adopted it may have died since, its successor already up.
        if !adopt.streams.isEmpty { await readoptIfBehind(incarnation) }
        return started.pid
    }

    /// The end of an adopt whose create was answered before it (`AdoptsUnderWay`'s `late`).
    /// Taken: the process is the broker's from now on — its exit, if it came meanwhile, is told
    /// now (not before: it could have overtaken the adopt), and a close of its stdin the host
    /// asked for meanwhile is carried out on the broker's copy too. The broker died with it: its
    /// successor is handed the process, as every other one (it is kept). Refused: nobody relays
    /// the process's stdio, and the host was told it started, so it is ended as the host's
    /// SIGKILL would (its exit goes to the host as every exit does), said in the log with the
    /// broker's reason.
    func lateAdoptFinished(_ id: String, pid: pid_t, _ result: Result<Void, HoldfastError>, incarnation: Int) async {
        defer { lateAdopts.withLockedValue { _ = $0.removeValue(forKey: id) } }
        switch result {
        case .success:
            logger.info("the broker took the stdio of a process whose create was answered before", metadata: ["process": "\(id)"])
            let closeStdin = stdio.withLockedValue { store -> Bool in
                store.adopted(id, by: incarnation)
                return store.inputClosed(id)
            }
            if closeStdin {
                let request = BrokerRequest.closeStdin(process: id)
                _ = try? await boundedBrokerRequest(request, key: "\(request.frameType):\(id)", bound: Self.brokerRequestBound)
            }
            await deliverExit(id)
        case .failure(let error) where error.code == .channelClosed:
            await readoptIfBehind(incarnation)
        case .failure(let error):
            logger.error("the broker refused the stdio of a process whose create was answered before: the process is killed", metadata: [
                "process": "\(id)", "error": "\(error)",
            ])
            // Its exit is reported as every exit is (cut short: the broker has no streams).
            stdio.withLockedValue { $0.adopted(id, by: incarnation) }
            // This very process (its id may have gone to another by now).
            if let record = entry(id), record.pid == pid, record.phase != .done {
                do throws(HoldfastError) { try await send(SIGKILL, to: id) } catch {}
            }
            await deliverExit(id)
        }
    }

    /// Waits (at most `bound`) for the late adopt of `id`, if one is under way: a request for
    /// the process sent to the broker before the adopt (a resize, a close of stdin) would find no
    /// such process there. False if it is still under way after `bound`.
    func lateAdoptDone(_ id: String, within bound: Duration) async -> Bool {
        guard let adopting = lateAdopts.withLockedValue({ $0[id] }) else { return true }
        return await adopting.value(within: bound) != nil
    }

    /// Copies of `descriptors` (close-on-exec), all or none.
    static func copies(of descriptors: [Int32]) throws(HoldfastError) -> [Int32] {
        var copies: [Int32] = []
        for fd in descriptors {
            let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
            guard copy >= 0 else {
                let code = errno
                for made in copies { close(made) }
                throw HoldfastError(.stdioFailed, "cannot copy the process's fds for the broker: \(String(cString: strerror(code))) (errno \(code))")
            }
            copies.append(copy)
        }
        return copies
    }

    /// Waits for the process to exit, lets its output drain, then reports the exit.
    /// `child`: its registration (its exit is its own even if the kernel reused its pid at
    /// once): made as this image forked it, or by `adopt` for a runc init or a process an
    /// earlier image started; nil only where `adopt` found no child of ours (then by pid).
    func watch(_ entry: ProcessTable.Entry, child: ChildReaper.Child? = nil) async {
        // Tracked: an exit reaped but not yet written down here goes to the next image if a live
        // upgrade comes in between (ChildReaper.freeze).
        let status = if let child { await reaper.waitTracked(child) } else { await reaper.waitTracked(entry.pid) }
        // Its terminal's end is now the end of what holds its slave: the process's children, or
        // nothing, and the relay reads the rest, then EIO.
        closeTerminalPeer(entry.id)
        // Read before `runc delete` removes the container's cgroup with its count.
        let oomKills = entry.oomCounter?.killsSinceStart()
        let killedByOOM = kernelLog?.take(entry.id) ?? nil
        if let container = entry.container { await runc.delete(container.id) }
        var signal: Int32?
        if case .signaled(let number) = status { signal = number }
        var report = ExitReport(id: entry.id, exitCode: status.code, signal: signal, undelivered: 0)
        if signal == SIGKILL { report.oomKilled = killedByOOM }
        if let oomKills, oomKills > 0 {
            report.oomKills = oomKills
            // Counted once, at the container's end (an exec's count is part of its container's).
            if entry.container != nil { metrics.oomKilled(oomKills) }
        }
        table.withLockedValue { $0.exited(entry.id, report) }
        if let child { forked.withLockedValue { if $0[entry.id] == child { $0[entry.id] = nil } } }
        if !entry.streams.isEmpty { stdio.withLockedValue { $0.exited(entry.id) } }
        reaper.settle(entry.pid)
        if report.wasLikelyOOMKilled {
            logger.warning("process killed by the OOM killer", metadata: [
                "process": "\(entry.id)", "pid": "\(entry.pid)",
                "source": "\(report.oomKilled == true ? "the kernel's log" : "its container's OOM kill count (\(entry.oomCounter?.file ?? ""))")",
            ])
            metrics.processOOMKilled()
        }
        var metadata: Logger.Metadata = ["process": "\(entry.id)", "status": "\(status)"]
        if let kills = report.oomKills { metadata["oomKills"] = "\(kills)" }
        logger.info("process exited", metadata: metadata)
        metrics.processExited()
        guard !entry.streams.isEmpty else {
            complete(entry.id, report)
            return
        }
        // The broker that has its streams is told (now, or once a restarted one has them);
        // its `drained` notification finishes it (processDrained).
        await deliverExit(entry.id)
    }

    /// Closes the slave end held for `id`'s terminal, if any (`terminalPeers`).
    func closeTerminalPeer(_ id: String) {
        if let peer = terminalPeers.withLockedValue({ $0.removeValue(forKey: id) }) { close(peer) }
    }

    /// What the signal loop has said of the stops of processes that made the supervisor their
    /// tracer (`UnwantedTracee`): each is counted in the metrics; the log names the last one,
    /// at most every 10 s, so a process that does it in a loop cannot flood the journal.
    struct TraceeNotes {
        var counted = ChildReaper.TraceeStops()
        var said = ChildReaper.TraceeStops()
        var saidAt: ContinuousClock.Instant?
        static let logInterval = Duration.seconds(10)
    }

    /// After a reap: counts and says the tracee stops let go (and held) since the last call.
    func noteTraceesLetGo(_ notes: inout TraceeNotes) {
        let stops = reaper.traceesLetGo
        guard stops.count > notes.counted.count || stops.held > notes.counted.held else { return }
        if stops.failed > notes.counted.failed {
            // Not expected: every child is forked on the spawn thread, which lets go.
            logger.error("a process that made the supervisor its tracer could not be let go: it stays stopped until killed", metadata: [
                "pid": "\(stops.last.map(String.init) ?? "?")", "failures": "\(stops.failed - notes.counted.failed)",
            ])
        }
        metrics.traceeStopsLetGo(stops.count - notes.counted.count)
        metrics.traceeStopsHeld(stops.held - notes.counted.held)
        notes.counted = stops
        let now = ContinuousClock.now
        if let saidAt = notes.saidAt, now - saidAt < TraceeNotes.logInterval { return }
        func process(_ pid: pid_t?) -> String {
            let id = pid.flatMap { pid in table.withLockedValue { $0.id(ofPID: pid) } }
            return id ?? "(not one the daemon started)"
        }
        if stops.held > notes.said.held {
            let limits = TraceeLetGoPace.Limits.standard
            logger.warning(
                "a process stops as the supervisor's tracee more often than a debugger check does: after its first \(limits.freeStops) stops, each is let go at most every \(limits.perProcessInterval.spoken) (it alone is slowed)",
                metadata: [
                    "pid": "\(stops.lastHeld.map(String.init) ?? "?")", "process": "\(process(stops.lastHeld))",
                    "held": "\(stops.held - notes.said.held)",
                ])
        } else {
            logger.warning(
                "a process made the supervisor its tracer (PTRACE_TRACEME, a debugger check): let go at its stop, the signal handed on; it runs untraced",
                metadata: [
                    "pid": "\(stops.last.map(String.init) ?? "?")", "process": "\(process(stops.last))",
                    "stops": "\(stops.count - notes.said.count)",
                ])
        }
        notes.said = stops
        notes.saidAt = now
    }

    /// Bytes a broker crash took count as undelivered: the exit never looks clean over them.
    func processDrained(_ drained: DrainedNotification) {
        guard var report = entry(drained.process)?.report else { return }
        // Raw mode's bytes that connections took as they died count too: they may not have
        // arrived (before, only `status` and the metrics said so, and the exit said 0).
        report.undelivered = drained.streams.reduce(0) { $0 + $1.undelivered + ($1.unconfirmed ?? 0) }
        let lost = drained.streams.reduce(0) { $0 + ($1.lost ?? 0) }
        if lost > 0 { report.lost = lost }
        let repeated = drained.streams.reduce(0) { $0 + ($1.repeated ?? 0) }
        if repeated > 0 { report.inputRepeated = repeated }
        // An output still open with bytes on their way: the count is not final.
        if drained.streams.contains(where: { $0.ending == DrainedNotification.StreamResult.stillOpen && $0.undelivered > 0 }) {
            report.outputCutShort = true
        }
        // Relayed on after the exit, into their slots: kept out of reuse until they end.
        let heldOpen = Set(drained.streams.filter { $0.ending == DrainedNotification.StreamResult.stillOpen }.map(\.kind))
        stdio.withLockedValue { $0.outputsHeldOpen(drained.process, kinds: heldOpen) }
        complete(drained.process, report)
    }

    /// The exit report once the process is done: exited, and its output drained (or given up
    /// on), so `undelivered` is final. The process is forgotten once its exit is taken.
    public func wait(_ id: String) async throws(HoldfastError) -> ExitReport {
        guard let pid = entry(id)?.pid else { throw HoldfastError(.noSuchProcess, "no process '\(id)'") }
        // Gone meanwhile: the host acknowledged its exit (the table forgot it) between the look
        // above and the wait.
        guard let report = await exitReport(id, pid: pid) else {
            throw HoldfastError(.noSuchProcess, "no process '\(id)': its exit was taken meanwhile (the host acknowledged it)")
        }
        table.withLockedValue { $0.forget(id, pid: pid) }
        return report
    }

    /// Waits for the final exit report of `id` (the process `pid`, when given); nil when it is
    /// not in the table (any more).
    func exitReport(_ id: String, pid: pid_t? = nil) async -> ExitReport? {
        await withCheckedContinuation { continuation in
            switch table.withLockedValue({ $0.wait(for: id, pid: pid, continuation) }) {
            case .done(let report): continuation.resume(returning: report)
            case .gone: continuation.resume(returning: nil)
            case .waiting: break
            }
        }
    }

    /// Sends `signal` to the process `id`. With a `key`, once: a repeat of a signal already
    /// sent (its reply lost with the bridge) is answered without signalling again, and one that
    /// comes while the first is being sent gets the first's outcome (`SignalLedger`).
    public func signal(_ id: String, _ signal: Int32, key: String? = nil) async throws(HoldfastError) {
        await upgradeGate.enter()
        defer { upgradeGate.leave() }
        try ProcessSpec.checkIdempotencyKey(key)
        // A process still starting (its create accepted, its program perhaps already running,
        // the broker's adopt not yet done): signalled once it has started. Answered
        // `no-such-process` before, a host's cancel (`host stop` while the create waited for a
        // slow broker) concluded nothing ran, and the process then ran on.
        if let starting = table.withLockedValue({ $0[id] == nil ? $0.creates.starting[id] : nil }) {
            if case .failure(let error) = await starting.wait() {
                throw HoldfastError(.noSuchProcess, "no process '\(id)': its create failed (\(error.code.rawValue))")
            }
        }
        let (decision, pid) = table.withLockedValue { ($0.decideSignal(to: id, key: key), $0[id]?.pid) }
        switch decision {
        case .repeated:
            metrics.signalRepeated()
            logger.info("signal repeated: already sent", metadata: ["process": "\(id)", "signal": "\(signalName(signal))"])
        case .join(let first):
            metrics.signalRepeated()
            try await first.wait().get()
        case .send(nil):
            try await send(signal, to: id)
        case .send(let pending?):
            let outcome: Result<Void, HoldfastError>
            do throws(HoldfastError) {
                try await send(signal, to: id)
                outcome = .success(())
            } catch {
                outcome = .failure(error)
            }
            table.withLockedValue { $0.signalSettled(to: id, pid: pid, key: pending.key, sent: (try? outcome.get()) != nil) }
            pending.resolve(outcome)
            try outcome.get()
        }
    }

    /// Sends `signal` to the process `id`, as its runtime does.
    private func send(_ signal: Int32, to id: String) async throws(HoldfastError) {
        guard let record = entry(id) else {
            throw HoldfastError(.noSuchProcess, "no process '\(id)'")
        }
        // SIGKILL ends a direct process the way it ends a container: everything in its cgroup,
        // what it started in a session of its own included. Also once the process itself has
        // exited while something it left still holds its output (a `host stop` whose SIGTERM
        // ended only the process): that is what keeps its exit from being reported.
        if signal == SIGKILL, record.phase != .done, let cgroup = record.cgroup, let cgroups, cgroups.kill(cgroup) {
            logger.info("SIGKILL to every process in the cgroup", metadata: ["process": "\(id)", "cgroup": "\(cgroup)"])
            return
        }
        guard record.phase == .running else { throw HoldfastError(.notRunning, "process '\(id)' has exited") }
        if let container = record.container {
            do {
                try await runc.kill(container.id, signal: signal)
                return
            } catch where error.code == .tooManyProcesses {
                // No task to start runc with (the guest's pids exhausted: often by this very
                // container). `runc kill ID SIG` signals the container's init alone, which is a
                // registered child of ours: signalled directly, so a runaway container can still
                // be killed from the host. (Refused, its answer said "try again once processes
                // end" — impossible while it forks.)
                guard let child = forked.withLockedValue({ $0[id] }) else { throw error }
                switch reaper.signal(child, signal) {
                case .sent:
                    logger.warning("no task to start runc with: the signal sent to the container's init directly", metadata: [
                        "process": "\(id)", "signal": "\(signalName(signal))",
                    ])
                    return
                case .reaped: throw HoldfastError(.notRunning, "process '\(id)' has exited")
                case .failed: throw error
                }
            }
        }
        if let child = forked.withLockedValue({ $0[id] }) {
            switch reaper.signal(child, signal) {
            case .sent: return
            case .reaped: throw HoldfastError(.notRunning, "process '\(id)' has exited")
            case .failed(let errno):
                throw HoldfastError(.signalFailed, "kill(\(record.pid), \(signal)): \(String(cString: strerror(errno))) (errno \(errno))")
            }
        }
        // No registration (`adopt` found no child of ours under its pid): by pid.
        guard kill(record.pid, signal) == 0 else {
            throw HoldfastError(.signalFailed, "kill(\(record.pid), \(signal)): \(String(cString: strerror(errno))) (errno \(errno))")
        }
    }

    /// Signals a process of the table: through its registration (never a pid the kernel gave
    /// to another process after it was reaped), else by pid.
    func signalProcess(_ entry: ProcessTable.Entry, _ signal: Int32) {
        if let child = forked.withLockedValue({ $0[entry.id] }), child.pid == entry.pid {
            _ = reaper.signal(child, signal)
            return
        }
        // By number only while the table still has the process running under it: `entry` may
        // be older than the process's reap (a stop's rounds read the table, then signal one
        // process after another), and once its exit is recorded its registration is gone and its
        // number the kernel's to give to any new process.
        let running = table.withLockedValue { $0[entry.id].map { $0.pid == entry.pid && $0.phase == .running } ?? false }
        guard running else { return }
        kill(entry.pid, signal)
    }

    /// Signals the process group a direct process leads (what it left behind: an orphan that
    /// holds its output open). While the leader is not reaped, through its registration: exact.
    /// After, to the group only while no process has the number as its pid
    /// (`ProcessGroupSignal`): once every member has ended, the kernel may give the number to a
    /// new process that leads a group of its own — at once, when something moves `ns_last_pid`
    /// back (the test suite does) — and a stop's SIGCONT or SIGKILL reached that stranger.
    func signalProcessGroup(_ entry: ProcessTable.Entry, _ signal: Int32) {
        if let child = forked.withLockedValue({ $0[entry.id] }), child.pid == entry.pid,
            reaper.signalGroup(child, signal) != .reaped
        {
            return
        }
        _ = ProcessGroupSignal.sendAfterLeaderReaped(group: entry.pid, signal)
    }

    // MARK: Status

    /// Every stream the broker holds, page by page (one reply holds what fits a frame); nil if
    /// a page is not answered within `brokerAnswerBound` (a stopped broker, or one that cannot
    /// finish dying), so that `status` answers all the same, or not at all (a broker that died
    /// during the list: part of a list would show a monitor streams gone that are not). Nil too
    /// while no broker serves (restarting, or being handed its processes back): an empty list
    /// then read as "every stream gone" to a monitor, which nothing marked.
    func brokerStreams() async -> [StreamStatus]? {
        guard let broker = broker() else { return nil }
        var streams: [StreamStatus] = []
        while true {
            let offset = streams.count
            guard let answer = await ask(broker, .list(ListRequest(offset: offset)), reply: ListResponse.self),
                let page = answer
            else { return nil }
            guard !page.streams.isEmpty else { break }
            streams += page.streams
            if streams.count >= (page.total ?? streams.count) { break }
        }
        return streams
    }

    static let brokerAnswerBound: Duration = .seconds(2)

    /// Asks `broker`, waiting at most `brokerAnswerBound`: nil when it did not answer in time (a
    /// stopped broker, or one that cannot finish dying); `.some(nil)` when it answered with an
    /// error or its channel closed. The request's task goes on until the answer or the channel's
    /// end (the channel does not take cancellation), so a question of a kind still overdue is
    /// not asked again: nil at once. A monitor polling `status` or a scraper while an operator
    /// holds the broker in a debugger for an hour would otherwise pile up a request (and two
    /// tasks) per poll, every one of them answered in a burst when the broker goes on.
    func ask<Reply: Decodable & Sendable>(_ broker: ControlClient, _ request: BrokerRequest, reply: Reply.Type) async -> Reply?? {
        let outcome: BrokerRequestOutcome
        if case .metrics = request {
            outcome = await sharedScrapeQuestion(request, to: broker)
        } else {
            outcome = await boundedRequest(request, to: broker, key: "question:\(request.frameType)", bound: Self.brokerAnswerBound)
        }
        switch outcome {
        case .answered(let frame): return .some(try? ControlJSON.decode(Reply.self, from: frame.body, frameType: frame.type))
        case .failed: return .some(nil)
        case .notAnswered: return nil
        }
    }

    /// A scrape's question to the broker, shared with the one already in flight if there is one.
    /// Each answer costs the broker a walk of every stream and of its fds, on the channel it
    /// serves one request at a time; a guest process that kept 64 scrapes of a TCP or vsock
    /// metrics endpoint in flight had it render 64 at once, and adopts, resizes and closes of
    /// stdin queued behind them. (Only scrapes: a `status` or `list` — root's, or the host's —
    /// must see what happened before it was asked, which an answer already on its way may not.)
    func sharedScrapeQuestion(_ request: BrokerRequest, to broker: ControlClient) async -> BrokerRequestOutcome {
        let question = "\(request.frameType):" + String(decoding: request.body, as: UTF8.self)
        let (asking, shared) = questionsInFlight.withLockedValue { inFlight -> (Task<BrokerRequestOutcome, Never>, Bool) in
            if let asking = inFlight[question] { return (asking, true) }
            let asking = Task { [self] in
                let outcome = await boundedRequest(request, to: broker, key: "question:\(request.frameType)", bound: Self.brokerAnswerBound)
                // Under the lock the entry was made under: always after it.
                questionsInFlight.withLockedValue { _ = $0.removeValue(forKey: question) }
                return outcome
            }
            inFlight[question] = asking
            return (asking, false)
        }
        metrics.brokerQuestion(shared: shared)
        return await asking.value
    }

    /// Why the broker's list is missing: not serving yet, or as the kernel sees its process.
    func brokerUnavailableExplanation() -> String {
        guard let pid = roleStatuses.first(where: { $0.name == "broker" })?.pid else {
            return Self.notRunning(session.withLockedValue { $0.broker })
        }
        guard broker() != nil else { return "starting: it is asked once it is up (after a restart, once every process is back with it)" }
        return ProcessRunState.of(pid).explanation
    }

    /// A role with no process: being restarted, or — its last start failed — why not.
    static func notRunning(_ role: RoleSupervisor?) -> String {
        guard let failure = role?.startFailure else { return "not running: being restarted" }
        return "not running: cannot be started, tried again and again: \(failure)"
    }

    public func status() async -> StatusReport {
        let streams = await brokerStreams()
        var roles = roleStatuses
        if streams == nil, let index = roles.firstIndex(where: { $0.name == "broker" }) {
            roles[index].notAnswering = brokerUnavailableExplanation()
        }
        // The bridge worker is not asked anything here: a stopped or traced one (SIGSTOP, a
        // debugger) is seen in /proc. The host's requests and the exits wait for it meanwhile.
        if let index = roles.firstIndex(where: { $0.name == "bridge" }) {
            if let pid = roles[index].pid {
                let state = ProcessRunState.of(pid)
                switch state {
                case .stopped, .traced:
                    roles[index].notAnswering = state.explanation + "; the host's requests and the exits wait until then"
                case .running, .dying, .gone:
                    break
                }
            } else if let worker = session.withLockedValue({ $0.bridgeWorker }), worker.startFailure != nil {
                roles[index].notAnswering = Self.notRunning(worker)
            }
        }
        var report = StatusReport(
            version: HoldfastVersion.string, pid: getpid(),
            uptimeSeconds: Double((ContinuousClock.now - startedAt).components.seconds), bridge: session.withLockedValue { $0.bridge },
            roles: roles, processes: processStatusesWithUsage(),
            streams: streams ?? [])
        report.executableSHA256 = runningExecutableSHA256()
        session.withLockedValue { s in
            report.upgrades = s.upgrades
            report.upgradesFellBack = s.upgradesFellBack > 0 ? s.upgradesFellBack : nil
            report.lastUpgradeFailure = s.lastUpgradeFailure
        }
        report.settingsAwaitingRestart = settingsAwaitingRestart
        let malloc = Memory.mallocUsage()
        report.mallocInUseKiB = malloc.inUse / 1024
        report.mallocFreeKiB = malloc.free / 1024
        return report
    }

    /// The pid of a role (tests kill it to prove it comes back).
    public func rolePID(_ name: String) -> pid_t? {
        session.withLockedValue { name == "broker" ? $0.broker?.pid : $0.bridgeWorker?.pid }
    }

    var roleStatuses: [RoleStatus] {
        session.withLockedValue { [$0.broker?.status, $0.bridgeWorker?.status].compactMap { $0 } }
    }
}
