import Logging
import Testing

@testable import HoldfastLogging

@Suite("Daemon log lines", .timeLimit(.minutes(5)))
struct DaemonLogHandlerTests {
    @Test func underSystemdLinesCarryThePriorityAndNoTimestamp() {
        let line = DaemonLogHandler.format(
            level: .error, label: "holdfast.broker", message: "relay failed", metadata: ["stream": "stdout", "process": "c1"],
            journal: true, timestamp: nil)
        #expect(line == "<3>holdfast.broker: relay failed process=c1 stream=stdout")
        #expect(DaemonLogHandler.priority(.warning) == 4)
        #expect(DaemonLogHandler.priority(.info) == 6)
        #expect(DaemonLogHandler.priority(.debug) == 7)
        #expect(DaemonLogHandler.priority(.critical) == 2)
    }

    @Test func elsewhereLinesArePlainTextWithATimestamp() {
        let line = DaemonLogHandler.format(
            level: .info, label: "holdfast.supervisor", message: "bridge up", metadata: [:], journal: false,
            timestamp: "2026-11-27T03:00:00.042Z")
        #expect(line == "2026-11-27T03:00:00.042Z info holdfast.supervisor: bridge up")
        #expect(DaemonLogHandler.timestamp().hasSuffix("Z"))
        #expect(DaemonLogHandler.timestamp().count == "2026-11-27T03:00:00.042Z".count)
    }
}
