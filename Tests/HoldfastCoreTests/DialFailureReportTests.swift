import HoldfastCore
import Testing

@Suite("DialFailureReport: each cause of failed dials told once between connections")
struct DialFailureReportTests {
    /// The reasons a loaded soak's broker logged one line per dial for: the fd in each.
    @Test func failuresThatDifferOnlyInTheirFdAreOneCause() {
        var report = DialFailureReport()
        let first = report.failed("read(fd 590): Connection reset by peer (errno 104)")
        #expect(first)
        var toldAgain = 0
        for fd in 100..<400 where report.failed("read(fd \(fd)): Connection reset by peer (errno 104)") { toldAgain += 1 }
        #expect(toldAgain == 0)
        #expect(report.failuresSinceConnected == 301)
    }

    @Test func alternatingCausesAreEachToldOnce() {
        var report = DialFailureReport()
        var told = 0
        for attempt in 0..<200 {
            let reason =
                attempt % 3 == 0
                ? "read(fd \(attempt)): Connection reset by peer (errno 104)"
                : attempt % 3 == 1 ? "write failed after 0 bytes: send(fd \(attempt)): Broken pipe (errno 32)"
                : "no connection within the connect timeout (2s)"
            if report.failed(reason) { told += 1 }
        }
        #expect(told == 3)
        let failed = report.connected()
        #expect(failed == 200, "connecting tells how many dials failed")
        // And after a connection each cause is news again.
        let news = report.failed("read(fd 7): Connection reset by peer (errno 104)")
        #expect(news)
    }

    @Test func atMostAFewCausesAreToldBeforeAConnection() {
        var report = DialFailureReport()
        let told = (0..<10).filter { report.failed("cause \(String(repeating: "x", count: $0))") }.count
        #expect(told == DialFailureReport.causesTold)
        #expect(report.hasTold)
    }

    @Test func aConnectionAfterNoToldFailureNeedsNoLine() {
        var report = DialFailureReport()
        let silent = report.connected()
        #expect(silent == nil)
        _ = report.failed("refused")
        let once = report.connected()
        #expect(once == 1)
        let again = report.connected()
        #expect(again == nil, "and it starts over")
    }
}
