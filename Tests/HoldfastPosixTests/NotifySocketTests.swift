import HoldfastProtocol
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

@Suite("NotifySocket: sd_notify datagrams without libsystemd", .timeLimit(.minutes(5)))
struct NotifySocketTests {
    @Test func aDatagramReachesASocketFile() async throws {
        let directory = try TemporaryDirectory("holdfast-notify")
        defer { directory.remove() }
        let listener = try NotifyListener(path: directory.file("notify.sock"))
        let address = try #require(try ServiceNotify.Address.parse(listener.notifySocket).get())
        let socket = try NotifySocket(address: address)
        try await socket.send([.ready, .status("Ready: both roles up")])
        try await socket.send([.watchdog])
        #expect(listener.messages == ["READY=1\nSTATUS=Ready: both roles up", "WATCHDOG=1"], "one datagram per message, in order")
    }

    @Test func aDatagramReachesAnAbstractName() async throws {
        let name = "@holdfast-test-notify-\(getpid())"
        let listener = try NotifyListener(path: name)
        let socket = try NotifySocket(address: try #require(try ServiceNotify.Address.parse(name).get()))
        try await socket.send([.stopping])
        #expect(listener.messages == ["STOPPING=1"])
    }

    @Test func nobodyListeningIsAnErrorNotACrashOrAHang() async throws {
        let directory = try TemporaryDirectory("holdfast-notify")
        defer { directory.remove() }
        let socket = try NotifySocket(address: .path(directory.file("nobody.sock")))
        await #expect(throws: SystemError.self) { try await socket.send([.ready]) }
    }
}
