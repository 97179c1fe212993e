import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor restarts a dead role again and again until a start succeeds, so a start that
/// fails must leave nothing behind. Before, a spawn that failed (a fork refused under a pids
/// limit) leaked the supervisor's end of the role's channel, one fd per try; and a role spawned
/// whose channel could not then be watched (epoll at its watch limit) ran on without a
/// supervisor — a broker holding its uid, so every next start was refused and no broker ran
/// again. Debug-build failpoints fail the broker's 2nd to 11th starts at each of the two steps.
@Suite("A role start that fails leaves nothing behind", .timeLimit(.minutes(3)))
struct RoleStartFailureTests {
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the starts fail at failpoints, which only debug builds have"),
        arguments: [Failpoint.roleStartFails, Failpoint.roleChannelFails])
    func tenFailedBrokerStartsLeaveNoFdNorBrokerBehind(failpoint: String) async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(failpoint):broker"], brokerRestartBackoffMax: "100ms")
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let received = try await DescriptorLimitTests.startPrinters(daemon, ids: ["p1", "p2"], go: go)
        try await eventually("both streams connected") {
            try await daemon.brokerStreams().filter { $0.state == .connected }.count == 2
        }
        let supervisor = daemon.daemonPID
        let baseline = openDescriptorCount(pid: supervisor)
        let first = try #require(try await daemon.rolePID("broker"))

        kill(first, SIGKILL)
        do {
            try await eventually("ten failed starts, then a broker", timeout: .seconds(60)) {
                let broker = try await daemon.rolePID("broker")
                return daemon.log.contains("afterFailedStarts=\(Failpoint.failedStarts) ") && broker != nil && broker != first
            }
            // The same reason ten times in a second: logged once (then once a minute at most).
            #expect(daemon.log.components(separatedBy: "cannot start role").count - 1 == 1, "\(daemon.log.suffix(3000))")
        } catch {
            Issue.record("\(error); the daemon's log ends\n\(daemon.log.suffix(5000))")
            throw error
        }
        // Only the failpoint's starts failed: never one refused because a broker killed at a
        // failed start (not reaped yet, on a loaded machine) still ran as the broker's uid.
        #expect(!daemon.log.contains("could signal the broker"), "a start refused over our own dying broker: \(daemon.log.suffix(3000))")
        let next = try #require(try await daemon.rolePID("broker"))
        try await eventually("both streams taken over") {
            try await daemon.brokerStreams().filter { $0.state == .connected }.count == 2
        }
        // One process runs as the broker's uid: the broker that serves (before, with the channel
        // failing, each failed start left one running, and the first of them refused the rest).
        try await eventually("no other process as the broker's uid") { ProcessScan.processes(withUID: daemon.brokerUID) == [next] }
        // No fd per failed start: back to where the supervisor was (a little noise allowed; the
        // leak was ten).
        try await eventually("the supervisor's fds back at \(baseline)") { openDescriptorCount(pid: supervisor) <= baseline + 2 }
        print("\(failpoint): \(Failpoint.failedStarts) failed broker starts; supervisor fds \(baseline) before, \(openDescriptorCount(pid: supervisor)) after")

        try await DescriptorLimitTests.expectEveryPrinterExact(daemon, ids: ["p1", "p2"], received: received, go: go)
        #expect(try await daemon.stop() == .exited(0))
    }
}

extension RoleStartFailureTests {
    /// While no broker serves — its 2nd to 11th starts fail here, about a second without one,
    /// and after that it is handed its processes back before it answers — `status` marks the
    /// broker as not answering and the host's `list` says why its streams are missing. Before,
    /// both answered an empty stream list with no mark, which a monitor reads as "every stream
    /// gone" (and a test waiting for a stream to be shown read as a wrong answer).
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the starts fail at a failpoint, which only debug builds have"))
    func aStatusWhileNoBrokerServesSaysSoInsteadOfAnEmptyList() async throws {
        // Ten failed starts 300 ms apart: about 3 s without a broker, for the samples below to
        // fall in (100 ms apart, a loaded machine's host `list` came after it every time).
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.roleStartFails):broker"], brokerRestartBackoffMax: "300ms")
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let received = try await DescriptorLimitTests.startPrinters(daemon, ids: ["p1"], go: go)
        try await eventually("its stream shown") { try await daemon.brokerStreams().count == 1 }
        let first = try #require(try await daemon.rolePID("broker"))

        kill(first, SIGKILL)
        // The host's list is asked on its own, beside `status`, not after it, and a new one every
        // 50 ms without waiting for the last: on a starved machine (two cores, ten daemon suites
        // and three busy loops) one list took over 5 s, the whole window without a broker, and a
        // sampler that waited for each saw none of it.
        let hostMarks = NIOLockedValueBox<Set<String>>([])
        // What every sample saw, for the record if none saw the mark.
        let hostSamples = NIOLockedValueBox<[String: Int]>([:])
        let hostSampler = Task {
            await withTaskGroup(of: Void.self) { samples in
                // Bounded: 20 s of samples at most, each waiting 10 s at most.
                for _ in 0..<400 where !Task.isCancelled {
                    samples.addTask {
                        let seen: String
                        do {
                            let listed = try await daemon.bridge.list(timeout: .seconds(10))
                            if listed.streams.isEmpty, let why = listed.streamsUnavailable {
                                hostMarks.withLockedValue { _ = $0.insert(why) }
                                seen = "no streams: \(why)"
                            } else {
                                seen = "\(listed.streams.count) streams, unavailable \(listed.streamsUnavailable ?? "-")"
                            }
                        } catch {
                            seen = "error \(error)"
                        }
                        hostSamples.withLockedValue { $0[seen, default: 0] += 1 }
                    }
                    try? await Task.sleep(for: .milliseconds(50))
                }
            }
        }
        defer { hostSampler.cancel() }
        var (marked, unmarkedEmpty): (Set<String>, Int) = ([], 0)
        try await eventually("the next broker shows the stream", timeout: .seconds(60)) {
            let report = try await daemon.status()
            let broker = try #require(report.roles.first { $0.name == "broker" })
            if let why = broker.notAnswering {
                marked.insert(why)
            } else if report.streams.isEmpty {
                unmarkedEmpty += 1
            }
            return broker.pid != nil && broker.pid != first && broker.notAnswering == nil && report.streams.count == 1
        }
        hostSampler.cancel()
        await hostSampler.value
        let hostMarked = hostMarks.withLockedValue { $0 }
        #expect(unmarkedEmpty == 0, "a status with no streams and no word why, while no broker served")
        #expect(marked.contains("not running: being restarted"), "status said the broker was being restarted: \(marked)")
        // The host's samples, each asked on its own, may all miss the moment before the first
        // failed start (a full suite under load did): any "not running" reason is the list
        // saying why (after that moment it says the start cannot be done, and is tried again).
        #expect(
            hostMarked.contains { $0.hasPrefix("not running: ") },
            "the host's list said why it had no streams: \(hostMarked); its samples: \(hostSamples.withLockedValue { $0 }); the daemon's log ends\n\(daemon.log.suffix(3000))")
        try await DescriptorLimitTests.expectEveryPrinterExact(daemon, ids: ["p1"], received: received, go: go)
        #expect(try await daemon.stop() == .exited(0))
    }
}
