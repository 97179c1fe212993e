import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// One process's life, as a host application lives it: open its streams, create it over the
/// bridge, feed it, signal it, wait for its exit, then check every byte and the exit.
enum Worker {
    /// `handoffSocket`: where a `handed-over` process is adopted (the broker's public socket).
    static func run(_ plan: Plan, host: Host, handoffSocket: String) async {
        let id = plan.id
        var tokens: [String] = []
        var consumers: [Task<Void, Never>] = []
        var checks: [StreamCheck] = []
        // Every host stream of the process, by kind: what a stall report shows.
        var hostStreams: [(String, ResumableStream<AsyncFD>)] = []

        func output(_ kind: String, _ expected: [Piece]) -> (StreamSpec, StreamCheck) {
            let token = "\(id)-\(kind)"
            tokens.append(token)
            // Ids (and so tokens) are never reused in a soak: a refusal here is a bug.
            let stream = try! host.open(token, .receive)
            hostStreams.append((kind, stream))
            let check = StreamCheck(name: "\(id) (\(plan.kind.rawValue)) \(kind)", expected: expected)
            checks.append(check)
            consumers.append(Task {
                // A broker SIGKILL may cost the bytes its ring held: the stream says which (GAP),
                // before the chunk that follows them; the check skips exactly those.
                var lost: UInt64 = 0
                func skipLost() {
                    let now = stream.statistics.lost.bytes
                    if now > lost {
                        check.skip(Int(now - lost))
                        host.ledger.update { $0.lostBytes += now - lost }
                        lost = now
                    }
                }
                for await chunk in stream.chunks() {
                    skipLost()
                    check.feed(chunk)
                    host.ledger.update { $0.bytesToHost += UInt64(chunk.count) }
                }
                skipLost()
                check.ended()
            })
            return (stream.streamSpec(at: host.streamAddress), check)
        }

        // A process taken back midway: the host gets what it wrote before (its streams never
        // end: the release closes their connections), the soak reads the rest (`HandOver`).
        let split = plan.releaseAfterStep
        let (stdoutSpec, stdoutCheck) = output("stdout", split.map { Array(plan.stdout[..<$0]) } ?? plan.stdout)
        let stderrOutput = plan.stderr.map { stderr in output("stderr", split.map { Array(stderr[..<$0]) } ?? stderr) }
        let stderrSpec = stderrOutput?.0
        var stdinSpec: StreamSpec?
        var input: ResumableStream<AsyncFD>?
        if plan.hasStdin {
            let token = "\(id)-stdin"
            tokens.append(token)
            let stream = try! host.open(token, .send)
            hostStreams.append(("stdin", stream))
            input = stream
            stdinSpec = stream.streamSpec(at: host.streamAddress)
        }
        defer {
            for token in tokens { host.close(token) }
        }

        let spec = ProcessSpec(
            id: id, argv: plan.argv, tty: plan.tty, rows: plan.tty ? 24 : nil, columns: plan.tty ? 80 : nil, stdin: stdinSpec,
            stdout: stdoutSpec, stderr: stderrSpec)
        // A runtime's process: started here, its pipes handed to the broker; its exit is ours
        // to see and to tell the broker (no exit report comes over the bridge).
        var handedOver: HandOver.Outcome?
        if plan.kind == .handedOver {
            host.ledger.update { $0.started[plan.kind, default: 0] += 1 }
            var streams = [(kind: StreamKind.stdout, spec: stdoutSpec)]
            if let stderrSpec { streams.append((.stderr, stderrSpec)) }
            var release: HandOver.Release?
            if let split {
                let checks = [stdoutCheck] + (stderrOutput.map { [$0.1] } ?? [])
                let before = [renderedCount(plan.stdout[..<split])] + (plan.stderr.map { [renderedCount($0[..<split])] } ?? [])
                var rest = [("\(id) (handed-over) stdout", Array(plan.stdout[split...]))]
                if let stderr = plan.stderr { rest.append(("\(id) (handed-over) stderr", Array(stderr[split...]))) }
                release = HandOver.Release(
                    delivered: { zip(checks, before).allSatisfy { $0.receivedBytes >= $1 } },
                    rest: rest)
            }
            do {
                handedOver = try await HandOver.run(plan, streams: streams, socket: handoffSocket, aim: host.handoffAim, release: release)
            } catch {
                host.ledger.fail("\(id) (\(plan.kind.rawValue), argv \(plan.argv.joined(separator: " ").prefix(160))): \(error)")
                for consumer in consumers { consumer.cancel() }
                return
            }
            host.ledger.update {
                $0.adoptsSettled += handedOver!.adoptsSettled
                if handedOver!.released { $0.released += 1 }
                $0.releasesAskedAgain += handedOver!.releasesAskedAgain
            }
            // Released: the host's streams end here (the release closed their connections
            // without END; the guest does not redial them).
            if handedOver!.released {
                for token in tokens { host.close(token) }
            }
        } else {
            if let problem = await create(spec, host: host) {
                host.ledger.fail("\(id) (\(plan.kind.rawValue)): \(problem)")
                for consumer in consumers { consumer.cancel() }
                return
            }
            host.ledger.update { $0.started[plan.kind, default: 0] += 1 }
        }

        // Wait for the process to say it is ready (a tty in raw mode, a sleeper that started).
        @Sendable func ready() async -> Bool {
            let deadline = ContinuousClock.now + .seconds(120)
            while stdoutCheck.receivedBytes < plan.readyBytes {
                if ContinuousClock.now > deadline { return false }
                try? await Task.sleep(for: .milliseconds(10))
            }
            return true
        }

        let problems = NIOLockedValueBox<[String]>([])
        var helpers: [Task<Void, Never>] = []
        if let input {
            helpers.append(Task {
                if plan.readyBytes > 0, !(await ready()) {
                    problems.withLockedValue { $0.append("never said it was ready (\(stdoutCheck.receivedBytes) bytes of output)") }
                    return
                }
                for (index, chunk) in plan.feed.enumerated() {
                    do {
                        try await input.send(chunk)
                    } catch {
                        problems.withLockedValue { $0.append("stdin closed after \(index) of \(plan.feed.count) chunks: \(error)") }
                        return
                    }
                    host.ledger.update { $0.bytesToGuest += UInt64(chunk.count) }
                    try? await Task.sleep(for: .milliseconds(plan.pausesMilliseconds[index]))
                }
                // `cat` ends when its stdin does; a tty's `head -c` when it has read enough.
                if plan.kind == .echo || plan.kind == .holdsItsPipe {
                    let undelivered = await input.finish()
                    if undelivered != 0 { problems.withLockedValue { $0.append("stdin: \(undelivered) bytes never acknowledged") } }
                }
            })
        }
        if let signal = plan.signal, plan.kind == .signalled {
            helpers.append(Task {
                guard await ready() else {
                    problems.withLockedValue { $0.append("never said it started") }
                    return
                }
                try? await Task.sleep(for: .milliseconds(plan.signalAfterMilliseconds))
                if plan.signalAtABlackout {
                    await host.nextBlackout(within: .seconds(6))
                    host.ledger.update { $0.signalsAtABlackout += 1 }
                }
                if let problem = await send(signal, to: id, host: host) { problems.withLockedValue { $0.append(problem) } }
                host.ledger.update { $0.signalsSent += 1 }
            })
        }

        let exitTimeout = Duration.seconds(Int(plan.expectedSeconds * 3) + 300)
        let stallWatch = Task { [streams = hostStreams] in
            await watchForStall(plan, streams: streams, host: host)
        }
        let report = handedOver == nil ? await host.exits.wait(id, timeout: exitTimeout) : nil
        stallWatch.cancel()
        for helper in helpers {
            if !(await finished(helper, within: .seconds(60))) {
                problems.withLockedValue { $0.append("stdin feeder or signaller still running 60 s after the exit") }
            }
        }
        // The exit is reported once the host acknowledged every byte: the streams have ended or
        // are about to.
        for (index, consumer) in consumers.enumerated() {
            if !(await finished(consumer, within: .seconds(60))) {
                problems.withLockedValue { $0.append("\(checks[index].name) did not end within 60 s of the exit") }
            }
        }
        // A handed-over process has no exit report to wait for: its outputs' END echoes may
        // still be on their way. Closed as a host application does at END, once the broker
        // evidently has the echo, or after a bound: a migration that cut the connection after
        // the echo went out leaves nothing to tell it by (the broker, complete, does not come
        // back), so a `false` here is not a failure. Closed at once instead, the host would
        // leave a broker that has not read the echo redialling an END nobody takes.
        if let handedOver, !handedOver.released {
            for (_, stream) in hostStreams { _ = await stream.closeAfterEndDelivered(timeout: .seconds(5)) }
        }
        for token in tokens { host.close(token) }
        for consumer in consumers { await consumer.value }

        var failures = problems.withLockedValue { $0 }
        if let report {
            let expectedSignal = plan.trapsItsSignal ? nil : plan.signal
            if report.exitCode != plan.exitCode || report.signal != expectedSignal {
                failures.append(
                    "exit code \(report.exitCode) signal \(report.signal.map(String.init) ?? "none"), expected \(plan.exitCode) signal \(expectedSignal.map(String.init) ?? "none")")
            }
            if plan.kind == .outOfMemory {
                if report.oomKilled == true {
                    host.ledger.update { $0.oomKillsReported += 1 }
                } else {
                    failures.append("killed by the OOM killer, reported oomKilled \(report.oomKilled.map(String.init) ?? "absent")")
                }
            } else if report.oomKilled == true {
                failures.append("reported killed by the OOM killer, which it was not (exit code \(report.exitCode))")
            } else if report.oomKilled == false {
                host.ledger.update { $0.sigkillsToldApart += 1 }
            }
            if report.undelivered != 0 { failures.append("the guest reported \(report.undelivered) undelivered bytes") }
            // What the guest reports lost to a broker crash is what the host's streams were told.
            let lostHere = checks.reduce(0) { $0 + $1.result().lost } + Int(input?.statistics.lost.bytes ?? 0)
            if Int(report.lost ?? 0) != lostHere {
                failures.append("the guest reported \(report.lost ?? 0) bytes lost, the host's streams \(lostHere)")
            }
            if lostHere > 0 { host.ledger.update { $0.processesWithLoss += 1 } }
            host.ledger.update { $0.exitsChecked += 1 }
        } else if let handedOver {
            if handedOver.status != .exited(plan.exitCode) { failures.append("\(handedOver.status), expected exit code \(plan.exitCode)") }
            if checks.contains(where: { $0.result().lost > 0 }) { host.ledger.update { $0.processesWithLoss += 1 } }
            host.ledger.update { $0.exitsChecked += 1 }
        } else {
            failures.append("no exit within \(exitTimeout)")
        }
        var passed = 0
        for check in checks {
            let result = check.result()
            if result.passed {
                passed += 1
            } else {
                failures.append(
                    "\(result.name): received \(result.received) of \(result.expected) bytes, ended \(result.ended), first difference at \(result.firstDifference.map(String.init) ?? "-")\(result.differenceGot.isEmpty && result.differenceWanted.isEmpty ? "" : " (got \(escaped(result.differenceGot)), expected \(escaped(result.differenceWanted)))"), sha256 \(result.receivedDigest.prefix(16)) expected \(result.expectedDigest.prefix(16))"
                )
            }
        }
        host.ledger.update {
            $0.streamsChecked += checks.count
            $0.streamsPassed += passed
            $0.finished += 1
        }
        if !failures.isEmpty {
            host.ledger.fail("\(id) (\(plan.kind.rawValue), argv \(plan.argv.joined(separator: " ").prefix(160))): " + failures.joined(separator: "; "))
        }
    }

