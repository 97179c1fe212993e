import Foundation
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

/// An OCI bundle made here: a rootfs of Debian's busybox-static with a few applet links, and the
/// config `runc spec` writes, with the process's args and terminal flag set.
struct TestBundle {
    let path: String
    /// The container's cgroup (`linux.cgroupsPath`), under each hierarchy's root: one of this
    /// bundle's own, named after the test's directory and the bundle. runc's default is the
    /// container's id (`/box`), which tests run at once share when they name their containers
    /// alike: their processes met in one cgroup, and one test's `runc delete` acted on the other's.
    let cgroupsPath: String

    static let applets = ["sh", "echo", "cat", "sleep", "stty", "seq", "ls", "printf", "true", "head", "read"]

    /// `hostPIDNamespace`: the bundle leaves the pid namespace out (the container shares the
    /// guest's, as `--pid=host` does elsewhere).
    init(in directory: TemporaryDirectory, name: String, args: [String], terminal: Bool, hostPIDNamespace: Bool = false) throws {
        path = directory.file(name)
        // Flat (no parent of its own to remove): runc removes the container's cgroup at its
        // delete, not the directories above it.
        cgroupsPath = "/holdfast-test-\(directory.path.split(separator: "/").last.map(String.init) ?? "bundle")-\(name)"
        let bin = path + "/rootfs/bin"
        for made in [path, path + "/rootfs", bin] { #expect(mkdir(made, 0o755) == 0) }
        try writeFile(bin + "/busybox", try #require(readFile("/bin/busybox")), mode: 0o755)
        for applet in Self.applets { #expect(symlink("busybox", bin + "/" + applet) == 0) }
        #expect(try runCommand(["runc", "spec", "--bundle", path]) == .exited(0))
        let configPath = path + "/config.json"
        let written = try #require(readFile(configPath))
        var config = try #require(try JSONSerialization.jsonObject(with: Data(written)) as? [String: Any])
        var process = try #require(config["process"] as? [String: Any])
        process["args"] = args
        process["terminal"] = terminal
        config["process"] = process
        var linux = try #require(config["linux"] as? [String: Any])
        linux["cgroupsPath"] = cgroupsPath
        if hostPIDNamespace {
            let namespaces = try #require(linux["namespaces"] as? [[String: Any]])
            linux["namespaces"] = namespaces.filter { $0["type"] as? String != "pid" }
        }
        config["linux"] = linux
        try writeFile(configPath, Array(try JSONSerialization.data(withJSONObject: config)))
    }

    static var canRun: Bool { access("/bin/busybox", X_OK) == 0 && (try? runCommand(["runc", "--version"])) == .exited(0) }

    /// Gives the container's process `capabilities` too (bounding, effective and permitted sets),
    /// and the guest's /usr (read-only; `lib` and `lib64` link into it, as on a merged-/usr
    /// Debian), for programs busybox does not have.
    func addCapabilitiesAndTheGuestsUsr(_ capabilities: [String]) throws {
        for link in ["lib", "lib64"] { #expect(symlink("usr/" + link, path + "/rootfs/" + link) == 0) }
        let configPath = path + "/config.json"
        let written = try #require(readFile(configPath))
        var config = try #require(try JSONSerialization.jsonObject(with: Data(written)) as? [String: Any])
        var process = try #require(config["process"] as? [String: Any])
        var sets = (process["capabilities"] as? [String: Any]) ?? [:]
        for set in ["bounding", "effective", "permitted"] {
            sets[set] = ((sets[set] as? [String]) ?? []) + capabilities
        }
        process["capabilities"] = sets
        config["process"] = process
        let mounts = (config["mounts"] as? [[String: Any]]) ?? []
        config["mounts"] = mounts + [["destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]]]
        try writeFile(configPath, Array(try JSONSerialization.data(withJSONObject: config)))
    }
}

/// Runs a command to its end with its output discarded.
func runCommand(_ argv: [String]) throws -> HoldfastPosix.ExitStatus {
    var options = SpawnOptions(executable: argv[0], arguments: argv)
    options.stdout = -1
    options.stderr = -1
    let pid = try Spawner.spawn(options)
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return (status & 0x7f) == 0 ? .exited((status >> 8) & 0xff) : .signaled(status & 0x7f)
}

/// What a command prints on stdout.
func commandOutput(_ argv: [String], in directory: TemporaryDirectory) throws -> String {
    let path = directory.file("cmd.\(UInt32.random(in: 0..<UInt32.max))")
    let out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    var options = SpawnOptions(executable: argv[0], arguments: argv)
    options.stdout = out
    options.stderr = -1
    let pid = try Spawner.spawn(options)
    close(out)
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    defer { unlink(path) }
    return String(decoding: readFile(path) ?? [], as: UTF8.self)
}

/// A stream's bytes so far, readable while it still runs.
final class Accumulator: Sendable {
    private let bytes = NIOLockedValueBox<[UInt8]>([])
    private let task: Task<Void, Never>

    init(_ stream: some InboundStream) {
        let bytes = self.bytes
        task = Task {
            for await chunk in stream.chunks() { bytes.withLockedValue { $0 += chunk } }
        }
    }

    var count: Int { bytes.withLockedValue { $0.count } }

    /// The text so far, with a terminal's carriage returns removed.
    var text: String { String(decoding: bytes.withLockedValue { $0 }, as: UTF8.self).replacingOccurrences(of: "\r", with: "") }
}

@Suite("runc: real containers, their stdio through migrations, exec, errors", .timeLimit(.minutes(5)))
struct RuncTests {
    func runcList(_ daemon: DaemonFixture) throws -> [String] {
        let text = try commandOutput(["runc", "--root", daemon.directory.file("runc"), "list", "-q"], in: daemon.directory)
        return text.split(separator: "\n").map(String.init)
    }

    /// A heartbeat container through five migrations: every number once, in order; the exit
    /// arrives once; the container is deleted afterwards.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static")) func aHeartbeatContainerSurvivesFiveMigrations() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(
            in: daemon.directory, name: "heartbeat",
            args: ["sh", "-c", "i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo beat $i; sleep 0.01; done"], terminal: false)
        let stdout = collect(try daemon.streams.open(token: bytes("hb-out"), direction: .receive))
        let stderr = collect(try daemon.streams.open(token: bytes("hb-err"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "hb", argv: [],
            stdout: daemon.spec("hb-out"),
            stderr: daemon.spec("hb-err"),
            runtime: .runc, bundle: bundle.path))
        // runc writes its state after `start` returns: listed once it has (a hang bound).
        try await eventually("runc lists the container", timeout: .seconds(30)) { try self.runcList(daemon) == ["hb"] }
        for _ in 1...5 {
            try await Task.sleep(for: .milliseconds(150))
            blackout(daemon)
            try await Task.sleep(for: .milliseconds(200))
            lightsOn(daemon)
        }
        try await eventually("the exit", timeout: .seconds(30)) { exits.count("hb") == 1 }
        // Hang bounds: a stream given up on under starvation never ends here (fail, do not hang).
        let received = try await withTimeout("the container's stdout", .seconds(60)) { await stdout.value }
        #expect(received == expectedLines(200, prefix: "beat"), "every number once, in order")
        #expect(sha256Hex(received) == sha256Hex(expectedLines(200, prefix: "beat")))
        #expect(try await withTimeout("the container's stderr", .seconds(60)) { await stderr.value }.isEmpty)
        let report = try #require(exits.all.first { $0.id == "hb" })
        #expect(report.exitCode == 0 && report.undelivered == 0)
        try await eventually("runc delete") { try runcList(daemon).isEmpty }
        #expect(exits.all.count == 1)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A tty container: `stty size` inside shows the size the host gave, then the size of a
    /// resize; a line typed during a migration is echoed by the terminal and read by the shell.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static")) func aTtyContainerSeesItsSizeAndResizesAndEchoesThroughAMigration() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(
            in: daemon.directory, name: "tty",
            args: ["sh", "-c", "stty size; read line; echo \"got $line\"; read go; stty size"], terminal: true)
        let output = Accumulator(try daemon.streams.open(token: bytes("t-out"), direction: .receive))
        let input = try daemon.streams.open(token: bytes("t-in"), direction: .send)
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "t", argv: [], tty: true, rows: 30, columns: 100,
            stdin: daemon.spec("t-in"),
            stdout: daemon.spec("t-out"),
            runtime: .runc, bundle: bundle.path))
        try await eventually("the first size", timeout: .seconds(10)) { output.text == "30 100\n" }
        blackout(daemon)
        try await input.send(bytes("hello\n"))  // typed while the host is away
        try await Task.sleep(for: .milliseconds(300))
        lightsOn(daemon)
        try await eventually("the echo and the answer", timeout: .seconds(10)) { output.text == "30 100\nhello\ngot hello\n" }
        try await daemon.bridge.resize("t", rows: 50, columns: 132)
        try await input.send(bytes("go\n"))
        try await eventually("the exit", timeout: .seconds(10)) { exits.count("t") == 1 }
        #expect(output.text == "30 100\nhello\ngot hello\ngo\n50 132\n")
        #expect(exits.all.first { $0.id == "t" }?.exitCode == 0)
        try await eventually("runc delete") { try runcList(daemon).isEmpty }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// runc exec into a running container: the command runs in the container's pid namespace
    /// (its pid 1 is the container's sleep), its output arrives on its own stream, its exit code
    /// comes back; a tty exec gets its size. Then `runc kill` through a bridge signal.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static")) func execRunsInsideTheContainerWithItsOwnStreams() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(in: daemon.directory, name: "sleeper", args: ["sleep", "60"], terminal: false)
        _ = try await daemon.bridge.create(ProcessSpec(id: "box", argv: [], runtime: .runc, bundle: bundle.path))

        let execOut = collect(try daemon.streams.open(token: bytes("x-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "box.x1", argv: ["sh", "-c", "echo pid1 is $(cat /proc/1/comm); exit 5"],
            stdout: daemon.spec("x-out"),
            runtime: .runc, container: "box"))
        try await eventually("the exec's exit", timeout: .seconds(10)) { exits.count("box.x1") == 1 }
        #expect(await execOut.value == bytes("pid1 is sleep\n"))
        #expect(exits.all.first { $0.id == "box.x1" }?.exitCode == 5)

        let ttyOut = collect(try daemon.streams.open(token: bytes("x2-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "box.x2", argv: ["stty", "size"], tty: true, rows: 33, columns: 99,
            stdout: daemon.spec("x2-out"),
            runtime: .runc, container: "box"))
        let sized = String(decoding: await ttyOut.value, as: UTF8.self).replacingOccurrences(of: "\r", with: "")
        #expect(sized == "33 99\n")

        // An exec into something that is not a running container is refused with a code.
        await #expect(throws: HoldfastError.self) {
            _ = try await daemon.bridge.create(ProcessSpec(id: "nope.x", argv: ["true"], runtime: .runc, container: "nope"))
        }
        try await daemon.bridge.signal("box", SIGKILL)  // runc kill
        try await eventually("the container's exit", timeout: .seconds(10)) { exits.count("box") == 1 }
        #expect(exits.all.first { $0.id == "box" }?.exitCode == 128 + SIGKILL)
        try await eventually("runc delete") { try runcList(daemon).isEmpty }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// runc's own errors come back as a coded error with runc's message, and leave nothing
    /// behind: no container in `runc list`, no fd in the supervisor or the broker.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static")) func aBadBundleIsACodedErrorAndLeavesNothingBehind() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let noRootfs = try TestBundle(in: daemon.directory, name: "norootfs", args: ["true"], terminal: false)
        #expect(try runCommand(["rm", "-rf", noRootfs.path + "/rootfs"]) == .exited(0))
        let brokerPID = try #require(try await daemon.rolePID("broker"))
        // One good process and one failed create first, so every lazily opened fd (the runtime's
        // timer fd among them) exists before the baseline; what follows must not add any.
        _ = try await daemon.bridge.create(ProcessSpec(id: "warm", argv: ["true"]))
        _ = try? await daemon.bridge.create(ProcessSpec(id: "warm-runc", argv: [], runtime: .runc, bundle: "/no-such-bundle"))
        try await Task.sleep(for: .milliseconds(300))
        let supervisorBefore = await settledDescriptorTable(pid: daemon.daemonPID)
        let brokerBefore = await settledDescriptorTable(pid: brokerPID)

        for (id, path, needle) in [
            ("missing", daemon.directory.file("no-such-bundle"), "no such file"), ("norootfs", noRootfs.path, "rootfs"),
        ] {
            for tty in [false, true] {
                do {
                    _ = try await daemon.bridge.create(ProcessSpec(
                        id: "\(id)\(tty ? "-tty" : "")", argv: [], tty: tty,
                        stdin: daemon.spec("\(id)-in"),
                        stdout: daemon.spec("\(id)-out"),
                        runtime: .runc, bundle: path))
                    Issue.record("a bad bundle was accepted")
                } catch {
                    #expect(error.code == .runtimeFailed)
                    #expect(error.message.hasPrefix("runc create: "), "\(error.message)")
                    #expect(error.message.contains(needle), "runc's own message: \(error.message)")
                }
            }
        }
        // Bad requests never reach runc.
        for (spec, field) in [
            (ProcessSpec(id: "rel", argv: [], runtime: .runc, bundle: "relative/path"), "bundle"),
            (ProcessSpec(id: "args", argv: ["sh"], runtime: .runc, bundle: "/b"), "argv"),
            (ProcessSpec(id: "bad id!", argv: [], runtime: .runc, bundle: "/b"), "id"),
        ] {
            await #expect {
                _ = try await daemon.bridge.create(spec)
            } throws: { error in
                (error as? HoldfastError)?.code == .badRequest && (error as? HoldfastError)?.message.contains(field) == true
            }
        }
        #expect(try runcList(daemon).isEmpty, "no container left behind")
        do {
            try await eventually("fds back at the baseline") {
                descriptorTable(pid: daemon.daemonPID).count == supervisorBefore.count && descriptorTable(pid: brokerPID).count == brokerBefore.count
            }
        } catch {
            Issue.record("""
                supervisor \(supervisorBefore.count) → \(descriptorTable(pid: daemon.daemonPID).count), new: \(descriptorsAdded(supervisorBefore, descriptorTable(pid: daemon.daemonPID)));
                broker \(brokerBefore.count) → \(descriptorTable(pid: brokerPID).count), new: \(descriptorsAdded(brokerBefore, descriptorTable(pid: brokerPID)))
                """)
        }
        #expect(try await daemon.status().roles.allSatisfy { $0.restarts == 0 })
        #expect(try await daemon.stop() == .exited(0))
    }

    /// From the host CLI, as the README shows it: `host run --runtime runc --bundle` wires the
    /// container's stdout and stderr and exits with its code; `host exec` runs a command in a
    /// running container; a bad bundle is a one-line error, exit code 1.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static")) func hostRunAndHostExecFromTheCommandLine() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        daemon.bridge.close()
        let dir = daemon.directory
        let control = dir.file("host.sock")
        let serveLog = open(dir.file("serve.log"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        _ = try daemon.processes.start(
            [holdfastExecutable(), "host", "serve", "--bridge", "unix:" + dir.file("host-bridge.sock"),
             "--streams", "unix:" + dir.file("host-streams.sock"), "--control", control],
            stdout: serveLog, stderr: serveLog)
        close(serveLog)
        try await eventually("the guest to say hello to host serve", timeout: .seconds(10)) {
            String(decoding: readFile(dir.file("serve.log")) ?? [], as: UTF8.self).contains("guest connected")
        }
        func holdfast(_ arguments: [String], stdin: String = "/dev/null") async throws -> (HoldfastPosix.ExitStatus, String, String) {
            let tag = UInt32.random(in: 0..<UInt32.max)
            let input = open(stdin, O_RDONLY | O_CLOEXEC)
            let out = open(dir.file("o\(tag)"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let err = open(dir.file("e\(tag)"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let pid = try daemon.processes.start([holdfastExecutable()] + arguments, stdin: input, stdout: out, stderr: err)
            close(input)
            close(out)
            close(err)
            let status = try await daemon.processes.wait(pid, timeout: .seconds(30))
            return (
                status, String(decoding: readFile(dir.file("o\(tag)")) ?? [], as: UTF8.self),
                String(decoding: readFile(dir.file("e\(tag)")) ?? [], as: UTF8.self)
            )
        }

        let hello = try TestBundle(
            in: dir, name: "hello", args: ["sh", "-c", "echo out; echo err >&2; exit 4"], terminal: false)
        let (code, out, err) = try await holdfast(["host", "run", "--control", control, "--runtime", "runc", "--bundle", hello.path])
        #expect(code == .exited(4))
        #expect(out == "out\n")
        #expect(err == "err\n")

        let sleeper = try TestBundle(in: dir, name: "sleeper", args: ["sleep", "60"], terminal: false)
        let container = try daemon.processes.start(
            [holdfastExecutable(), "host", "run", "--control", control, "--runtime", "runc", "--bundle", sleeper.path, "--id", "web"])
        try await eventually("the container in host ps", timeout: .seconds(10)) {
            let (_, listing, _) = try await holdfast(["host", "ps", "--control", control])
            return listing.contains("web") && listing.contains("running")
        }
        try writeFile(dir.file("exec.in"), bytes("from the host\n"))
        let (execCode, execOut, execErr) = try await holdfast(
            ["host", "exec", "--control", control, "web", "--", "sh", "-c", "cat; echo pid1=$(cat /proc/1/comm); exit 9"],
            stdin: dir.file("exec.in"))
        #expect(execCode == .exited(9), "\(execErr)")
        #expect(execOut == "from the host\npid1=sleep\n")
        // exec's options: environment, working directory, a numeric user; and the shell's codes
        // for a program the container does not have (127) or cannot execute (126).
        let (optionsCode, optionsOut, optionsErr) = try await holdfast(
            ["host", "exec", "--control", control, "-e", "GREETING=hi", "-w", "/bin", "-u", "1:2", "web", "--",
             "sh", "-c", "echo $GREETING $(pwd); cat /proc/self/status"])
        #expect(optionsCode == .exited(0), "\(optionsErr)")
        let statusLines = optionsOut.split(separator: "\n")
        #expect(statusLines.first == "hi /bin", "\(optionsOut)")
        #expect(statusLines.contains { $0.hasPrefix("Uid:") && $0.split(separator: "\t").dropFirst().first == "1" }, "\(optionsOut)")
        #expect(statusLines.contains { $0.hasPrefix("Gid:") && $0.split(separator: "\t").dropFirst().first == "2" }, "\(optionsOut)")
        let (missingCode, _, missingErr) = try await holdfast(["host", "exec", "--control", control, "web", "--", "no-such-program"])
        #expect(missingCode == .exited(127), "\(missingErr)")
        #expect(missingErr.contains("command-not-found"), "\(missingErr)")
        let (directoryCode, _, directoryErr) = try await holdfast(["host", "exec", "--control", control, "web", "--", "/bin"])
        #expect(directoryCode == .exited(126), "\(directoryErr)")
        // The container's sleep is its pid 1, which ignores SIGTERM: `host stop` gives it
        // --time seconds, then SIGKILL (runc kill), and does not hang.
        let (stopCode, stopOut, stopErr) = try await holdfast(["host", "stop", "--control", control, "--time", "1", "web"])
        #expect(stopCode == .exited(0), "\(stopErr)")
        #expect(stopOut == "web\n")
        #expect(stopErr.contains("web did not exit within 1s of SIGTERM: killed with SIGKILL"), "\(stopErr)")
        #expect(try await daemon.processes.wait(container, timeout: .seconds(10)) == .exited(128 + SIGKILL))

        let (badCode, _, badErr) = try await holdfast(
            ["host", "run", "--control", control, "--runtime", "runc", "--bundle", dir.file("missing")])
        #expect(badCode == .exited(125), "Holdfast's own failure (podman's convention)")
        #expect(badErr.contains("runtime-failed: runc create: "), "\(badErr)")
        #expect(!badErr.contains("Usage"), "a failure is not a usage error")
        try await eventually("runc delete") { try runcList(daemon).isEmpty }
        #expect(try await daemon.stop() == .exited(0))
    }
}
