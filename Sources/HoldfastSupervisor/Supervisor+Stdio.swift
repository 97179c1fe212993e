import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Surviving a broker crash (docs/ARCHITECTURE.md): the supervisor keeps every process's host
/// ends and the checkpoint area, and hands both to each broker it starts.
extension Supervisor {
    /// The next broker incarnation is up: every process the crashed one held is handed to it
    /// again (copies of the kept fds, the same stream descriptions with `resume`), and every exit
    /// it was told of is told again, so it drains and reports it. Returns when every process
    /// was handed over, or the broker died meanwhile (its successor goes on).
    ///
    /// A process that cannot be handed over for want of fds (the copies here fail EMFILE or
    /// ENFILE, or the broker refuses `too-many-open-files`) is tried again every
    /// `readoptionRetryPause` for up to `readoptionFdWait`: a moment's scarcity costs its streams
    /// nothing. Past that it is given up as before (its exit reported cut short), since creates
    /// and handoff runtimes wait for this to end.
    func readopt(incarnation: Int, client: ControlClient) async {
        // The wait counts its pauses, not the clock: a supervisor stopped meanwhile (or a guest
        // suspended) did not wait for fds while it stood still (RoleSupervisor.closeWhenRead).
        var pausedFor = Duration.zero
        func mayWait() -> Bool { pausedFor < Self.readoptionFdWait }
        var waited: Set<String> = []
        var handed = 0
        defer { if handed > 0 { logHandover(of: handed, to: incarnation) } }
        while true {
            // Copies made under the lock: a process completing meanwhile closes its own fds.
            let batch = stdio.withLockedValue { store -> [(item: StdioStore.Readoption, copyError: Errno?)] in
                store.claim(for: incarnation, limit: Self.readoptionBatch).map { item in
                    var copy = item
                    var copyError: Errno?
                    copy.descriptors = item.descriptors.map { fd in
                        let copied: Int32
                        if Failpoint.fails(Failpoint.readoptionCopyFails, process: item.process, passes: Failpoint.firstTries)
                            || Failpoint.fails(Failpoint.readoptionCopyAlwaysFails, process: item.process, passes: Failpoint.everyPass)
                        {
                            copied = -1
                            errno = EMFILE
                        } else if fd == StdioStore.endedInput {
                            // An input the host ended: its successor only acknowledges and echoes, on /dev/null.
                            copied = open("/dev/null", O_WRONLY | O_CLOEXEC)
                        } else {
                            copied = fcntl(fd, F_DUPFD_CLOEXEC, 0)
                        }
                        if copied < 0, copyError == nil { copyError = Errno(rawValue: errno) }
                        return copied
                    }
                    return (copy, copyError)
                }
            }
            guard !batch.isEmpty else { return }
            // Every copy of the batch is closed, sent or not: a broker that dies during the
            // batch ends this loop early, and the copies of the items after the one it died
            // on would otherwise stay open in this image for good (a crash-looping broker, or
            // one killed just after a live upgrade's new image handed it everything, leaked up
            // to the batch's worth at each death: the soak's supervisor fd check found 12).
            defer { for (item, _) in batch { for fd in item.descriptors where fd >= 0 { close(fd) } } }
            var putBack = 0
            /// Leaves `item` for the next round if fds may still come free; false once the wait is over.
            func putBackForFds(_ item: StdioStore.Readoption, _ why: String) -> Bool {
                guard mayWait() else { return false }
                stdio.withLockedValue { $0.unclaim(item, for: incarnation) }
                putBack += 1
                if waited.insert(item.process).inserted {
                    logger.warning("no fds to hand a process to the restarted broker: trying again", metadata: [
                        "process": "\(item.process)", "error": "\(why)", "for": "\(Self.readoptionFdWait)",
                    ])
                }
                return true
            }
            for (item, copyError) in batch {
                // Its only stream (stdin) was ended: nothing to hand over; its exit is reported
                // without a drain.
                guard !item.request.streams.isEmpty else {
                    // A release a crash interrupted with no pipe left to give back: done.
                    if item.request.releasing == true {
                        releaseStdio(item.process, evenForEcho: true)
                        continue
                    }
                    stdio.withLockedValue { $0.adopted(item.process, by: incarnation) }
                    await deliverExit(item.process)
                    continue
                }
                if let copyError {
                    let error = SystemError("fcntl(F_DUPFD_CLOEXEC)", errno: copyError)
                    if copyError == .tooManyOpenFiles || copyError == .tooManyOpenFilesInSystem, putBackForFds(item, "\(error)") { continue }
                    logger.error("cannot copy a process's fds for the restarted broker: its streams are given up", metadata: [
                        "process": "\(item.process)", "error": "\(error)",
                    ])
                    stdio.withLockedValue { $0.adopted(item.process, by: incarnation) }
                    await deliverExit(item.process)
                    continue
                }
                do {
                    let adopt = BrokerRequest.adopt(item.request)
                    _ = try await client.request(adopt.frameType, body: adopt.body, descriptors: item.descriptors)
                    handed += 1
                    logger.info(
                        item.request.releasing == true
                            ? "a release a broker crash interrupted handed to the restarted broker to keep for its peer"
                            : "streams handed to the restarted broker",
                        metadata: ["process": "\(item.process)", "streams": "\(item.request.streams.count)", "broker": "\(incarnation)"])
                    if item.request.endingInput == true {
                        // Done and reported: no exit to tell; `input-settled` releases it.
                        stdio.withLockedValue { $0.adopted(item.process, by: incarnation) }
                        continue
                    }
                } catch where error.code == .channelClosed {
                    return  // this broker died too: the next one is handed everything
                } catch where (error.code == .tooManyOpenFiles || error.code == .resourceShortage) && putBackForFds(item, "\(error)") {
                    continue
                } catch {
                    // Its streams are gone; its exit is still reported (cut short).
                    logger.error("the restarted broker refused a process's streams", metadata: [
                        "process": "\(item.process)", "error": "\(error)",
                    ])
                    // A handoff peer's process has no exit of ours to wait for, nor one kept for
                    // its stdin's echo: let it go.
                    if stdio.withLockedValue({ $0.isHandoff(item.process) || $0.isKeptForEcho(item.process) }) {
                        releaseStdio(item.process, evenForEcho: true)
                        continue
                    }
                }
                stdio.withLockedValue { $0.adopted(item.process, by: incarnation) }
                await deliverExit(item.process)
            }
            // Only what waits for fds is left to claim first: pause instead of spinning on it.
            if putBack > 0 {
                try? await Task.sleep(for: Self.readoptionRetryPause)
                pausedFor += Self.readoptionRetryPause
            }
        }
    }