    /// A process whose exit is a minute and a half late is reported as it stands, on both ends
    /// of each of its streams (the host stream's slot and engine; the broker's view over the
    /// bridge), then every minute, three times at most: a stall is diagnosed while it lasts,
    /// not from its aftermath.
    static func watchForStall(_ plan: Plan, streams: [(String, ResumableStream<AsyncFD>)], host: Host) async {
        var wait = Duration.seconds(Int(plan.expectedSeconds * 1.5) + 90)
        for _ in 0..<3 {
            do { try await Task.sleep(for: wait) } catch { return }
            var lines = ["STALL \(plan.id) (\(plan.kind.rawValue)): no exit yet"]
            for (kind, stream) in streams {
                lines.append("  host \(kind): \(stream.debugSummary.replacingOccurrences(of: "\n", with: " |"))")
            }
            if let list = try? await host.bridge.list(timeout: .seconds(10)) {
                for stream in list.streams where stream.process == plan.id {
                    lines.append(
                        "  broker \(stream.kind)\(stream.direction.map { " \($0)" } ?? ""): \(stream.state), to host \(stream.bytesToHost), from host \(stream.bytesFromHost), reconnects \(stream.reconnects), undelivered \(stream.undelivered), failed dials \(stream.failedDials ?? 0), last error \(stream.lastDialError ?? "-")"
                    )
                }
                if let process = list.processes.first(where: { $0.id == plan.id }) { lines.append("  broker process: \(process.state)") }
            } else {
                lines.append("  broker: no list over the bridge")
            }
            printLine(lines.joined(separator: "\n"))
            wait = .seconds(60)
        }
    }

