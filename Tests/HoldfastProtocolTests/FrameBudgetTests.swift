import HoldfastProtocol
import Testing

@Suite("Replies that list things fit one frame", .timeLimit(.minutes(5)))
struct FrameBudgetTests {
    func streams(_ count: Int) -> [StreamStatus] {
        (0..<count).map {
            StreamStatus(
                process: "process-\($0)", kind: .stdout, mode: .resumable, address: "vsock://2:6000", state: .connected,
                bytesToHost: UInt64($0) << 20, bytesFromHost: 0, reconnects: 3, undelivered: 0)
        }
    }

    @Test func aSmallListIsWhole() {
        let (reply, omitted) = FrameBudget.fit(streams(10)) { ListResponse(streams: $0, total: 10) }
        #expect(reply.streams.count == 10 && omitted == 0)
    }

    /// 3,000 streams (1,000 containers) are ~600 KB of JSON: the reply keeps the first ones that
    /// fit within the budget, in order, and counts the rest.
    @Test func threeThousandStreamsAreCutToTheBudgetInOrder() {
        let all = streams(3000)
        let (reply, omitted) = FrameBudget.fit(all) { BridgeListResponse(processes: [], streams: $0) }
        let size = ControlJSON.encode(reply).count
        #expect(size <= FrameBudget.bytes)
        #expect(size + ControlFrame.headerSize <= ControlFrame.defaultMaxBody)
        #expect(reply.streams.count + omitted == 3000)
        #expect(reply.streams == Array(all.prefix(reply.streams.count)))
        // The longest prefix: one more would not fit.
        let oneMore = BridgeListResponse(processes: [], streams: Array(all.prefix(reply.streams.count + 1)))
        #expect(ControlJSON.encode(oneMore).count > FrameBudget.bytes)
    }

    /// The few streams in trouble among thousands: a list cut to one frame keeps them (each rank
    /// in id order), not the first thousand by id.
    @Test func streamsInTroubleAreKeptWhenTheListIsCut() {
        var all = streams(3000)
        all[2999].state = .abandoned
        all[2998].lostBytes = 512
        all[2997].state = .parked
        all[2997].lastDialError = "connection refused"
        all[2996].survivesBrokerCrash = false
        all[2995].state = .parked  // parked without an error: a migration's blackout, not trouble
        let (reply, omitted) = FrameBudget.fit(all.troubledFirst()) { BridgeListResponse(processes: [], streams: $0) }
        #expect(omitted > 0)
        #expect(reply.streams.prefix(4).map(\.process) == ["process-2998", "process-2999", "process-2996", "process-2997"])
        // The rest in their former order, from the first by id.
        #expect(reply.streams[4].process == "process-0" && reply.streams[5].process == "process-1")
        #expect(!reply.streams.contains { $0.process == "process-2995" })
        #expect(all.troubledFirst().count == 3000 && Set(all.troubledFirst().map(\.process)).count == 3000)
    }
}
