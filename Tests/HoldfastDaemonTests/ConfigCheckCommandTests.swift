import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("holdfast config check, as the user runs it", .timeLimit(.minutes(5)))
struct ConfigCheckCommandTests {
    func run(_ arguments: [String], environment: [String] = []) async throws -> (status: HoldfastPosix.ExitStatus, out: String, err: String) {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory("holdfast-config-cli")
        defer { directory.remove() }
        let out = open(directory.file("out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let err = open(directory.file("err"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start(
            [holdfastExecutable(), "config", "check"] + arguments, stdout: out, stderr: err,
            environment: SpawnOptions.inheritedEnvironment().filter { !$0.hasPrefix("HOLDFAST_") } + environment)
        close(out)
        close(err)
        let status = try await processes.wait(pid, timeout: .seconds(20))
        return (
            status, String(decoding: readFile(directory.file("out")) ?? [], as: UTF8.self),
            String(decoding: readFile(directory.file("err")) ?? [], as: UTF8.self)
        )
    }

    @Test func aGoodFilePrintsEveryKeyAndExitsZero() async throws {
        let result = try await run(["config/holdfast.yaml"], environment: ["HOLDFAST_BROKER_USER=nobody"])
        #expect(result.status == .exited(0), "\(result.err)")
        #expect(result.out.hasPrefix("config/holdfast.yaml: valid\n"))
        for key in ["run_directory", "bridge.address", "broker.user", "handoff.allowed_gids", "streams.ring_capacity", "control.socket"] {
            #expect(result.out.contains("\n\(key) "), "\(key) is listed")
        }
        #expect(result.out.contains("environment (HOLDFAST_BROKER_USER)"))
        #expect(result.err.isEmpty)
    }

    @Test func aBadFileNamesFileKeyAndReasonAndExitsTwo() async throws {
        let directory = try TemporaryDirectory("holdfast-config-cli")
        defer { directory.remove() }
        let path = directory.file("bad.yaml")
        try writeFile(path, bytes("bridge:\n  address: vsock://x:5\n"))
        let result = try await run([path])
        #expect(result.status == .exited(2))
        #expect(result.out.isEmpty)
        #expect(result.err == "holdfast: \(path): bridge.address: 'vsock://x:5': the CID must be a number (0-4294967295), 'host' or 'any'\n")
        let json = try await run(["--json", path])
        #expect(json.status == .exited(2))
        #expect(json.out.contains(#""valid":false"#) && json.out.contains(#""key":"bridge.address""#), "\(json.out)")
    }
}
