import CHoldfastShims
import Dispatch
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A process's side of its stdio is a file description other processes may hold too, and any of
/// them can clear its O_NONBLOCK after the broker set it. An `AsyncFD` adopted with
/// `foreignDescription` must not depend on that flag: each read and write asks for non-blocking
/// itself, and a splice that would wait on such a socket is not made.
@Suite("An fd whose description another holder makes blocking", .timeLimit(.minutes(1)))
struct ForeignDescriptionTests {
    /// What the broker's one I/O thread would have done: returned, or waited in the kernel.
    enum Outcome<T: Sendable>: Sendable {
        case returned(T)
        case waited
    }

    /// Runs `body` on a thread of its own. If it has not returned after 2 s, `unblock` (a byte
    /// written, a pipe drained) lets it return, so the test fails rather than hangs.
    static func call<T: Sendable>(_ body: @escaping @Sendable () throws -> T, unblock: () -> Void) throws -> Outcome<T> {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: Result<T, any Error>?
        DispatchQueue.global().async {
            result = Result { try body() }
            done.signal()
        }
        if done.wait(timeout: .now() + 2) == .success { return .returned(try result!.get()) }
        unblock()
        done.wait()
        return .waited
    }

    /// Clears O_NONBLOCK on the description `fd` shares: what another holder's fcntl does.
    static func makeBlocking(_ fd: Int32) {
        let copy = dup(fd)
        _ = fcntl(copy, F_SETFL, fcntl(copy, F_GETFL) & ~O_NONBLOCK)
        close(copy)
        #expect(fcntl(fd, F_GETFL) & O_NONBLOCK == 0, "the description is blocking now")
    }

    enum Transport: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case pipe, unixSocket
        var testDescription: String { rawValue }

        /// (read end, write end), both blocking as created.
        func make() throws -> (read: Int32, write: Int32) {
            switch self {
            case .pipe:
                let ends = try PipeEnds.make()
                return (ends.read, ends.write)
            case .unixSocket:
                var fds: [Int32] = [-1, -1]
                guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                    throw SystemError.last("socketpair")
                }
                return (fds[0], fds[1])
            }
        }
    }

    @Test(arguments: Transport.allCases)
    func aReadOfNothingReturnsAtOnce(transport: Transport) throws {
        let (readEnd, writeEnd) = try transport.make()
        defer { close(writeEnd) }
        let reader = try AsyncFD(adopting: readEnd, foreignDescription: true)
        defer { reader.close() }
        Self.makeBlocking(readEnd)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
        defer { buffer.deallocate() }
        nonisolated(unsafe) let target = buffer
        let single = try Self.call({ try reader.readNow(into: target) }, unblock: { _ = write(writeEnd, "x", 1) })
        guard case .returned(let count) = single else {
            Issue.record("read(2) waited in the kernel for a byte")
            return
        }
        #expect(count == nil, "nothing to read: EAGAIN")
        let halves = [UnsafeMutableRawBufferPointer(rebasing: target[..<2048]), UnsafeMutableRawBufferPointer(rebasing: target[2048...])]
        nonisolated(unsafe) let vectors = halves
        let vectored = try Self.call({ try reader.readNow(into: vectors) }, unblock: { _ = write(writeEnd, "x", 1) })
        guard case .returned(let vectoredCount) = vectored else {
            Issue.record("readv(2) waited in the kernel for a byte")
            return
        }
        #expect(vectoredCount == nil)
        // And bytes are still read as they come.
        #expect(write(writeEnd, "abc", 3) == 3)
        #expect(try reader.readNow(into: target) == 3)
        #expect(Array(target[..<3]) == Array("abc".utf8))
    }

    @Test(arguments: Transport.allCases)
    func aWriteWithoutRoomReturnsAtOnce(transport: Transport) throws {
        let (readEnd, writeEnd) = try transport.make()
        defer { close(readEnd) }
        let writer = try AsyncFD(adopting: writeEnd, foreignDescription: true)
        defer { writer.close() }
        let chunk = [UInt8](repeating: 7, count: 65536)
        var filled = 0
        while let count = try chunk.withUnsafeBytes({ try writer.writeNow($0) }), count > 0 { filled += count }
        #expect(filled > 0)
        Self.makeBlocking(writeEnd)
        let drain = {
            _ = fcntl(readEnd, F_SETFL, fcntl(readEnd, F_GETFL) | O_NONBLOCK)
            var sink = [UInt8](repeating: 0, count: 65536)
            while read(readEnd, &sink, sink.count) > 0 {}
        }
        let outcome = try Self.call({ try chunk.withUnsafeBytes { try writer.writeNow($0) } }, unblock: drain)
        guard case .returned(let count) = outcome else {
            Issue.record("write(2) waited in the kernel for room")
            return
        }
        #expect(count == nil, "no room: EAGAIN")
    }

    /// A splice into a socket waits for room as the socket's description says, SPLICE_F_NONBLOCK
    /// or not: one into a foreign socket is answered as unspliceable (the caller copies), and
    /// a socket of ours still splices.
    @Test func aForeignSocketIsNeverSplicedInto() throws {
        let (socketRead, socketWrite) = try Transport.unixSocket.make()
        defer { close(socketRead) }
        let pipe = try PipeEnds.make()
        defer { close(pipe.write) }
        let source = try AsyncFD(adopting: pipe.read)
        defer { source.close() }
        #expect(write(pipe.write, "abc", 3) == 3)
        let foreign = try AsyncFD(adopting: socketWrite, foreignDescription: true)
        #expect(try foreign.spliceOnce(from: source, limit: 3) == (-1, EINVAL))
        #expect(!foreign.spliceNeverWaits(asSource: false))
        // Nor out of one: a splice out of a Unix socket lets go of the fds its messages carry
        // inside the call, and their releases can wait (`ForeignCloseTests`).
        #expect(!foreign.spliceNeverWaits(asSource: true), "bytes out of a foreign socket are copied, its fds taken")
        foreign.close()
        let (ourRead, ourWrite) = try Transport.unixSocket.make()
        defer { close(ourRead) }
        let ours = try AsyncFD(adopting: ourWrite)
        defer { ours.close() }
        #expect(try ours.spliceOnce(from: source, limit: 3) == (3, 0))
    }
}
