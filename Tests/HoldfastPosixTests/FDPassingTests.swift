import CHoldfastShims
import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// Every test here counts /proc/self/fd before and after, so each runs in a process of its own.
@Suite("fd passing over SCM_RIGHTS", .timeLimit(.minutes(5)))
struct FDPassingTests {
    func channels() throws -> (FDChannel, FDChannel) {
        let (a, b) = try FDChannel.pair()
        return (FDChannel(try AsyncFD(adopting: a)), FDChannel(try AsyncFD(adopting: b)))
    }

    @Test func passesPipesBothWaysAndTheReceiverOwnsThem() async throws {
        guard try await isolated("passesPipesBothWaysAndTheReceiverOwnsThem") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let before = ownDescriptorCount()
        do {
            let (left, right) = try channels()
            let pipe = try PipeEnds.make()
            try await left.send(bytes("here"), descriptors: [pipe.read, pipe.write])
            close(pipe.read)
            close(pipe.write)
            let message = try await right.receive(maxDescriptors: 4)
            #expect(message.payload == bytes("here"))
            #expect(message.descriptors.count == 2)
            // The received ends work, and are close-on-exec.
            #expect(write(message.descriptors[1], "x", 1) == 1)
            var byte: UInt8 = 0
            #expect(read(message.descriptors[0], &byte, 1) == 1 && byte == UInt8(ascii: "x"))
            #expect(fcntl(message.descriptors[0], F_GETFD) & FD_CLOEXEC != 0)
            message.closeDescriptors()
            left.close()
            right.close()
        }
        // Pipes and refused fds are closed on the reactor's thread, a moment later.
        await reactorClosesDone()
        #expect(ownDescriptorCount() == before, "fds now: \(descriptorTable())")
    }

