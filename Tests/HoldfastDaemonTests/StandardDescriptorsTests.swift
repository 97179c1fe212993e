import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// An init that starts the daemon with its stdio closed (some minimal images' init scripts and
/// VM agents do): the first files the daemon opened took fds 0, 1 and 2, so its log lines were
/// written into whatever that was (the checkpoint area, the lock file). Each closed one is now
/// /dev/null from the start, and the daemon serves as before.
@Suite("A daemon started with its stdio closed", .timeLimit(.minutes(3)))
struct StandardDescriptorsTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func closedStdioIsDevNullAndTheDaemonServes() async throws {
        let wrapperDirectory = try TemporaryDirectory()
        defer { wrapperDirectory.remove() }
        chmod(wrapperDirectory.path, 0o755)
        let wrapper = wrapperDirectory.file("closed-stdio")
        try writeFile(wrapper, bytes("#!/bin/sh\nexec \"\(holdfastExecutable())\" \"$@\" 0<&- 1>&- 2>&-\n"))
        chmod(wrapper, 0o755)
        let daemon = try await DaemonFixture(executable: wrapper)
        defer { daemon.cleanUp() }
        let supervisor = daemon.daemonPID
        let broker = try #require(try await daemon.rolePID("broker"))
        for pid in [supervisor, broker] {
            for fd in 0...2 {
                #expect(linkTarget("/proc/\(pid)/fd/\(fd)") == "/dev/null", "pid \(pid) fd \(fd): \(linkTarget("/proc/\(pid)/fd/\(fd)"))")
            }
        }
        let output = collect(try daemon.streams.open(token: bytes("closed-out"), direction: .receive))
        // Through the control socket: its exit is kept for `wait` (over the bridge, the host's
        // acknowledgement could make the guest forget it first).
        _ = try await daemon.launch(ProcessSpec(
            id: "closed", argv: ["sh", "-c", "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo \"line $i\"; done"],
            stdout: daemon.spec("closed-out")))
        #expect(await output.value == expectedLines(300), "every line, once, in order")
        #expect(try await daemon.wait("closed").exitCode == 0)
        #expect(try await daemon.stop() == .exited(0))
    }
}
