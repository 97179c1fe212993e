import HoldfastCore
import HoldfastPosix
import HoldfastTestSupport
import Logging
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import HoldfastSupervisor

/// A live upgrade's hold that comes while a role is being restarted (its last incarnation died a
/// moment before) finds none running and goes on without it. The one being started must then
/// never serve: a broker started so took every stream while the upgrade wrote its state,
/// outlived the exec, and its orderly end cleared the replay rings the new image's broker was
/// resuming from.
@Suite("A role started while a live upgrade holds it down never serves", .timeLimit(.minutes(2)))
struct RoleHoldTests {
    @Test func aRoleStartedWhileHeldIsEndedBeforeItServes() async throws {
        guard try await isolated("aRoleStartedWhileHeldIsEndedBeforeItServes", timeout: .seconds(60)) else { return }
        let reaper = ChildReaper()
        let launching = NIOLockedValueBox(false)
        let heldNow = NIOLockedValueBox(false)
        let started = NIOLockedValueBox<[pid_t]>([])
        let served = NIOLockedValueBox(0)
        let role = RoleSupervisor(
            name: "fake", logger: Logger(label: "test"), reaper: reaper,
            launch: {
                // The hold arrives inside the start: after the loop's check, before the
                // incarnation is known.
                launching.withLockedValue { $0 = true }
                let deadline = ContinuousClock.now + .seconds(20)
                while !heldNow.withLockedValue({ $0 }), ContinuousClock.now < deadline { usleep(1000) }
                let (ours, theirs) = try FDChannel.pair()
                close(theirs)
                let child = try reaper.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "1000"]))
                started.withLockedValue { $0.append(child.pid) }
                return .init(pid: child.pid, child: child, channel: FDChannel(try AsyncFD(adopting: ours)))
            },
            serve: { incarnation in
                served.withLockedValue { $0 += 1 }
                while (try? await incarnation.channel.receive()) != nil {}
            })
        let running = Task { await role.run() }
        let reaping = Task {
            // The reaper's loop, as a SIGCHLD would run it.
            while !Task.isCancelled {
                reaper.reapAll()
                try? await Task.sleep(for: .milliseconds(5))
            }
        }
        defer {
            for pid in started.withLockedValue({ $0 }) { kill(pid, SIGKILL) }
            running.cancel()
            reaping.cancel()
        }
        try await eventually("the role being started") { launching.withLockedValue { $0 } }
        let holding = Task { await role.hold(within: .seconds(5)) { _ in Issue.record("asked an incarnation to end: none was running") } }
        try await eventually("the hold taken") { role.isHeld }
        // The start finishes only now, with the hold waiting: as a fork whose exec report comes
        // after the hold did.
        heldNow.withLockedValue { $0 = true }
        let status = await holding.value
        #expect(status == nil, "none running when the hold came")
        // By the time the hold returns (and an upgrade would exec), the one started meanwhile is
        // gone: it would otherwise outlive the exec.
        let pid = try #require(started.withLockedValue { $0.first })
        #expect(kill(pid, 0) != 0, "the incarnation started meanwhile was ended (and reaped) before the hold returned")
        try await Task.sleep(for: .milliseconds(200))
        #expect(served.withLockedValue { $0 } == 0, "it never served")
        #expect(role.pid == nil, "and is not the role's current incarnation")
        #expect(started.withLockedValue { $0.count } == 1, "nothing more is started while held")
        role.stop()
        _ = await running.value
    }
}
