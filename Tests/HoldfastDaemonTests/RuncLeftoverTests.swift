import Foundation
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// runc containers are in no cgroup of ours: what a crashed daemon, or a create still under way
/// when a stop ended, leaves in runc's state directory is ended by Holdfast itself — only what
/// it recorded making (`runc.root` may be shared) — and its ids are free again.
@Suite("runc: no container outlives the daemon that started it", .serialized, .timeLimit(.minutes(3)))
struct RuncLeftoverTests {
    static let enabled = DaemonFixture.canRun && TestBundle.canRun

    func runcList(_ daemon: DaemonFixture) throws -> [String] {
        let text = try commandOutput(["runc", "--root", daemon.directory.file("runc"), "list", "-q"], in: daemon.directory)
        return text.split(separator: "\n").map(String.init)
    }

    /// A crash (SIGKILL of the supervisor) leaves its runc containers running, reparented, in
    /// runc's state directory. Before, they ran on for ever, nobody holding their stdio, and a
    /// create with the same id failed ("container with id exists"). Now the next daemon ends
    /// them when it starts, says so, and the id serves a new container.
    @Test(.enabled(if: enabled, "needs root, runc and busybox-static"))
    func aRestartedDaemonEndsTheContainersACrashedOneLeft() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let bundle = try TestBundle(in: daemon.directory, name: "sleeper", args: ["sleep", "1000"], terminal: false)
        let pid = try await daemon.launch(ProcessSpec(id: "leftover-r", argv: [], runtime: .runc, bundle: bundle.path))
        let container = try #require(ProcessIdentity(pid), "the container's init runs")
        defer { if container.isAlive { kill(container.pid, SIGKILL) } }
        // Another tool's container in the same state directory (`runc.root` set to a shared
        // one): not Holdfast's to end.
        let root = daemon.directory.file("runc")
        let foreignBundle = try TestBundle(in: daemon.directory, name: "foreign", args: ["sleep", "1000"], terminal: false)
        #expect(try runCommand(["runc", "--root", root, "create", "--bundle", foreignBundle.path, "leftover-foreign"]) == .exited(0))
        defer { _ = try? runCommand(["runc", "--root", root, "delete", "--force", "leftover-foreign"]) }
        #expect(try runCommand(["runc", "--root", root, "start", "leftover-foreign"]) == .exited(0))
        try await eventually("runc lists both containers", timeout: .seconds(30)) { try self.runcList(daemon).sorted() == ["leftover-foreign", "leftover-r"] }

        kill(daemon.daemonPID, SIGKILL)
        _ = try await daemon.processes.wait(daemon.daemonPID, timeout: .seconds(20))
        #expect(container.isAlive, "a crash leaves the container running")

        try await daemon.startAgain()
        try await eventually("the leftover container ended", timeout: .seconds(30)) { !container.isAlive }
        #expect(try runcList(daemon) == ["leftover-foreign"], "only Holdfast's container deleted")
        try await daemon.waitForLog("ended the runc containers an earlier daemon left")