    /// One line for a readoption (the processes handed before it ended), saying why the broker changed: a live upgrade's hand-over
    /// (the first broker of an image the upgrade started; the old broker quiesced, so nothing
    /// was cut) or the previous broker's end (a crash: each stream's own line says what it cost).
    func logHandover(of count: Int, to incarnation: Int) {
        let first = session.withLockedValue { $0.firstBrokerOfImage == incarnation }
        let why: String
        if first, let resumption {
            why = resumption.fellBack == nil ? "a live upgrade" : "a live upgrade that fell back to this binary"
        } else {
            why = "the previous broker's end (\(session.withLockedValue { $0.broker?.lastExit } ?? "unknown"))"
        }
        // Not "streams handed to …": that is each process's own line, which tests count.
        logger.info("the restarted broker took processes over", metadata: [
            "processes": "\(count)", "broker": "\(incarnation)", "after": "\(why)",
        ])
    }

    /// Tells the broker that has `process`'s streams that it exited (once per broker); the
    /// `drained` notification then completes it. Nothing happens while the broker restarts: the
    /// next one is told once it has the streams.
    func deliverExit(_ process: String) async {
        let client: ControlClient
        switch stdio.withLockedValue({ $0.takeExitDue(process) }) {
        case .tell(let broker): client = broker
        case .notDue: return
        case .nothingToDrain:
            if let report = entry(process)?.report { complete(process, report) }
            return
        }
        var exited = ProcessExitedRequest(process: process)
        if let deadline = session.withLockedValue({ $0.drainDeadline }) {
            // Stopping: the drain may take only what is left before the exits must go out.
            let left = max(Duration.zero, deadline - ContinuousClock.now)
            exited.drainTimeoutMilliseconds = Int(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)
        }
        do {
            _ = try await client.call(BrokerRequest.processExited(exited), reply: [String: String].self)
        } catch where error.code == .channelClosed {
            // The broker died: its successor is told after it takes the streams over.
        } catch {
            guard var report = entry(process)?.report else { return }
            logger.warning("the broker has no streams for an exited process: exit reported now", metadata: [
                "process": "\(process)", "error": "\(error)",
            ])
            report.outputCutShort = true
            complete(process, report)
        }
    }

