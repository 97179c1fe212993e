import Glibc
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

/// The host side does not trust the guest: a guest that is not Holdfast (a compromised VM) can
/// send what it likes on the bridge, and must not grow the host agent's memory without bound.
@Suite("A hostile guest cannot grow the host's tables", .timeLimit(.minutes(5)))
struct BridgeServerHostileGuestTests {
    typealias Guest = BridgeServerCreateTests.ScriptedGuest

    static func exitFrame(_ id: String) -> [UInt8] {
        ControlFrame(
            type: BridgeMessageType.exit.rawValue, id: 0,
            body: ControlJSON.encode(ExitReport(id: id, exitCode: 0, signal: nil, undelivered: 0))
        ).encoded
    }

    /// A bridge server whose exits are counted by an observer (nothing buffered unread).
    static func start(
        _ directory: TemporaryDirectory, warned: NIOLockedValueBox<[String]>? = nil, unansweredAge: Duration = .seconds(30)
    ) throws -> (BridgeServer, NIOLockedValueBox<[String]>) {
        let delivered = NIOLockedValueBox<[String]>([])
        let bridge = try BridgeServer(
            listeningOn: .unix(path: directory.file("bridge.sock")), authentication: .key(BridgeServerCreateTests.key),
            warn: { text in warned?.withLockedValue { $0.append(text) } },
            observer: { event in
                if case .exit(let report) = event { delivered.withLockedValue { $0.append(report.id) } }
            }, unansweredRequestAge: unansweredAge)
        bridge.start()
        return (bridge, delivered)
    }