        // The id is free: a new container by that name runs, and its output arrives.
        let again = try TestBundle(in: daemon.directory, name: "again", args: ["echo", "the id is free"], terminal: false)
        let output = collect(try daemon.streams.open(token: bytes("again-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "leftover-r", argv: [], stdout: daemon.spec("again-out"), runtime: .runc, bundle: again.path))
        #expect(try await withTimeout("the new container's output", .seconds(30)) { await output.value } == Array("the id is free\n".utf8))
        #expect(try await daemon.stop() == .exited(0))
        // Deleted after its exit, and forgotten: nothing for the next start to sweep.
        let records = (try? FileManager.default.contentsOfDirectory(atPath: daemon.directory.file("runc-containers"))) ?? ["unreadable"]
        #expect(records.isEmpty, "records left: \(records)")
    }

    /// A container whose `runc delete` at its exit fails (runc cannot run: no task left, no
    /// inode for its log; here a debug failpoint fails the first two tries) is deleted on a
    /// later try, and its id is free again. Before, the delete was tried once: the container's
    /// state and cgroup stayed, and every create of its id failed "already exists" until the
    /// daemon stopped.
    @Test(
        .enabled(if: enabled, "needs root, runc and busybox-static"),
        .enabled(if: Failpoint.compiledIn, "runc delete fails at a failpoint, which only debug builds have"))
    func aContainerWhoseDeleteFailsIsDeletedOnALaterTry() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.runcDeleteFails):box"])
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(in: daemon.directory, name: "short", args: ["true"], terminal: false)
        _ = try await daemon.bridge.create(ProcessSpec(id: "box", argv: [], runtime: .runc, bundle: bundle.path))
        try await eventually("the container's exit", timeout: .seconds(30)) { exits.count("box") == 1 }
        try await daemon.waitForLog("runc delete failed: tried again")
        try await withDeadline("the delete's later try", .seconds(30)) { try await daemon.waitForLog("runc delete went through on a later try") }
        #expect(try runcList(daemon).isEmpty, "deleted")
        // The id is free: a new container by that name runs.
        let again = try TestBundle(in: daemon.directory, name: "again", args: ["echo", "the id is free"], terminal: false)
        let output = collect(try daemon.streams.open(token: bytes("box-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "box", argv: [], stdout: daemon.spec("box-out"), runtime: .runc, bundle: again.path))
        #expect(try await withTimeout("the new container's output", .seconds(30)) { await output.value } == Array("the id is free\n".utf8))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A runc create still under way when the stop's drains end (an OCI hook that hangs, as a
    /// network hook waiting for its server would). Before, the daemon exited and runc went on:
    /// once the hook ended, the container was created, after the daemon, never started, never
    /// deleted, its id taken. Now the stop ends runc's command (and its hook) at the drains'
    /// end and deletes what it made.
    @Test(.enabled(if: enabled, "needs root, runc and busybox-static"))
    func aCreateStillUnderWayWhenTheStopEndsLeavesNoContainer() async throws {
        // Drains end 3 s after the stop (timeout 4 s less its last second for the exits).
        let daemon = try await DaemonFixture(shutdown: ("1s", "4s"))
        defer { daemon.cleanUp() }
        let bundle = try TestBundle(in: daemon.directory, name: "hooked", args: ["sleep", "1000"], terminal: false)
        let hookPIDFile = daemon.directory.file("hook.pid")
        // The hook would run for a quarter of an hour: ended, it was ended by the stop (no
        // time of the stop's is asserted; a hook of 8 s and a stop bound of 7 s measured load).
        try Self.addHook(to: bundle, script: "echo $$ > \(hookPIDFile); exec sleep 900")
        let create = Task { try await daemon.bridge.create(ProcessSpec(id: "leftover-h", argv: [], runtime: .runc, bundle: bundle.path)) }
        var hookPID: pid_t = 0
        try await eventually("the hook started", timeout: .seconds(30)) {
            hookPID = readFile(hookPIDFile).flatMap { pid_t(String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
            return hookPID > 0
        }
        let hook = try #require(ProcessIdentity(hookPID), "the hook runs")
        defer { if hook.isAlive { kill(hook.pid, SIGKILL) } }

        #expect(kill(daemon.daemonPID, SIGTERM) == 0)
        let status = try await daemon.processes.wait(daemon.daemonPID, timeout: .seconds(30))
        print("a stop with a runc create under way: the daemon \(status)")
        #expect(status == .exited(0))
        // The hook (15 minutes) would still run: it ended with runc's command (waited for: a
        // signalled process may take a moment to be gone on a loaded machine).
        try await eventually("the hook ended with runc's command") { !hook.isAlive }
        // Failed, and told so by the stopping daemon: the worker wrote the answer before it was
        // stopped (`finishTheBridge`). Before, in about half the runs, the answer was lost with
        // the worker and the host waited out its own timeout (`no-guest` after 30 s).
        let answer = await create.result
        print("the create: \(answer)")
        expectAnsweredShuttingDown(answer)
        // The hook ended, runc's create failed at it and cannot go on to make the container:
        // what it had made is undone (runc's own clean-up; waited for, as a loaded machine's
        // runc may finish it after the stop's bounded wait).
        try await eventually("no container left in runc's state directory") { try runcList(daemon).isEmpty }
        // runc undid its own work: the container's cgroup (the bundle's `cgroupsPath`: at the
        // root of a cgroup v2 hierarchy, or in each v1 one) is gone.
        let hierarchies = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/cgroup")) ?? []
        let left = (["/sys/fs/cgroup" + bundle.cgroupsPath] + hierarchies.map { "/sys/fs/cgroup/\($0)" + bundle.cgroupsPath })
            .filter { (path: String) in access(path, F_OK) == 0 }
        #expect(left.isEmpty, "the container's cgroups left: \(left)")
        try await daemon.waitForLog("a create was still under way when the drains ended")
    }

    /// Adds a `createRuntime` hook (run by `runc create` in the guest's namespaces) that runs
    /// `script` with sh.
    static func addHook(to bundle: TestBundle, script: String) throws {
        let configPath = bundle.path + "/config.json"
        let written = try #require(readFile(configPath))
        var config = try #require(try JSONSerialization.jsonObject(with: Data(written)) as? [String: Any])
        config["hooks"] = ["createRuntime": [["path": "/bin/sh", "args": ["sh", "-c", script]]]]
        try writeFile(configPath, Array(try JSONSerialization.data(withJSONObject: config)))
    }
}
