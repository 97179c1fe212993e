import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's binary in a directory of its own, replaced there the way a package upgrade
/// replaces /usr/bin/holdfast (a new file renamed over the path): each `install` puts a copy of
/// the built binary with distinct bytes appended (an ELF file with trailing bytes still runs),
/// so every upgrade lands on a binary with another sha256.
struct InstalledBinary {
    let directory: TemporaryDirectory
    let path: String
    let original: [UInt8]

    init() throws {
        directory = try TemporaryDirectory("holdfast-binary")
        chmod(directory.path, 0o755)
        path = directory.file("holdfast")
        original = try #require(readFile(holdfastExecutable()))
        try replace(with: original, mode: 0o755)
    }

    /// A new file at the path, as dpkg does: written aside, then renamed over it.
    func replace(with bytes: [UInt8], mode: mode_t) throws {
        let aside = directory.file(".holdfast.new")
        try writeFile(aside, bytes, mode: mode)
        chmod(aside, mode)
        #expect(rename(aside, path) == 0)
    }

    /// The built binary with `variant`'s bytes appended; returns its sha256.
    @discardableResult
    func install(variant: Int) throws -> String {
        let bytes = original + Array("\nholdfast test build \(variant)\n".utf8)
        try replace(with: bytes, mode: 0o755)
        return sha256Hex(bytes)
    }

    func remove() { directory.remove() }
}

/// `holdfast upgrade --socket` against the fixture's daemon: its exit status and what it said.
func runUpgrade(_ daemon: DaemonFixture, processes: TestProcesses) async throws -> (status: HoldfastPosix.ExitStatus, output: String) {
    let outputPath = daemon.directory.file("upgrade-\(UInt64.random(in: 0...UInt64.max)).out")
    let out = open(outputPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    defer { unlink(outputPath) }
    let pid = try processes.start(
        [holdfastExecutable(), "upgrade", "--socket", daemon.directory.file("control.sock")], stdout: out, stderr: out)
    close(out)
    let status = try await processes.wait(pid, timeout: .seconds(90))
    return (status, String(decoding: readFile(outputPath) ?? [], as: UTF8.self))
}

@Suite("Live upgrade: a new binary takes over running processes with nothing lost", .serialized, .timeLimit(.minutes(5)))
struct LiveUpgradeTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func oneUpgradeKeepsThePidTheProcessAndEveryByte() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let copy = daemon.directory.file("stdin.copy")
        let output = collect(try daemon.streams.open(token: bytes("u-out"), direction: .receive))
        let input = try daemon.streams.open(token: bytes("u-in"), direction: .send)
        let pid = try await daemon.bridge.create(ProcessSpec(
            id: "u", argv: ["sh", "-c", "exec 3<&0; cat <&3 > \(copy) & exec 3<&-; i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo line $i; [ $((i % 50)) -ne 0 ] || sleep 0.02; done; wait"],
            stdin: daemon.spec("u-in"), stdout: daemon.spec("u-out")))
        let before = try await daemon.status()
        let instance = try #require(daemon.bridge.lastHello?.instanceID)
        let typist = NumberedTypist { try await input.send($0) }
        try await Task.sleep(for: .milliseconds(300))
        let sha = try binary.install(variant: 1)
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)\n\(daemon.log.suffix(4000))")
        let after = try await daemon.status()
        #expect(after.pid == before.pid, "the same supervisor")
        #expect(after.upgrades == 1)
        #expect(after.executableSHA256 == sha, "the new binary runs")
        #expect(after.processes.first { $0.id == "u" }?.pid == pid)
        do {
            try await eventually("the bridge back", timeout: .seconds(30)) { daemon.bridge.lastHello?.upgrades == 1 }
        } catch {
            Issue.record("hello: \(String(describing: daemon.bridge.lastHello))\n\(daemon.log.suffix(8000))")
            throw error
        }
        #expect(daemon.bridge.lastHello?.instanceID == instance, "the same instance: an upgrade, not a restart")
        try await Task.sleep(for: .milliseconds(300))
        let sent = await typist.stop()
        #expect(await input.finish() == 0)
        let report = try await withTimeout("the exit", .seconds(60)) { try await daemon.wait("u") }
        #expect(report.exitCode == 0 && report.lost == nil && report.inputRepeated == nil, "\(report)")
        #expect(await output.value == expectedLines(3000), "every output byte once, in order")
        try await eventually("cat's copy complete", timeout: .seconds(20)) { (readFile(copy) ?? []).count >= sent.count }
        #expect(readFile(copy) == sent, "stdin exact: \(sent.count) bytes")
        print("one live upgrade: \(upgrade.output)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
