import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import HoldfastSupervisor

/// A process claimed for a restarted broker but not handed over for want of fds is put back
/// (`unclaim`), so the next claim hands it again; nothing else is changed by it. Pure
/// bookkeeping; `ReadoptionScarcityTests` runs it against a daemon.
@Suite("The fd store puts back a process it could not hand over yet")
struct StdioStoreUnclaimTests {
    func broker(_ store: inout StdioStore) throws -> Int {
        let (ours, theirs) = try FDChannel.pair()
        close(theirs)
        let client = RPCClient(channel: FDChannel(try AsyncFD(adopting: ours)))
        client.close()
        return store.brokerStarted(client)
    }

    @Test func aProcessPutBackIsClaimedAgainAndOnlyByItsBroker() throws {
        var store = StdioStore(slots: 8)
        let first = try broker(&store)
        let secret = try StreamSecret(hex: String(repeating: "ab", count: 32))
        var request = AdoptRequest(process: "p1", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .resumable, token: "t-out", secret: secret)
        ])
        store.assignCheckpoints(&request)
        store.keep("p1", request: request, descriptors: [41], adoptedBy: first)
        let next = try broker(&store)

        let claimed = try #require(store.claim(for: next).first)
        #expect(store.claim(for: next).isEmpty, "claimed once")
        store.unclaim(claimed, for: next - 1)
        #expect(store.claim(for: next).isEmpty, "another broker's put-back changes nothing")
        store.unclaim(claimed, for: next)
        #expect(store.held["p1"]?.adoption == .adopted(first), "back as it was")
        let again = try #require(store.claim(for: next).first, "claimed again")
        #expect(again.descriptors == claimed.descriptors && again.request == claimed.request)

        store.adopted("p1", by: next)
        store.unclaim(again, for: next)
        #expect(store.held["p1"]?.adoption == .adopted(next), "once handed over, a put-back changes nothing")
        #expect(store.claim(for: next).isEmpty)
    }
}

@Suite("The stdio store's claim order")
struct StdioStoreClaimOrderTests {
    /// A broker's restart claims processes a batch at a time, in the order of their ids: the
    /// batch is the smallest ids left, found in one pass (a sort of every entry per batch cost
    /// 3,000 processes some 13 million comparisons).
    @Test func aBatchIsTheSmallestIDsLeftInOrder() {
        var random = SeededRandom(seed: 0xC1A1)
        let ids = (0..<500).map { _ in String(UInt32.random(in: 0...UInt32.max, using: &random), radix: 36) }
        for limit in [0, 1, 8, 63] {
            #expect(StdioStore.first(limit, of: ids) == Array(ids.sorted().prefix(limit)), "limit \(limit)")
        }
        #expect(StdioStore.first(.max, of: ids) == ids.sorted())
        #expect(StdioStore.first(100, of: ids) == Array(ids.sorted().prefix(100)), "a large limit too")
        #expect(StdioStore.first(8, of: ["b", "a", "b", "a"]) == ["a", "a", "b", "b"], "duplicates kept as a sort keeps them")
    }
}
