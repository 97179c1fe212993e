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

/// No pseudo-terminal left in the guest: a guest process can open /dev/ptmx until the kernel's
/// `pty.max` (4,096) is used up. The daemon runs here in a mount namespace of its own with a
/// devpts instance of two terminals (the machine's are not touched), so the test uses them up
/// alone.
@Suite("No pseudo-terminal left: a terminal create refused saying why, the rest goes on", .timeLimit(.minutes(3)))
struct TerminalLimitTests {
    static var canRun: Bool { DaemonFixture.canRun && access("/usr/bin/unshare", X_OK) == 0 }

    @Test(.enabled(if: TerminalLimitTests.canRun, "needs root and unshare(1)"))
    func aTerminalCreateWithNoTerminalLeftIsRefusedAndNothingElseSuffers() async throws {
        let wrapper = try TemporaryDirectory("holdfast-devpts")
        defer { wrapper.remove() }
        let script = wrapper.file("holdfast-in-devpts")
        try writeFile(script, bytes("""
            #!/bin/sh
            exec unshare -m /bin/sh -c 'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,max=2 devpts /dev/pts && mount --bind /dev/pts/ptmx /dev/ptmx && exec "$0" "$@"' \(holdfastExecutable()) "$@"

            """))
        chmod(script, 0o755)
        let daemon = try await DaemonFixture(executable: script)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let gate = daemon.directory.file("go")
        func terminal(_ id: String) -> ProcessSpec {
            ProcessSpec(
                id: id, argv: ["sh", "-c", "while [ ! -e \(gate) ]; do sleep 0.02; done; echo \(id) done"], tty: true,
                stdout: daemon.spec("\(id)-out"))
        }
        let outputs = try ["t1", "t2", "t3"].map { Accumulator(try daemon.streams.open(token: bytes("\($0)-out"), direction: .receive)) }
        let counter = Accumulator(try daemon.streams.open(token: bytes("count-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "count", argv: counterCommand(200), stdout: daemon.spec("count-out")))
        _ = try await daemon.bridge.create(terminal("t1"))
        _ = try await daemon.bridge.create(terminal("t2"))
        let before = await settledDescriptorTable(pid: daemon.daemonPID).count
        do {
            let pid = try await daemon.bridge.create(terminal("t3"))
            Issue.record("a third terminal in a devpts of two: pid \(pid)")
        } catch {
            #expect(error.code == .stdioFailed, "\(error)")
            #expect(error.message.contains("every pseudo-terminal of the guest is in use"), "\(error)")
        }
        // At most as many as before, once settled: the counter's stream and the creates' own
        // work may hold an fd for a moment on either reading (a loaded clone run once read one
        // of those into the count after the refusal).
        var after = 0
        do {
            try await eventually("nothing of the refused create left open", timeout: .seconds(10)) {
                after = await settledDescriptorTable(pid: daemon.daemonPID).count
                return after <= before
            }
        } catch {
            Issue.record("the supervisor's fds: \(before) before the refused create, \(after) after")
        }
        try await eventually("the counter's every line, meanwhile") { counter.count == expectedLines(200).count }
        #expect(counter.text == String(decoding: expectedLines(200), as: UTF8.self))
        try writeFile(gate, [])
        try await eventually("both terminals' exits") { exits.count("t1") == 1 && exits.count("t2") == 1 }
        // Their terminals are free again: the same create goes through.
        _ = try await daemon.bridge.create(terminal("t3"))
        try await eventually("the third terminal's exit") { exits.count("t3") == 1 }
        for (index, output) in outputs.enumerated() {
            try await eventually("t\(index + 1)'s line") { output.text.contains("\n") }
            #expect(output.text == "t\(index + 1) done\n", "\(output.text)")
        }
        #expect(try await daemon.stop() == .exited(0))
    }
}