    @Test func moreDescriptorsThanAskedAreAllClosedAndRefused() async throws {
        guard try await isolated("moreDescriptorsThanAskedAreAllClosedAndRefused") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let before = ownDescriptorCount()
        do {
            let (left, right) = try channels()
            var fds: [Int32] = []
            for _ in 0..<5 { fds.append(open("/dev/null", O_RDONLY | O_CLOEXEC)) }
            try await left.send(bytes("five"), descriptors: fds)
            for fd in fds { close(fd) }
            await #expect(throws: FDPassingError.tooManyDescriptors(received: 5, limit: 2)) {
                try await right.receive(maxDescriptors: 2)
            }
            left.close()
            right.close()
        }
        // Pipes and refused fds are closed on the reactor's thread, a moment later.
        await reactorClosesDone()
        #expect(ownDescriptorCount() == before, "every received fd was closed: \(descriptorTable())")
    }

    @Test func aTruncatedPayloadIsAnErrorAndItsDescriptorsAreClosed() async throws {
        guard try await isolated("aTruncatedPayloadIsAnErrorAndItsDescriptorsAreClosed") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let before = ownDescriptorCount()
        do {
            let (left, right) = try channels()
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            try await left.send([UInt8](repeating: 1, count: 100), descriptors: [fd])
            close(fd)
            await #expect(throws: FDPassingError.payloadTruncated(limit: 10)) {
                try await right.receive(maxPayload: 10)
            }
            left.close()
            right.close()
        }
        // Pipes and refused fds are closed on the reactor's thread, a moment later.
        await reactorClosesDone()
        #expect(ownDescriptorCount() == before, "fds now: \(descriptorTable())")
    }

    @Test func garbagePayloadIsReturnedForTheProtocolToRefuse() async throws {
        // fd passing does not interpret payloads; a garbage message is delivered and the control
        // layer refuses it (tested with the broker). Here: no fds leak either way.
        guard try await isolated("garbagePayloadIsReturnedForTheProtocolToRefuse") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let before = ownDescriptorCount()
        do {
            let (left, right) = try channels()
            try await left.send([0xFF, 0x00, 0x13, 0x37])
            let message = try await right.receive()
            #expect(message.payload == [0xFF, 0x00, 0x13, 0x37])
            #expect(message.descriptors.isEmpty)
            left.close()
            right.close()
        }
        // Pipes and refused fds are closed on the reactor's thread, a moment later.
        await reactorClosesDone()
        #expect(ownDescriptorCount() == before, "fds now: \(descriptorTable())")
    }

    @Test func aPeerClosingMidMessageIsEndOfFile() async throws {
        guard try await isolated("aPeerClosingMidMessageIsEndOfFile") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let before = ownDescriptorCount()
        do {
            // A stream socket: the peer sends half a frame and closes.
            var fds: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
            let receiver = FDChannel(try AsyncFD(adopting: fds[0]))
            _ = write(fds[1], "half", 4)
            close(fds[1])
            let first = try await receiver.receive()
            #expect(first.payload == bytes("half"))
            await #expect(throws: FDPassingError.endOfFile) { try await receiver.receive() }
            receiver.close()
        }
        // Pipes and refused fds are closed on the reactor's thread, a moment later.
        await reactorClosesDone()
        #expect(ownDescriptorCount() == before, "fds now: \(descriptorTable())")
    }

    @Test func aNonSocketIsAClearError() async throws {
        guard try await isolated("aNonSocketIsAClearError") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let before = ownDescriptorCount()
        do {
            let pipe = try PipeEnds.make()
            let notASocket = FDChannel(try AsyncFD(adopting: pipe.read))
            _ = write(pipe.write, "x", 1)
            do {
                _ = try await notASocket.receive()
                Issue.record("receive on a pipe succeeded")
            } catch {
                #expect(error.description.contains("recvmsg"))
                #expect(error.description.contains("ENOTSOCK") || error.description.contains("not a socket") || error.description.contains("88"))
            }
            notASocket.close()
            close(pipe.write)
        }
        // Pipes and refused fds are closed on the reactor's thread, a moment later.
        await reactorClosesDone()
        #expect(ownDescriptorCount() == before, "fds now: \(descriptorTable())")
    }

    @Test func aSenderCannotAttachMoreThanTheCap() async throws {
        let (left, right) = try channels()
        defer {
            left.close()
            right.close()
        }
        let fds = [Int32](repeating: 0, count: FDChannel.maxDescriptorsPerMessage + 1)
        await #expect(throws: FDPassingError.sendLimitExceeded(count: 65, limit: 64)) {
            try await left.send([1], descriptors: fds)
        }
    }

    @Test func peerCredentialsAreTheKernels() async throws {
        let (left, right) = try channels()
        defer {
            left.close()
            right.close()
        }
        let credentials = try PeerCredentials.of(left.socket)
        #expect(credentials == PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid()))
    }

    /// A request to a process at its limit on open files, whose fds the kernel could not all
    /// install (MSG_CTRUNC): that request is refused (`too-many-open-files`), its fds that did
    /// arrive are closed, and the channel serves the next request. (Before, the channel ended:
    /// a broker out of fds lost its supervisor's channel, exited and was restarted into the
    /// same limit.)
    @Test func aRequestWhoseDescriptorsDoNotFitIsRefusedAndTheChannelGoesOn() async throws {
        guard try await isolated("aRequestWhoseDescriptorsDoNotFitIsRefusedAndTheChannelGoesOn") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let (serverEnd, clientEnd) = try channels()
        let served = Task {
            _ = await RPCServer.serve(
                SeqpacketFrames(serverEnd), as: CountingRequest.self, inFlight: 1, closeDescriptors: SeqpacketFrames.closeDescriptors
            ) { _, descriptors async throws(HoldfastError) -> RPCReply in
                SeqpacketFrames.closeDescriptors(descriptors)
                return RPCReply(CountResponse(count: descriptors.count))
            }
        }
        let client = ControlClient(channel: clientEnd)
        Task { await client.run() }
        var fds: [Int32] = []
        for _ in 0..<8 { fds.append(open("/dev/null", O_RDONLY | O_CLOEXEC)) }
        // Room for three more fds in this process: eight cannot all arrive.
        let before = ownDescriptorCount()
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        let saved = limit
        limit.rlim_cur = rlim_t(fds.max()! + 4)
        #expect(setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0)
        for attempt in 1...2 {
            do {
                _ = try await client.request(CountingRequest.type, body: [], descriptors: fds)
                Issue.record("request \(attempt) was served with 8 fds and room for 3")
            } catch {
                #expect(error.code == .tooManyOpenFiles && error.message.contains("limit on open files"), "\(error)")
            }
        }
        var restored = saved
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &restored)
        // The channel goes on: the same request, with room, is served.
        let reply = try await client.request(CountingRequest.type, body: [], descriptors: fds)
        #expect(try ControlJSON.decode(CountResponse.self, from: reply.frame.body, frameType: reply.frame.type) == CountResponse(count: 8))
        for fd in fds { close(fd) }
        client.close()
        await served.value
        await reactorClosesDone()
        #expect(ownDescriptorCount() <= before - 8, "the fds that arrived with the refused requests were closed")
    }
}

/// A request that takes any number of fds; the server answers with how many arrived.
struct CountingRequest: RPCRequest {
    static let type: UInt32 = 0x7E01
    var frameType: UInt32 { Self.type }
    var body: [UInt8] { [] }
    static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> CountingRequest {
        guard type == Self.type else { throw HoldfastError(.unknownType, "type \(type)") }
        return CountingRequest()
    }
}
