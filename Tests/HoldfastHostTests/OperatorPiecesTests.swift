import HoldfastCore
@testable import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The pure pieces behind the operator's commands: detach keys, the process log, durations and
/// signal names as people write them.
@Suite("Detach keys, the process log, durations and signal names", .timeLimit(.minutes(1)))
struct OperatorPiecesTests {
    @Test func detachKeysParseDockersNotation() throws {
        #expect(DetachKeys.default.bytes == [0x10, 0x11])
        #expect(try DetachKeys(parsing: "ctrl-x,q").bytes == [0x18, UInt8(ascii: "q")])
        #expect(try DetachKeys(parsing: "ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_").bytes == [0, 0x1B, 0x1C, 0x1D, 0x1E, 0x1F])
        #expect(try DetachKeys(parsing: "CTRL-A").bytes == [1])
        #expect(try DetachKeys(parsing: "").bytes.isEmpty)
        for bad in ["ctrl-1", "ab", "ctrl-", ",", "ctrl-p,,ctrl-q", "é"] {
            #expect(throws: DetachKeys.Invalid.self, "\(bad)") { try DetachKeys(parsing: bad) }
        }
    }

    @Test func theMatcherPassesEverythingButTheSequenceOnInOrder() throws {
        var matcher = DetachKeyMatcher(.default)
        #expect(matcher.feed(Array("abc".utf8)) == (Array("abc".utf8), false))
        // A Ctrl-P alone is held until the next key shows it was not the sequence.
        #expect(matcher.feed([0x10]) == ([], false))
        #expect(matcher.feed(Array("x".utf8)) == ([0x10] + Array("x".utf8), false))
        // Split across reads, then the rest of the input after it is dropped.
        #expect(matcher.feed([0x61, 0x10]) == ([0x61], false))
        #expect(matcher.feed([0x11, 0x62]) == ([], true))

        // A prefix that restarts inside itself: "a a b" found in "a a a b".
        var overlapping = DetachKeyMatcher(try DetachKeys(parsing: "a,a,b"))
        #expect(overlapping.feed(Array("xaaab".utf8)) == (Array("xa".utf8), true))
        var twice = DetachKeyMatcher(.default)
        #expect(twice.feed([0x10, 0x10, 0x11]) == ([0x10], true))
        // Off: every byte goes on.
        var off = DetachKeyMatcher(try DetachKeys(parsing: ""))
        #expect(off.feed([0x10, 0x11]) == ([0x10, 0x11], false))
    }

    @Test func theLogKeepsTheNewestBytesInOrderAndFollowersSeeTheEnd() async throws {
        let log = ProcessLog(capacity: 10, streams: ["stdout", "stderr"])
        log.append("stdout", Array("12345".utf8))
        log.append("stderr", Array("abc".utf8))
        log.append("stdout", Array("6789".utf8))
        // 12 bytes offered, 10 kept: the two oldest dropped, the order kept.
        let kept = log.entries(after: 0).entries
        #expect(kept.map(\.kind) == ["stdout", "stderr", "stdout"])
        #expect(kept.map { String(decoding: $0.bytes, as: UTF8.self) } == ["345", "abc", "6789"])
        #expect(log.byteCount == 10)
        // One chunk bigger than the log: its newest bytes.
        log.append("stdout", Array("ABCDEFGHIJKLMNOP".utf8))
        #expect(log.entries(after: 0).entries.map { String(decoding: $0.bytes, as: UTF8.self) } == ["GHIJKLMNOP"])

        // A follower waits for the next entry, and for the end.
        let cursor = log.entries(after: 0).entries.last!.sequence
        let follower = Task { await log.waitForMore(after: cursor) }
        log.append("stderr", Array("z".utf8))
        await follower.value
        #expect(log.entries(after: cursor).entries.map(\.kind) == ["stderr"])
        let last = log.entries(after: 0).entries.last!.sequence
        let waiting = Task { await log.waitForMore(after: last) }
        log.end("stdout")
        #expect(!log.isEnded)
        log.end("stderr")
        await waiting.value
        #expect(log.isEnded && log.entries(after: last).ended)

        // Many small appends: memory stays at the capacity (compaction), nothing lost at the end.
        let busy = ProcessLog(capacity: 1000, streams: ["stdout"])
        for index in 0..<10_000 { busy.append("stdout", Array("\(index % 10)".utf8)) }
        let tail = busy.entries(after: 0).entries.flatMap(\.bytes)
        #expect(tail.count == 1000 && busy.byteCount == 1000)
        #expect(String(decoding: tail.suffix(10), as: UTF8.self) == "0123456789")
    }