    /// The broker closed `process`'s stdin: ours closes too, so the process sees end-of-file.
    func stdinEnded(_ process: String, endedByHost: Bool) {
        guard let fd = stdio.withLockedValue({ $0.inputEnded(process, endedByHost: endedByHost) }) else { return }
        // The pipe's last close: the process may hold the pipe's lock (README, "Security"), and
        // the loop's watchdog takes over a close that waits. Not a closer thread: eight stuck
        // there would hold every other process's end-of-file behind them.
        Reactor.shared.closeOnLoop(fd)
    }

    /// `process` is done: its host ends close, its checkpoint slots are cleared and free — but
    /// for a stdin the host ended whose END echo is not known to be home, kept until the broker's
    /// `input-settled` (StdioStore.release), unless `evenForEcho`.
    func releaseStdio(_ process: String, evenForEcho: Bool = false) {
        freeStdio { $0.release(process, evenForEcho: evenForEcho) }
    }

    /// The broker saw the END echo of `process`'s ended stdin home (or gave up): a process kept
    /// only for it is let go.
    func stdinSettled(_ process: String, slot: Int) {
        freeStdio { $0.inputSettled(process, slot: slot) }
    }

    /// The broker (its channel `client`) says an output held open past its process's exit
    /// ended (its checkpoint `slot`): our copies of its fds close, its slots are cleared and free.
    func outputSettled(_ process: String, slot: Int, from client: ControlClient) {
        let freed = stdio.withLockedValue { store -> [Int]? in
            guard let freed = store.outputSettled(slot: slot, by: store.incarnation(of: client)) else { return nil }
            for slot in freed.slots {
                checkpoints?.checkpoint(slot)?.clear()
                rings?.clear(slot)
            }
            for fd in freed.descriptors { Reactor.shared.closeOnLoop(fd) }
            return freed.slots
        }
        if let freed { logger.info("an output held open past its exit ended: its slots are free", metadata: ["process": "\(process)", "slots": "\(freed)"]) }
    }

    /// The outputs the brokers before `incarnation` relayed past their processes' exits (an
    /// orphan of each writes on) are handed to it to resume, as a live process's streams are:
    /// our fds kept their pipes' reader through the death. One it refuses is let go (its slots
    /// freed, our fds closed: the orphan then meets a pipe without a reader, as before).
    func resumeHeldOpenOutputs(incarnation: Int, client: ControlClient) async {
        let (handed, freed) = stdio.withLockedValue { $0.handHeldOpen(to: incarnation) }
        for slot in freed {
            checkpoints?.checkpoint(slot)?.clear()
            rings?.clear(slot)
        }
        // Out of fds (here or in the broker: likeliest right after a crash) is waited out as
        // `readopt` waits it out, one wait for all of them: given up at once, the orphan met a pipe
        // without a reader.
        var pausedFor = Duration.zero  // as in `readopt`: pauses, not the clock
        for item in handed {
            let process = item.request.process
            while true {
                let copies = item.descriptors.map { fcntl($0, F_DUPFD_CLOEXEC, 0) }
                defer { for fd in copies where fd >= 0 { close(fd) } }
                do throws(HoldfastError) {
                    if Failpoint.fails(Failpoint.readoptionCopyFails, process: process, passes: Failpoint.firstTries) {
                        throw HoldfastError(.tooManyOpenFiles, "cannot copy the output's fds (failpoint)")
                    }
                    if let failed = copies.firstIndex(where: { $0 < 0 }) {
                        throw HoldfastError(.tooManyOpenFiles, "cannot copy fd \(item.descriptors[failed]): \(Errno(rawValue: errno))")
                    }
                    let adopt = BrokerRequest.adopt(item.request)
                    _ = try await client.request(adopt.frameType, body: adopt.body, descriptors: copies)
                    logger.info("an output held open past its process's exit handed to the restarted broker", metadata: [
                        "process": "\(process)", "stream": "\(item.request.streams.map(\.kind.rawValue))", "broker": "\(incarnation)",
                    ])
                } catch where error.code == .channelClosed {
                    return  // this broker died too: the next one is handed them
                } catch where (error.code == .tooManyOpenFiles || error.code == .resourceShortage)
                    && pausedFor < Self.readoptionFdWait
                {
                    try? await Task.sleep(for: Self.readoptionRetryPause)
                    pausedFor += Self.readoptionRetryPause
                    continue
                } catch {
                    logger.error("an output held open past its process's exit could not be handed to the restarted broker: let go", metadata: [
                        "process": "\(process)", "error": "\(error)",
                    ])
                    freeStdio { $0.dropHeldOpen(slot: item.slot) }
                }
                break
            }
        }
    }

