import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import HoldfastSupervisor

/// A handoff peer's process whose broker was releasing it (`handoff-releasing`) is handed to the
/// next broker as a release to keep, never to relay: the peer may be reading its pipes already.
/// Pure bookkeeping; `HandoffReleaseCrashTests` runs it against a daemon.
@Suite("The fd store and a release a broker crash interrupts")
struct StdioStoreReleaseTests {
    /// "h": a handoff peer's (uid 1000) stdout (fd 41, window 50/51) and stdin (fd 42, closed
    /// by the broker); "own": the supervisor's own process (fd 43).
    func store() throws -> StdioStore {
        var store = StdioStore(slots: 64)
        let secret = try StreamSecret(hex: String(repeating: "cd", count: 32))
        var handed = AdoptRequest(process: "h", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .resumable, token: "h-out", secret: secret),
            StreamDescription(kind: .stdin, fd: 1, address: "unix:/run/in.sock", mode: .resumable, token: "h-in", secret: secret),
        ])
        handed.streams[0].checkpoint = 12288
        handed.streams[1].checkpoint = 12289
        handed.streams[0].window = WindowPipe(read: 2, write: 3)
        let deposited = store.keepHandoff(HandoffDeposit(request: handed, owner: 1000), descriptors: [41, 42, 50, 51], adoptedBy: 1)
        #expect(deposited == .kept)
        let closedStdin = store.inputEnded("h", endedByHost: false)
        #expect(closedStdin == 42)
        var own = AdoptRequest(process: "own", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/own.sock", mode: .resumable, token: "own-out", secret: secret),
        ])
        store.assignCheckpoints(&own)
        store.keep("own", request: own, descriptors: [43], adoptedBy: 1)
        return store
    }

    func nextBroker(_ store: inout StdioStore) throws -> [StdioStore.Readoption] {
        let (ours, theirs) = try FDChannel.pair()
        close(theirs)
        let client = RPCClient(channel: FDChannel(try AsyncFD(adopting: ours)))
        client.close()
        _ = store.brokerStarted(client)  // 1, the broker that died
        return store.claim(for: store.brokerStarted(client))
    }

    @Test func aReleasingProcessIsHandedOverToKeepWithoutItsWindowsOrClosedStdin() throws {
        var store = try store()
        store.releasing("h")
        let claimed = Dictionary(uniqueKeysWithValues: try nextBroker(&store).map { ($0.process, $0) })
        let kept = try #require(claimed["h"])
        #expect(kept.request.releasing == true && kept.request.handoffOwner == 1000)
        #expect(kept.descriptors == [41], "the stdout's fd alone: not the closed stdin, not the window")
        #expect(kept.request.streams.count == 1 && kept.request.streams[0].kind == .stdout && kept.request.streams[0].fd == 0)
        #expect(kept.request.streams[0].window == nil && kept.request.streams[0].resume == nil)
        #expect(kept.request.streams[0].checkpoint == 12288, "its slot stays taken until the release is done")
        // The supervisor's own process is handed over to relay, as always.
        let own = try #require(claimed["own"])
        #expect(own.request.releasing == nil && own.request.streams.allSatisfy { $0.resume == true })
    }

    @Test func withoutTheMarkAHandoffProcessIsRelayedAgain() throws {
        var store = try store()
        let claimed = try nextBroker(&store)
        let handed = try #require(claimed.first { $0.process == "h" })
        #expect(handed.request.releasing == nil && handed.request.streams.allSatisfy { $0.resume == true })
        #expect(handed.descriptors == [41, 50, 51], "relayed with its window")
    }

    @Test func onlyAHandoffProcessIsMarked() throws {
        var store = try store()
        store.releasing("own")
        store.releasing("nobody")
        let claimed = try nextBroker(&store)
        #expect(claimed.allSatisfy { $0.request.releasing == nil })
        #expect(store.snapshot().held.values.allSatisfy { $0.releasing == nil })
    }

    @Test func theMarkTravelsInALiveUpgrade() throws {
        var store = try store()
        store.releasing("h")
        var restored = StdioStore(restoring: store.snapshot())
        let claimed = try nextBroker(&restored)
        #expect(claimed.first { $0.process == "h" }?.request.releasing == true)
    }
}