    /// Creates the process, exactly once: `BridgeServer.create` sends a create whose reply was
    /// lost with the bridge again, with the same idempotency key, and the guest answers a
    /// repeat without starting anything (an exit delivered twice would show it did).
    static func create(_ spec: ProcessSpec, host: Host) async -> String? {
        do {
            _ = try await host.bridge.create(spec, timeout: .seconds(300))
            return nil
        } catch {
            return "create failed: \(error.code): \(error.message)"
        }
    }

    /// Signals the process over the bridge, once: `BridgeServer.signal` itself sends it again
    /// (same key) whenever the bridge is lost before the reply, and the guest delivers it once
    /// (the process's trap would print a second line). Any error fails the process: the
    /// process waits for this signal, so even `not-running` means something went wrong.
    static func send(_ signal: Int32, to id: String, host: Host) async -> String? {
        let start = ContinuousClock.now
        do {
            try await host.bridge.signal(id, signal, timeout: .seconds(300))
            return nil
        } catch {
            return "signal \(signal) failed after \(Double(milliseconds(ContinuousClock.now - start)) / 1000) s: \(error.code): \(error.message)"
        }
    }
}

/// How many bytes `pieces` render to.
func renderedCount(_ pieces: ArraySlice<Piece>) -> Int {
    var count = 0
    var scratch: [UInt8] = []
    for piece in pieces {
        scratch.removeAll(keepingCapacity: true)
        piece.render(into: &scratch)
        count += scratch.count
    }
    return count
}