    /// Closes the fds and clears the slots `release` takes out of the store.
    private func freeStdio(_ release: (inout StdioStore) -> (descriptors: [Int32], slots: [Int])?) {
        let released = stdio.withLockedValue { store -> (descriptors: [Int32], slots: [Int])? in
            guard let released = release(&store) else { return nil }
            // Cleared before another stream can be given the slot.
            for slot in released.slots {
                checkpoints?.checkpoint(slot)?.clear()
                rings?.clear(slot)
            }
            return released
        }
        for fd in released?.descriptors ?? [] { Reactor.shared.closeOnLoop(fd) }
    }

    /// A broker adopted a handoff peer's process and deposited copies of its fds: they are kept
    /// like a process of our own, so the broker after a crash of that one is handed them too.
    /// The broker waits for our word (`handoff-kept`) before it relays the process, and tells
    /// the runtime what it says.
    func keepHandoff(_ deposit: HandoffDeposit, descriptors: [Int32], from client: ControlClient) {
        let process = deposit.request.process
        let refusal = stdio.withLockedValue { store -> String? in
            let named = deposit.request.streams.flatMap { stream in
                [stream.fd] + [stream.window, stream.inputWindow].compactMap { $0 }.flatMap { [$0.read, $0.write] }
            }
            guard named.allSatisfy({ $0 >= 0 && $0 < descriptors.count }) else {
                return descriptors.isEmpty
                    ? "its fds did not arrive (the supervisor is at its limit on open files)"
                    : "it names fds it did not bring (\(descriptors.count) came)"
            }
            switch store.keepHandoff(deposit, descriptors: descriptors, adoptedBy: store.incarnation(of: client)) {
            case .kept: return nil
            case .held: return "the supervisor holds a process with this id"
            case .heldForEcho:
                return "the id is the host's process whose stdin's END echo is still owed (kept for a broker crash until the host has it)"
            }
        }
        if let refusal {
            SeqpacketFrames.closeDescriptors(descriptors)
            logger.error("a handoff process's fds were not kept: it will not survive a broker crash", metadata: [
                "process": "\(process)", "descriptors": "\(descriptors.count)", "error": "\(refusal)",
            ])
        } else {
            logger.info("keeping a handoff process's fds for a broker restart", metadata: [
                "process": "\(process)", "owner": "\(deposit.owner)", "streams": "\(deposit.request.streams.count)",
            ])
        }
        let late = Failpoint.fails(Failpoint.depositAnsweredLate, process: process, passes: Failpoint.everyPass)
        // Not awaited here: the answer's reply comes on the channel whose reading called us.
        Task {
            if late { try? await Task.sleep(for: Failpoint.lateAnswer) }
            _ = try? await client.call(
                BrokerRequest.handoffKept(HandoffKept(process: process, kept: refusal == nil, reason: refusal, deposit: deposit.deposit)),
                reply: [String: String].self)
        }
    }

    /// A handoff peer's process left the broker: our copies close (its slots are the broker's).
    func handoffEnded(_ process: String) {
        guard stdio.withLockedValue({ $0.isHandoff(process) }) else { return }
        releaseStdio(process)
    }

    /// A process started by a broker that died before its successor took the streams over:
    /// the successor is handed them now.
    func readoptIfBehind(_ incarnation: Int) async {
        guard let next = stdio.withLockedValue({ $0.successor(of: incarnation) }) else { return }
        await readopt(incarnation: next.incarnation, client: next.client)
    }
}
