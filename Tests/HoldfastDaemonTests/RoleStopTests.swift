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

/// A daemon stop (SIGTERM) that comes while a role is being started: found by a full suite, whose
/// daemon got its SIGTERM 4 ms before its bridge worker was started — the stop found no worker to
/// ask, the worker was started all the same, nobody told it to end, and the daemon's stop waited
/// for it for ever (the test's 120 s bound).
@Suite("A stop while a role is being started ends that role too", .timeLimit(.minutes(2)))
struct RoleStopTests {
    @Test func aStopThatComesWhileTheRoleStartsEndsTheRoleItStarted() async throws {
        guard try await isolated("aStopThatComesWhileTheRoleStartsEndsTheRoleItStarted", timeout: .seconds(60)) else { return }
        let reaper = ChildReaper()
        let box = NIOLockedValueBox<RoleSupervisor?>(nil)
        let started = NIOLockedValueBox<[pid_t]>([])
        let role = RoleSupervisor(
            name: "fake", logger: Logger(label: "test"), reaper: reaper,
            launch: {
                // The stop arrives inside the start: after the loop's check, before the
                // incarnation is known.
                box.withLockedValue { $0 }?.stop()
                let (ours, theirs) = try FDChannel.pair()
                close(theirs)
                let child = try reaper.spawn(SpawnOptions(executable: "/bin/sleep", arguments: ["sleep", "1000"]))
                started.withLockedValue { $0.append(child.pid) }
                return .init(pid: child.pid, child: child, channel: FDChannel(try AsyncFD(adopting: ours)))
            },
            serve: { incarnation in
                while (try? await incarnation.channel.receive()) != nil {}
            })
        box.withLockedValue { $0 = role }
        let running = Task { await role.run() }
        let ended = NIOLockedValueBox(false)
        let watcher = Task {
            await running.value
            ended.withLockedValue { $0 = true }
        }
        defer {
            for pid in started.withLockedValue({ $0 }) { kill(pid, SIGKILL) }
            running.cancel()
            watcher.cancel()
        }
        // The reaper's loop, as a SIGCHLD would run it.
        try await eventually("the role supervisor's run ended", timeout: .seconds(20)) {
            reaper.reapAll()
            return ended.withLockedValue { $0 }
        }
        #expect(started.withLockedValue { $0.count } == 1, "started once, not again after the stop")
        #expect(role.lastExit?.contains("SIGTERM") == true, "the role it started ended on the stop's SIGTERM: \(String(describing: role.lastExit))")
    }
}
