import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import HoldfastSupervisor

/// The fd store keeps a stdin the host ended past its process's exit report, until the broker
/// says its END echo is home (`input-settled`): a broker crash in between must not leave the
/// host's sender without its echo. Pure bookkeeping; `StdinEndTests` runs it against a daemon.
@Suite("The fd store and an ended stdin's echo")
struct StdioStoreEchoTests {
    /// p1: stdout (fd 41, with a window 50/51) and stdin (fd 42), both resumable, exited; the
    /// host ended its stdin.
    func store(endedByHost: Bool = true) throws -> (StdioStore, outSlot: Int, inSlot: Int) {
        var store = StdioStore(slots: 64)
        let secret = try StreamSecret(hex: String(repeating: "ab", count: 32))
        var request = AdoptRequest(process: "p1", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .resumable, token: "t-out", secret: secret),
            StreamDescription(kind: .stdin, fd: 1, address: "unix:/run/in.sock", mode: .resumable, token: "t-in", secret: secret),
        ])
        store.assignCheckpoints(&request)
        request.streams[0].window = WindowPipe(read: 2, write: 3)
        store.keep("p1", request: request, descriptors: [41, 42, 50, 51], adoptedBy: 0)
        #expect(store.inputEnded("p1", endedByHost: endedByHost) == 42)
        store.exited("p1")
        return (store, try #require(request.streams[0].checkpoint), try #require(request.streams[1].checkpoint))
    }

    func claimOne(_ store: inout StdioStore) throws -> StdioStore.Readoption {
        let (ours, theirs) = try FDChannel.pair()
        close(theirs)
        let client = RPCClient(channel: FDChannel(try AsyncFD(adopting: ours)))
        client.close()
        let next = store.brokerStarted(client)
        let claimed = store.claim(for: next)
        return try #require(claimed.first)
    }

    @Test func theExitReportReleasesAllButAStdinWhoseEchoIsNotHome() throws {
        var (store, outSlot, inSlot) = try store()
        let releasing = store.release("p1")
        let released = try #require(releasing)
        #expect(released.descriptors == [41, 50, 51], "the output's fd and window close")
        #expect(released.slots == [outSlot], "the output's slot is free; the stdin's is kept")
        #expect(store.isKeptForEcho("p1"))
        // A broker started now is handed the stdin alone, ended, on the /dev/null placeholder.
        let item = try claimOne(&store)
        #expect(item.request.endingInput == true)
        #expect(item.request.streams.map(\.kind) == [.stdin])
        #expect(item.request.streams.first?.ended == true && item.request.streams.first?.resume == true)
        #expect(item.request.streams.first?.checkpoint == inSlot)
        #expect(item.descriptors == [StdioStore.endedInput])
        // The broker says the echo is home: the rest goes.
        #expect(store.inputSettled("p1", slot: inSlot + 1) == nil, "another slot (a later process of the id) changes nothing")
        #expect(store.isKeptForEcho("p1"))
        let settling = store.inputSettled("p1", slot: inSlot)
        let rest = try #require(settling)
        #expect(rest.descriptors.isEmpty && rest.slots == [inSlot])
        #expect(store.held["p1"] == nil)
    }

    @Test func anEchoSeenHomeBeforeTheExitReportLeavesNothingToKeep() throws {
        var (store, outSlot, inSlot) = try store()
        #expect(store.inputSettled("p1", slot: inSlot) == nil, "the process is not done yet")
        // A broker started now owes nothing for that stdin.
        let item = try claimOne(&store)
        #expect(item.request.streams.map(\.kind) == [.stdout])
        let releasing = store.release("p1")
        let released = try #require(releasing)
        #expect(released.descriptors == [41, 50, 51])
        #expect(Set(released.slots) == [outSlot, inSlot])
        #expect(store.held["p1"] == nil)
    }

    @Test func aNewProcessOfTheIdTakesItOverAndFreesTheOldStdinsSlot() throws {
        var (store, _, inSlot) = try store()
        _ = store.release("p1")
        let evicted = store.keep("p1", request: AdoptRequest(process: "p1", streams: []), descriptors: [], adoptedBy: 1)
        #expect(evicted.slots == [inSlot] && evicted.descriptors.isEmpty)
        #expect(!store.isKeptForEcho("p1"))
    }

    /// A handoff runtime's process of the id does not: a guest process must not take the host's
    /// echo its crash-survival. Its deposit is refused, and said to be (the runtime is told
    /// `survivesBrokerCrash: false`); once the echo is home the id is free for a deposit.
    @Test func aHandoffProcessOfTheIdIsNotKeptWhileTheEchoIsOwed() throws {
        var (store, _, inSlot) = try store()
        let deposit = HandoffDeposit(request: AdoptRequest(process: "p1", streams: []), owner: 1000)
        #expect(store.keepHandoff(deposit, descriptors: [], adoptedBy: 1) == .held, "p1 is live")
        _ = store.release("p1")
        #expect(store.keepHandoff(deposit, descriptors: [], adoptedBy: 1) == .heldForEcho)
        #expect(store.isKeptForEcho("p1") && !store.isHandoff("p1"), "the echo is kept")
        _ = store.inputSettled("p1", slot: inSlot)
        #expect(store.keepHandoff(deposit, descriptors: [], adoptedBy: 1) == .kept)
        #expect(store.isHandoff("p1"))
        #expect(store.keepHandoff(deposit, descriptors: [], adoptedBy: 1) == .held, "a second deposit of the id is refused")
    }

    /// The broker let a create of the id in, so it is done with the handoff process of that id,
    /// whose `handoff-ended` the reply overtook: its copies are handed back to close. Before,
    /// the new entry overwrote the old one and its fds stayed open in the supervisor for good.
    @Test func aCreateOfAHandoffProcessesIdClosesItsCopies() throws {
        var store = StdioStore(slots: 64)
        let handoff = AdoptRequest(process: "h1", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .raw)
        ])
        #expect(store.keepHandoff(HandoffDeposit(request: handoff, owner: 1000), descriptors: [61], adoptedBy: 1) == .kept)
        let evicted = store.keep("h1", request: AdoptRequest(process: "h1", streams: []), descriptors: [], adoptedBy: 1)
        #expect(evicted.descriptors == [61] && evicted.slots.isEmpty)
        #expect(!store.isHandoff("h1"))
    }

    @Test func aStdinTheProcessStoppedReadingIsNotKept() throws {
        var (store, _, _) = try store(endedByHost: false)
        let releasing = store.release("p1")
        let released = try #require(releasing)
        #expect(released.slots.count == 2)
        #expect(store.held["p1"] == nil)
    }
}