    /// A guest that sends its output a byte at a time made a run of each byte (some 100 bytes of
    /// memory per byte kept). Appends of one stream join its last run, and a log keeps at most
    /// `capacity / 128` runs even when the streams alternate byte by byte; a follower whose
    /// cursor is inside a run that grew gets only the new bytes.
    @Test func aLogOfTinyChunksKeepsFewRuns() {
        let log = ProcessLog(capacity: 64 << 10, streams: ["stdout", "stderr"])
        for _ in 0..<65_536 { log.append("stdout", [UInt8(ascii: "o")]) }
        #expect(log.entryCount == 16 && log.byteCount == 64 << 10, "runs of 4 KiB: \(log.entryCount)")
        for index in 0..<65_536 { log.append(index % 2 == 0 ? "stdout" : "stderr", [UInt8(ascii: "x")]) }
        #expect(log.entryCount <= 512, "\(log.entryCount) runs (at most capacity / 128)")
        let kept = log.entries(after: 0).entries
        #expect(kept.count == log.entryCount && kept.allSatisfy { $0.bytes == [UInt8(ascii: "x")] })

        let follow = ProcessLog(capacity: 1000, streams: ["stdout"])
        follow.append("stdout", Array("abc".utf8))
        let cursor = follow.entries(after: 0).entries.last!.sequence
        follow.append("stdout", Array("def".utf8))
        #expect(follow.entries(after: 0).entries.map { String(decoding: $0.bytes, as: UTF8.self) } == ["abcdef"])
        #expect(follow.entries(after: cursor).entries.map { String(decoding: $0.bytes, as: UTF8.self) } == ["def"])
        #expect(follow.entries(after: follow.entries(after: 0).entries.last!.sequence).entries.isEmpty)
    }

    @Test func durationsAreSpokenTheWayTheyAreWritten() {
        #expect(Duration.seconds(30).spoken == "30s")
        #expect((Duration.seconds(30) - .nanoseconds(2_647)).spoken == "30s")
        #expect(Duration.milliseconds(250).spoken == "250ms")
        #expect(Duration.milliseconds(1500).spoken == "1.5s")
        #expect(Duration.seconds(120).spoken == "2m")
        #expect(Duration.seconds(5400).spoken == "1h30m")
        #expect(Duration.seconds(61).spoken == "1m1s")
        #expect(Duration.zero.spoken == "0ms")
    }

    @Test func signalsByNameOrNumber() {
        #expect(SignalNames.number("TERM") == SIGTERM)
        #expect(SignalNames.number("sigkill") == SIGKILL)
        #expect(SignalNames.number("9") == 9)
        #expect(SignalNames.number("RTMIN+2") == 36)
        #expect(SignalNames.number("RTMAX-1") == 63)
        // Offsets past Int32's range once trapped (overflow) instead of being refused.
        let bad = ["BOGUS", "0", "65", "99", "-1", "RTMIN+40", "", "RTMIN+2147483614", "RTMIN+2147483647", "RTMAX--2147483648", "RTMAX-31", "RTMIN+-1"]
        for name in bad { #expect(SignalNames.number(name) == nil, "\(name)") }
        #expect(SignalNames.number("RTMIN+30") == 64 && SignalNames.number("RTMAX-30") == 34)
        #expect(SignalNames.name(SIGWINCH) == "SIGWINCH")
        #expect(SignalNames.name(34) == "SIGRTMIN")
        #expect(SignalNames.name(99) == "signal 99")
        #expect(SignalNames.validNames.hasPrefix("HUP INT QUIT ILL"))
    }

    @Test func psShowsACommandAsAShellWouldWriteIt() {
        #expect(HostService.commandLine(["sh", "-c", "echo it's here; exit 3"]) == #"sh -c 'echo it'\''s here; exit 3'"#)
        #expect(HostService.commandLine(["ls", "-l", "/tmp", ""]) == "ls -l /tmp ''")
    }
}
