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

    /// What others chose (an id a runtime named, runc's error text) cannot begin a journal entry
    /// of its own or reach a terminal as an escape sequence: control characters are written out.
    @Test func controlCharactersInALineAreWrittenOut() {
        let forged = "x\n<2>holdfast.supervisor: live upgrade failed"
        let line = DaemonLogHandler.format(
            level: .info, label: "holdfast.broker", message: "adopted \u{1b}]52;c;AAAA\u{07} \u{9b}2J", metadata: ["process": .string(forged)],
            journal: true, timestamp: nil)
        #expect(!line.contains("\n") && !line.contains("\u{1b}") && !line.contains("\u{07}") && !line.contains("\u{9b}"), "\(line)")
        #expect(line == #"<6>holdfast.broker: adopted \u{1b}]52;c;AAAA\u{7} \u{9b}2J process=x\n<2>holdfast.supervisor: live upgrade failed"#)
        // Plain text (a tab too) is left as it is.
        #expect(DaemonLogHandler.escapingControls("a\tb c") == "a\tb c")
    }
}
