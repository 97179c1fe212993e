import HoldfastTestSupport
import Testing

@testable import HoldfastTools

@Suite("The raw demo", .timeLimit(.minutes(5)))
struct RawDemoTests {
    @Test func heartbeatFollowsEveryListenerRestartInOrder() async throws {
        let lines = LinesSeen()
        let verdict = try await RawDemo.run(beats: 40, interval: .milliseconds(20), restarts: 3) { lines.add($0) }
        #expect(verdict.duplicates == 0)
        #expect(verdict.outOfOrder == 0)
        #expect(verdict.received.last == 40, "the last heartbeat arrives; the demo said: \(lines.all)")
        #expect(verdict.passed)
        #expect(lines.count(containing: "host listener killed") == 3)
    }
}

final class LinesSeen: Sendable {
    private let lines = NIOLockedValueBoxLines()
    func add(_ line: String) { lines.append(line) }
    func count(containing text: String) -> Int { lines.all.filter { $0.contains(text) }.count }
    var all: [String] { lines.all }
}
