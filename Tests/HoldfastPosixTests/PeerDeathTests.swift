import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import Synchronization
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// A role that dies (a broker SIGKILLed) with messages of ours unread in its socket leaves
/// ECONNRESET pending on our end, and a seqpacket socket reports it ahead of the messages the
/// role sent before it died. Everything it said must still be read, then end-of-file: its last
/// notifications are what the supervisor acts on after its death (a `handoff-releasing` lost
/// this way had the next broker relay pipes their runtime already held).
@Suite("A peer that dies with our messages unread: what it sent is read", .timeLimit(.minutes(5)))
struct PeerDeathTests {
    /// A seqpacket pair whose `dying` end has `unread` messages of the survivor's waiting when
    /// it closes, after sending `said`.
    private func pairWhosePeerDied(said: [[UInt8]], unread: Int = 1) throws -> Int32 {
        let (survivor, dying) = try FDChannel.pair()
        for index in 0..<unread { #expect(write(survivor, "unread \(index)", 8) == 8) }
        for message in said {
            #expect(message.withUnsafeBytes { write(dying, $0.baseAddress, $0.count) } == message.count)
        }
        close(dying)
        return survivor
    }

    @Test func aChannelReadsEveryMessageOfAPeerThatDiedThenItsEnd() async throws {
        let said = [bytes("first"), bytes("second"), bytes("third")]
        let channel = FDChannel(try AsyncFD(adopting: try pairWhosePeerDied(said: said, unread: 2)))
        defer { channel.close() }
        var received: [[UInt8]] = []
        while true {
            do {
                received.append(try await channel.receive().payload)
            } catch .endOfFile {
                break
            } catch {
                Issue.record("the channel failed before the peer's messages were read: \(error)")
                break
            }
        }
        #expect(received == said)
    }

    @Test func aSocketReadReadsEveryMessageOfAPeerThatDiedThenItsEnd() async throws {
        // As a runtime's seqpacket socket handed over as a process's stdout reads.
        let said = [bytes("last words"), bytes("really last")]
        let socket = try AsyncFD(adopting: try pairWhosePeerDied(said: said), foreignDescription: true)
        defer { socket.close() }
        var received: [[UInt8]] = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 1)
        defer { buffer.deallocate() }
        while true {
            let count = try await socket.read(into: buffer)
            if count == 0 { break }
            received.append(Array(buffer[..<count]))
        }
        #expect(received == said)
    }

    @Test func aClientHandsOnEveryNotificationOfAPeerThatDied() async throws {
        let notes = (1...3).map { ControlFrame(type: 0x7E10, id: 0, body: bytes("note \($0)")) }
        let (survivor, dying) = try FDChannel.pair()
        let heard = Mutex<[ControlFrame]>([])
        let client = ControlClient(channel: FDChannel(try AsyncFD(adopting: survivor))) { frame in heard.withLock { $0.append(frame) } }
        let role = FDChannel(try AsyncFD(adopting: dying))
        // Ours, unread by the role when it dies.
        try await client.notify(0x7E11, body: bytes("for the role"))
        for note in notes { try await role.send(note.encoded) }
        role.close()
        await client.run()
        #expect(heard.withLock { $0 } == notes)
    }

    /// The same, with a request of ours sent to the dead role before its last notifications
    /// are read (a `status` asks the broker for its list while the supervisor has not yet read
    /// what the dead broker last said): the send fails, and the notifications are still handed
    /// on. Before, the failed send closed the channel and they were thrown away.
    @Test func aRequestThatFailsOnADeadPeerLeavesItsLastNotificationsToBeRead() async throws {
        let notes = (1...3).map { ControlFrame(type: 0x7E10, id: 0, body: bytes("note \($0)")) }
        let (survivor, dying) = try FDChannel.pair()
        let heard = Mutex<[ControlFrame]>([])
        let client = ControlClient(channel: FDChannel(try AsyncFD(adopting: survivor))) { frame in heard.withLock { $0.append(frame) } }
        let role = FDChannel(try AsyncFD(adopting: dying))
        for note in notes { try await role.send(note.encoded) }
        role.close()
        // Not read yet (the client's reader has not started): the request to the dead role fails.
        await #expect(throws: HoldfastError.self) { _ = try await client.request(0x7E12, body: bytes("list")) }
        await client.run()
        #expect(heard.withLock { $0 } == notes, "every notification the role sent before it died")
    }
}
