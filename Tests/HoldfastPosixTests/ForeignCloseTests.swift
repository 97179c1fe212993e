import CHoldfastShims
import HoldfastCore
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// fds that come from outside Holdfast are closed where a close may wait, never on the loop.
@Suite("Foreign fds close off the loop", .timeLimit(.minutes(3)))
struct ForeignCloseTests {
    /// A TCP socket whose last close waits `linger` seconds: SO_LINGER set, its send queue full
    /// towards a peer on loopback that never reads (held open in `peer` until the test ends).
    static func lingeringSocket(lingering seconds: Int32) throws -> (socket: Int32, peer: Int32, listener: Int32) {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var small: Int32 = 4096
        setsockopt(listener, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
        #expect(listen(listener, 1) == 0)
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        setsockopt(client, SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let connected = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(connected == 0, "errno \(errno)")
        let peer = accept(listener, nil, nil)
        #expect(peer >= 0)
        // Fill the send queue (the peer's window closes: nothing it holds is ever read).
        var chunk = [UInt8](repeating: 0x55, count: 65536)
        var sent = 0
        while sent < 64 << 20 {
            let count = chunk.withUnsafeMutableBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if count <= 0 { break }
            sent += count
        }
        var option = linger(l_onoff: 1, l_linger: seconds)
        #expect(setsockopt(client, SOL_SOCKET, SO_LINGER, &option, socklen_t(MemoryLayout<linger>.size)) == 0)
        return (client, peer, listener)
    }

    /// A process sends a lingering socket over its own stdout (a Unix socket a runtime handed
    /// over): the relay's read takes the fd and a closer thread closes it, so the loop never
    /// waits on its release. Before, the read had no control buffer: the kernel let go of the
    /// fd inside the recvmsg, on the loop's thread, which waited out the linger (the watchdog
    /// took over; 64 such messages stranded every spare thread and stopped every stream).
    @Test func aSocketSentOverARelayedStdoutIsClosedOffTheLoop() async throws {
        let reactor = try Reactor(stallLimit: .seconds(2))
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        let ours = try AsyncFD(adopting: pair[0], reactor: reactor, foreignDescription: true)
        defer { ours.close() }
        let process = pair[1]
        defer { close(process) }
        let lingering = try Self.lingeringSocket(lingering: 60)
        defer { close(lingering.listener) }
        var peerOpen = true
        defer { if peerOpen { close(lingering.peer) } }

        // "hello" with the socket attached; the process lets go of its own copy.
        let hello = Array("hello".utf8)
        var fd = lingering.socket
        let sent = hello.withUnsafeBytes { hf_send_with_fds(process, $0.baseAddress, $0.count, &fd, 1) }
        #expect(sent == 5)
        close(lingering.socket)

        let before = ForeignCloser.outstanding
        let read = Task(executorPreference: reactor) { () -> [UInt8] in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 1)
            defer { buffer.deallocate() }
            let count = try await ours.read(into: buffer)
            return Array(buffer[..<count])
        }
        #expect(try await withTimeout("the read", .seconds(30)) { try await read.value } == hello)
        // The close waits on a closer thread (its linger: the peer reads nothing)...
        try await eventually("the socket's close under way on a closer thread") { ForeignCloser.outstanding > before }
        // ...and the loop goes on: bytes sent after it are read, with no takeover.
        let more = Array("more".utf8)
        #expect(more.withUnsafeBytes { write(process, $0.baseAddress, $0.count) } == 4)
        let again = Task(executorPreference: reactor) { () -> [UInt8] in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 1)
            defer { buffer.deallocate() }
            let count = try await ours.read(into: buffer)
            return Array(buffer[..<count])
        }
        #expect(try await withTimeout("the next read", .seconds(30)) { try await again.value } == more)
        // Longer than the stall limit: a loop stuck in the close would have been taken over.
        try await Task.sleep(for: .seconds(3))
        #expect(reactor.stalls == 0, "the loop never waited on the close")
        // The peer closes with bytes unread (a reset): the lingering close returns.
        close(lingering.peer)
        peerOpen = false
        try await eventually("the closer thread free again") { ForeignCloser.outstanding == before }
    }
}
