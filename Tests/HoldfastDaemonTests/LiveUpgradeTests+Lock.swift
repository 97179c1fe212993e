import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The run directory's lock is held across a live upgrade's exec: passed to the new image, not
/// claimed anew. Before, its fd was close-on-exec: from the exec until the new image's claim the
/// lock was free — a second daemon could take the run directory, and the package's purge, whose
/// test for a running daemon is `flock -n` on it, could remove the directory under the daemon.
@Suite("Live upgrade: the run directory stays locked across the exec", .serialized, .timeLimit(.minutes(3)))
struct LiveUpgradeLockTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theRunDirectoryIsLockedWhileTheNewImageStarts() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let (real, standInPath) = try binary.prepareStandIn()
        let daemon = try await DaemonFixture(environment: ["PATH": standInPath], executable: binary.path)
        defer { daemon.cleanUp() }
        let lockFile = daemon.directory.file("holdfast.lock")
        let verdict = daemon.directory.file("flock-verdict")
        // The new image, before it runs: is the lock free? (flock(1) exits 1 when it is held.)
        // No container process runs, so the shell's wait for flock reaps nothing of ours.
        try binary.installStandIn(script: """
                #!/bin/sh
                if [ "$3" = "--resume-from" ]; then
                  flock -n \(lockFile) true; echo $? > \(verdict)
                fi
                exec \(real) daemon "$@"

                """)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        let said = String(decoding: readFile(verdict) ?? [], as: UTF8.self)
        #expect(said == "1\n", "flock -n found the lock held while the new image started (exit 1): \(said.debugDescription)")
        // And after it: held by the same daemon.
        let after = try await daemon.status()
        #expect(after.upgrades == 1)
        #expect(!daemon.log.contains("the run directory's lock was not passed over whole"))
        let probe = try daemon.processes.start(["/usr/bin/flock", "-n", lockFile, "true"])
        #expect(try await daemon.processes.wait(probe, timeout: .seconds(10)) == .exited(1), "still held after the upgrade")
        #expect(try await daemon.stop() == .exited(0))
    }
}
