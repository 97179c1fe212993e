import Foundation
import HoldfastProtocol
import HoldfastTestSupport
import Testing

@testable import HoldfastSupervisor

@Suite("runc exec: the process spec taken from the container's bundle", .timeLimit(.minutes(5)))
struct RuncProcessSpecTests {
    /// Everything the container's process had is kept (capabilities, rlimits up to 2^64-1, the
    /// environment); the exec's args, terminal, console size, user and variables are set.
    @Test func theContainersProcessIsKeptAndTheExecsFieldsSet() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let config = """
            {"ociVersion":"1.0.2","process":{"terminal":false,"user":{"uid":0,"gid":0,"additionalGids":[10]},
             "args":["sh"],"env":["PATH=/bin","A=1"],"cwd":"/",
             "capabilities":{"bounding":["CAP_KILL"]},
             "rlimits":[{"type":"RLIMIT_NOFILE","hard":18446744073709551615,"soft":1024}],
             "noNewPrivileges":true},"root":{"path":"rootfs"}}
            """
        try writeFile(directory.file("config.json"), bytes(config))
        let spec = ProcessSpec(
            id: "x", argv: ["stty", "size"], env: ["A=2", "B=3"], cwd: "/tmp", user: "5:6", tty: true, rows: 33, columns: 99,
            runtime: .runc, container: "box")
        let encoded = try await RuncRuntime.execProcess(bundle: directory.path, spec: spec)
        let process = try #require(try JSONSerialization.jsonObject(with: Data(encoded)) as? [String: Any])
        #expect(process["args"] as? [String] == ["stty", "size"])
        #expect(process["terminal"] as? Bool == true)
        #expect(process["cwd"] as? String == "/tmp")
        #expect(process["env"] as? [String] == ["PATH=/bin", "A=2", "B=3"])
        let size = try #require(process["consoleSize"] as? [String: Any])
        #expect(size["height"] as? Int == 33 && size["width"] as? Int == 99)
        let user = try #require(process["user"] as? [String: Any])
        #expect(user["uid"] as? Int == 5 && user["gid"] as? Int == 6 && user["additionalGids"] as? [Int] == [10])
        #expect((process["capabilities"] as? [String: Any])?["bounding"] as? [String] == ["CAP_KILL"])
        #expect(process["noNewPrivileges"] as? Bool == true)
        #expect(String(decoding: encoded, as: UTF8.self).contains("18446744073709551615"), "a 64-bit rlimit survives exactly")

        var plain = spec
        plain.tty = false
        plain.env = nil
        let second = try #require(
            try JSONSerialization.jsonObject(with: Data(try await RuncRuntime.execProcess(bundle: directory.path, spec: plain))) as? [String: Any])
        #expect(second["consoleSize"] == nil)
        #expect(second["env"] as? [String] == ["PATH=/bin", "A=1"])

        await #expect(throws: HoldfastError.self) { try await RuncRuntime.execProcess(bundle: directory.file("none"), spec: spec) }
    }

    @Test func containerIDsFollowRuncsRule() {
        #expect(RuncRuntime.isValidContainerID("web-1.exec_2+x"))
        #expect(!RuncRuntime.isValidContainerID("bad id"))
        #expect(!RuncRuntime.isValidContainerID("../escape"))
        #expect(!RuncRuntime.isValidContainerID(""))
    }
}
