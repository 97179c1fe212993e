import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

extension BridgeTests {
    /// 800 processes created over the bridge are killed during one blackout: more exits than a
    /// hello has room for (half a frame: some 600). The hello carries the oldest; the rest go
    /// out as `exit` notifications once the bridge is up — the ones the hello recorded it left
    /// out. Every exit reaches the host, once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func moreExitsThanAHelloHoldsEachReachTheHostOnce() async throws {
        try await withBridgeDaemon { daemon, exits in
            let count = 800
            var pids: [Int32] = []
            for index in 0..<count {
                pids.append(try await daemon.bridge.create(ProcessSpec(id: "many-\(index)", argv: ["sleep", "3600"])))
            }
            blackout(daemon)
            for pid in pids { kill(pid, SIGKILL) }
            // Reaped by the supervisor (which records each exit as it reaps it).
            try await eventually("every process reaped in the dark", timeout: .seconds(60)) { pids.allSatisfy { kill($0, 0) != 0 } }
            // And each exit recorded, owed to the host (logged as it is queued): reaped is not
            // yet recorded, and on a loaded machine the hello came before most were (it then
            // carried fewer, and the path past the hello went untried).
            try await eventually("every exit recorded in the dark", timeout: .seconds(60)) {
                daemon.log.split(separator: "\n").filter { $0.contains("process exited") && $0.contains("process=many-") }.count == count
            }
            #expect(exits.all.isEmpty, "nothing reaches the host in the dark")
            lightsOn(daemon)
            try await eventually("every exit at the host", timeout: .seconds(60)) { Set(exits.all.map(\.id)).count == count }
            try await Task.sleep(for: .milliseconds(500))
            let ids = exits.all.map(\.id)
            #expect(ids.count == count && Set(ids).count == count, "each exit once: \(ids.count) reports of \(Set(ids).count) processes")
            #expect(exits.all.allSatisfy { $0.signal == SIGKILL })
            let hello = try #require(daemon.bridge.lastHello)
            #expect(hello.exits.count > 100 && hello.exits.count < count, "the hello carried \(hello.exits.count) of \(count) exits")
            print("\(count) exits in one blackout: \(hello.exits.count) in the hello, the rest sent after it; each reached the host once")
            #expect(try await daemon.stop() == .exited(0))
        }
    }
}
