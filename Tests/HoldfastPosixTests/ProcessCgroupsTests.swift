import HoldfastCore
import HoldfastPosix
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A plain thread, so the race below runs in parallel for real (the concurrency pool has as
/// many threads as cores, and these loops never suspend).
private final class PlainThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let body: @Sendable () -> Void

    init(_ body: @escaping @Sendable () -> Void) {
        self.body = body
        let context = Unmanaged.passRetained(self).toOpaque()
        let created = pthread_create(&thread, nil, { context in
            let me = Unmanaged<PlainThread>.fromOpaque(context!).takeRetainedValue()
            me.body()
            return nil
        }, context)
        precondition(created == 0, "pthread_create: \(created)")
    }

    func join() { pthread_join(thread, nil) }
}

@Suite("ProcessCgroups: a cgroup per process, made, joined, killed and removed", .timeLimit(.minutes(5)))
struct ProcessCgroupsTests {
    /// This process's cgroup can hold ours, with cgroup.kill (root, cgroup v2, Linux 5.14).
    static var available: Bool {
        guard geteuid() == 0, case .success(let cgroups) = ProcessCgroups.open(tag: "probe-\(UInt32.random(in: 0..<UInt32.max))") else {
            return false
        }
        cgroups.removeDirectory()
        return true
    }

    static func opened() throws -> ProcessCgroups {
        switch ProcessCgroups.open(tag: "test-\(UInt64.random(in: 0..<UInt64.max))") {
        case .success(let cgroups): return cgroups
        case .failure(let why): throw why
        }
    }

    /// Processes end on one thread (`release`, which removes what is idle) while others start:
    /// a cgroup just made must never be removed before its child joins it. It was, once in a
    /// few thousand creates of the full suite (the child's join then failed with ENODEV): the
    /// name was marked as tracked only after its mkdir, and a `removeIdle` between the two took
    /// it for an idle one.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aCgroupJustMadeIsNeverRemovedByAnotherProcessEnding() async throws {
        let cgroups = try Self.opened()
        defer {
            cgroups.endEverythingBlocking(within: .seconds(2))
            cgroups.removeDirectory()
        }
        let lost = NIOLockedValueBox(0)
        let made = NIOLockedValueBox(0)
        let stop = NIOLockedValueBox(false)
        // Two threads that only remove what is idle, as fast as they can.
        let removers = (0..<2).map { _ in
            PlainThread {
                while !stop.withLockedValue({ $0 }) { cgroups.removeIdle() }
            }
        }
        let makers = (0..<4).map { _ in
            PlainThread {
                for _ in 0..<1500 {
                    guard let created = try? cgroups.create() else { continue }
                    // Still there for the child to join.
                    if access(cgroups.directory + "/" + created.name, F_OK) != 0 {
                        lost.withLockedValue { $0 += 1 }
                    }
                    close(created.procs)
                    made.withLockedValue { $0 += 1 }
                    cgroups.release(created.name)
                }
            }
        }
        for maker in makers { maker.join() }
        stop.withLockedValue { $0 = true }
        for remover in removers { remover.join() }
        print("cgroups made: \(made.withLockedValue { $0 }), removed before use: \(lost.withLockedValue { $0 })")
        #expect(made.withLockedValue { $0 } == 6000)
        #expect(lost.withLockedValue { $0 } == 0, "a cgroup just made was removed before use")
        cgroups.removeIdle()
        #expect(cgroups.cgroupNames().isEmpty, "every released, empty cgroup removed")
    }

    /// A process's end tries a bounded number of the lingering cgroups (those a done process
    /// left something running in), in turn: before, every one of them, each exit. A cgroup with
    /// a child cgroup cannot be removed either, which stands in for a populated one here.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aProcessEndTriesAFewLingeringCgroupsInTurn() async throws {
        let cgroups = try Self.opened()
        defer {
            cgroups.endEverythingBlocking(within: .seconds(2))
            cgroups.removeDirectory()
        }
        var lingering: [String] = []
        for _ in 0..<50 {
            let created = try cgroups.create()
            close(created.procs)
            #expect(mkdir(cgroups.directory + "/" + created.name + "/held", 0o755) == 0)
            cgroups.release(created.name)
            lingering.append(created.name)
        }
        #expect(Set(cgroups.cgroupNames()) == Set(lingering), "each one lingers")
        for name in lingering { #expect(rmdir(cgroups.directory + "/" + name + "/held") == 0) }
        // Now empty: one more process's end removes its own cgroup and 8 of them.
        let one = try cgroups.create()
        close(one.procs)
        cgroups.release(one.name)
        let left = Set(cgroups.cgroupNames())
        let per = ProcessCgroups.lingeringTriedPerRelease
        #expect(left.count == lingering.count - per && left.isSubset(of: lingering), "\(left.count) left of \(lingering.count)")
        // Each later end tries the next ones: within 50 / 8 more ends, every one is gone.
        for _ in 0..<((lingering.count - per + per - 1) / per) {
            let next = try cgroups.create()
            close(next.procs)
            cgroups.release(next.name)
        }
        #expect(cgroups.cgroupNames().isEmpty, "every lingering cgroup removed in turn")
    }

    /// A child joins before it execs: everything it starts is inside, and `cgroup.kill` ends all
    /// of it, what left its session included. In a test process of its own: its reaper reaps
    /// every child of the process, other tests' too.
    @Test(.enabled(if: available, "needs root and a writable cgroup v2 hierarchy with cgroup.kill"))
    func aKilledCgroupTakesEverythingTheChildStarted() async throws {
        guard try await isolated("aKilledCgroupTakesEverythingTheChildStarted") else { return }
        let cgroups = try Self.opened()
        defer {
            cgroups.endEverythingBlocking(within: .seconds(2))
            cgroups.removeDirectory()
        }
        let created = try cgroups.create()
        var options = SpawnOptions(executable: "/bin/sh", arguments: ["sh", "-c", "setsid sleep 1000 & sleep 1000 & exec sleep 1000"])
        options.newSession = true
        options.cgroupProcs = created.procs
        let reaper = ChildReaper()
        let child = try reaper.spawn(options)
        close(created.procs)
        try await eventually("three processes in the cgroup") { cgroups.members(created.name).count == 3 }
        #expect(cgroups.members(created.name).contains(child.pid))
        #expect(cgroups.isPopulated(created.name))
        #expect(cgroups.kill(created.name))
        // Reaped here (no SIGCHLD drives this reaper): the cgroup is empty once every member
        // has exited, which can be after a pass reaped nothing, so the child's own reap is
        // waited for too (a loaded run ended the wait between the two and hung in `wait`).
        try await eventually("the child reaped") {
            reaper.reapAll()
            return !cgroups.isPopulated(created.name) && reaper.signal(child, 0) == .reaped
        }
        let status = await reaper.wait(child)
        #expect(status == .signaled(SIGKILL))
        cgroups.release(created.name)
        #expect(cgroups.cgroupNames().isEmpty, "removed once released and empty")
    }
}