    /// Exits of new ids without end, never confirming an acknowledgement, over 70 connections:
    /// each is delivered once, and the table of exits waiting for confirmation keeps at most
    /// `maximumUnconfirmedExits` (the oldest forgotten). Before, it kept every one for good.
    @Test func exitsOfNewIdsWithoutEndKeepABoundedTable() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let (bridge, delivered) = try Self.start(directory)
        defer { bridge.close() }
        let rounds = 70
        let perRound = 1000
        for round in 0..<rounds {
            let guest = try await Guest.connect(bridge.address, key: BridgeServerCreateTests.key)
            var batch: [UInt8] = []
            for index in 0..<perRound { batch += Self.exitFrame("r\(round)-\(index)") }
            try await FrameIO.write(batch, to: guest.socket)
            // Closed without answering: every acknowledgement on it fails, unconfirmed.
            try await eventually("round \(round) delivered", timeout: .seconds(60)) {
                delivered.withLockedValue { $0.count } == (round + 1) * perRound
            }
            guest.socket.close()
        }
        let ids = delivered.withLockedValue { $0 }
        #expect(Set(ids).count == rounds * perRound, "each delivered once")
        #expect(bridge.unconfirmedExits <= BridgeServer.maximumUnconfirmedExits, "\(bridge.unconfirmedExits) waiting")
        #expect(bridge.rememberedExits <= BridgeServer.maximumUnconfirmedExits, "\(bridge.rememberedExits) remembered")
        #expect(rounds * perRound > BridgeServer.maximumUnconfirmedExits, "the test sends past the bound")
    }

    /// A guest that reads the host's requests and answers none is dropped once it leaves 1,024
    /// unanswered, the oldest past the bound (here 500 ms; 30 s by default), at the next request
    /// (it redials): kept, every poll and acknowledgement left a waiter behind for as long as the
    /// connection lasted.
    @Test func aGuestThatLeavesRequestsUnansweredIsDropped() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let (bridge, delivered) = try Self.start(directory, unansweredAge: .milliseconds(500))
        defer { bridge.close() }
        let guest = try await Guest.connect(bridge.address, key: BridgeServerCreateTests.key)
        defer { guest.socket.close() }
        // Reads the acknowledgements the host asks for, answering none, until the host hangs up.
        let socket = guest.socket
        let reading = Task { () -> (Int, String) in
            var count = 0
            while true {
                do {
                    let frame = try await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody)
                    if frame.type == BridgeMessageType.acknowledgeExit.rawValue { count += 1 }
                } catch {
                    return (count, "\(error)")
                }
            }
        }
        var batch: [UInt8] = []
        for index in 0..<1100 { batch += Self.exitFrame("job-\(index)") }
        try await FrameIO.write(batch, to: guest.socket)
        try await eventually("the exits delivered") { delivered.withLockedValue { $0.count } == 1100 }
        try await Task.sleep(for: .seconds(1))
        try await FrameIO.write(Self.exitFrame("one-more"), to: guest.socket)
        let (requests, ending) = try await withTimeout("the host to drop the connection", .seconds(60)) { await reading.value }
        #expect(requests <= 1101, "\(requests) acknowledgements asked before the drop (\(ending))")
        // Hung up with our unread exits in its socket: a reset, or the end of the stream.
        #expect(ending == "end of stream" || ending.contains("errno 104"), "the host hung up: \(ending)")
    }

    /// A burst past 1,024 to a guest that answers, 32 at a time as the guest does, drops
    /// nothing: 2,000 exits at once get every acknowledgement on one connection. (Counted
    /// by number alone, the 1,025th acknowledgement dropped a healthy guest, again at each redial.)
    @Test func aBurstToAGuestThatAnswersDropsNothing() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let (bridge, delivered) = try Self.start(directory)
        defer { bridge.close() }
        let guest = try await Guest.connect(bridge.address, key: BridgeServerCreateTests.key)
        defer { guest.socket.close() }
        let socket = guest.socket
        // 2,000 exits at once (a hello holds at most 64 KiB), then the answers.
        var batch: [UInt8] = []
        for index in 0..<2000 { batch += Self.exitFrame("done-\(index)") }
        try await FrameIO.write(batch, to: socket)
        let answering = Task { () -> Int in
            var answered = 0
            while answered < 2000 {
                var taken: [ControlFrame] = []
                while taken.count < 32, answered + taken.count < 2000,
                    let frame = try? await ControlFrameIO.read(from: socket, maxBody: BridgeProtocol.maxBody)
                {
                    taken.append(frame)
                }
                guard !taken.isEmpty else { return answered }
                try? await Task.sleep(for: .milliseconds(1))
                var replies: [UInt8] = []
                for frame in taken {
                    replies += ControlFrame(type: BridgeMessageType.ok.rawValue, id: frame.id, body: ControlJSON.encode([String: String]())).encoded
                }
                guard (try? await FrameIO.write(replies, to: socket)) != nil else { return answered }
                answered += taken.count
            }
            return answered
        }
        let answered = try await withTimeout("every acknowledgement answered", .seconds(120)) { await answering.value }
        #expect(answered == 2000)
        #expect(delivered.withLockedValue { $0.count } == 2000)
        try await eventually("every exit confirmed") { bridge.unconfirmedExits == 0 }
        #expect(bridge.acceptedConnections == 1, "one connection throughout")
    }

    /// An exit whose id no create could have made (past 256 bytes) is neither delivered nor
    /// acknowledged, and the host says so once.
    @Test func anExitWithAnIdNoCreateMakesIsIgnoredAndSaid() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let warned = NIOLockedValueBox<[String]>([])
        let (bridge, delivered) = try Self.start(directory, warned: warned)
        defer { bridge.close() }
        let guest = try await Guest.connect(bridge.address, key: BridgeServerCreateTests.key)
        defer { guest.socket.close() }
        let long = String(repeating: "x", count: 60_000)
        let frames = Self.exitFrame(long) + Self.exitFrame("") + Self.exitFrame("fine")
        try await FrameIO.write(frames, to: guest.socket)
        try await eventually("the valid exit delivered") { delivered.withLockedValue { $0 } == ["fine"] }
        let (acknowledgement, body) = try await guest.next(.acknowledgeExit, AcknowledgeExitRequest.self)
        #expect(body.id == "fine", "only the valid one acknowledged")
        try await guest.reply(to: acknowledgement, [String: String]())
        #expect(bridge.rememberedExits == 1)
        let said = warned.withLockedValue { $0 }.filter { $0.contains("ignored") }
        #expect(said.count == 1 && said[0].contains("whose id is not 1 to 256 bytes (the last 60000 bytes)"), "\(said)")
    }

    /// A guest that redials without end keeps at most the newest `helloBacklog` hellos waiting
    /// for a host agent that never reads `hellos` (the README's library example does not).
    @Test func unreadHellosAreKeptToTheNewest() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let bridge = try BridgeServer(listeningOn: .unix(path: directory.file("bridge.sock")), authentication: .key(BridgeServerCreateTests.key))
        bridge.start()
        defer { bridge.close() }
        for index in 0..<100 {
            let guest = try await Guest.connect(
                bridge.address, key: BridgeServerCreateTests.key,
                hello: BridgeHello(bootID: "boot-\(index)", processes: [], exits: []))
            try await eventually("hello \(index) taken") { bridge.lastHello?.bootID == "boot-\(index)" }
            guest.socket.close()
        }
        let collecting = Task {
            var kept: [String] = []
            for await hello in bridge.hellos {
                kept.append(hello.bootID)
                if kept.count == BridgeServer.helloBacklog { break }
            }
            return kept
        }
        let kept = try await withTimeout("the kept hellos") { await collecting.value }
        #expect(kept == (100 - BridgeServer.helloBacklog..<100).map { "boot-\($0)" }, "\(kept)")
    }
}
