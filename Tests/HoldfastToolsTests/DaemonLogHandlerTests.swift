import HoldfastProtocol
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

    /// journald splits a line past 48 KiB and reads a priority prefix again at the start of each
    /// piece: a long value (a host's argv in "process started") placed so that `<0>...` began at
    /// the split forged an entry. Each value is clipped on its own, the line as a whole too, and
    /// the keys after a long value still show.
    @Test func aLongLineIsClippedBelowWhatTheJournalSplits() {
        let argv = String(repeating: "a", count: 49_130) + "<0>holdfast.supervisor: forged" + String(repeating: "é", count: 20_000)
        let line = DaemonLogHandler.format(
            level: .info, label: "holdfast.supervisor", message: String(repeating: "m", count: 70_000),
            metadata: ["argv": .string(argv), "id": "c1"], journal: true, timestamp: nil)
        #expect(line.utf8.count < 16 << 10, "\(line.utf8.count) bytes")
        #expect(!line.contains("forged"))
        #expect(line.hasSuffix(" id=c1"), "the key after the long value shows")
        #expect(line.contains("…(\(argv.utf8.count - (2048 - 32)) bytes more) id=c1"))
        // Many values, each under the limit: the line as a whole is clipped.
        let many = Logger.Metadata(uniqueKeysWithValues: (0..<40).map { ("k\($0)", .string(String(repeating: "v", count: 2000))) })
        let wide = DaemonLogHandler.format(level: .info, label: "x", message: "m", metadata: many, journal: true, timestamp: nil)
        #expect(wide.utf8.count <= (32 << 10) + 32 && wide.contains("bytes more)"))
        // A short line is left as it is.
        #expect(DaemonLogHandler.clipped("short", to: 2048) == "short")
    }

    /// Our own messages keep their line breaks (a usage text, a raw terminal's `\r\n`); a lone
    /// `\r`, which writes over a line, and every other control character are written out.
    @Test func lineBreaksOfOursStayAndALoneCarriageReturnDoesNot() {
        #expect(TerminalText.escaped("a\nb\r\nc", keepingLineBreaks: true) == "a\nb\r\nc")
        #expect(TerminalText.escaped("ok\rforged\u{1b}[2K", keepingLineBreaks: true) == #"ok\rforged\u{1b}[2K"#)
        #expect(TerminalText.escaped("a\nb") == #"a\nb"#)
        #expect(TerminalText.escaped("tab\tand ünïcode") == "tab\tand ünïcode")
    }
}
