import HoldfastLogging
import HoldfastPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A log nobody reads must never hold the thread that logs.
@Suite("Log lines through a writer thread of their own", .timeLimit(.minutes(2)))
struct LogLineQueueTests {
    /// Reads `fd` to its end.
    static func readAll(_ fd: Int32) -> String {
        var all: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count > 0 { all += buffer[..<count] } else if count < 0 && errno == EINTR { continue } else { break }
        }
        return String(decoding: all, as: UTF8.self)
    }

    /// 1,000 lines logged into a pipe nobody reads (4 KiB of pipe, 8 KiB of queue): every append
    /// returns; once read, the lines that were kept come out in order, and each run of dropped
    /// ones is said where it was, by count: kept and said add up to every line, none twice.
    @Test func aStalledReaderNeverBlocksTheLoggerAndTheDropIsSaidInOrder() throws {
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        PipeEnds.setCapacity(of: ends[1], to: 4096)
        let queue = LogLineQueue(descriptor: ends[1], capacity: 8192) { "\($0) log lines dropped" }
        for index in 0..<1_000 {
            queue.append(Array("line \(index) \(String(repeating: "x", count: 90))\n".utf8))
        }
        #expect(queue.flush(withinMilliseconds: 200) == false, "the reader reads nothing: the flush gives up")
        // The reader comes back: read everything the writer still has, then the end.
        let reader = Thread(ends[0])
        #expect(queue.flush(withinMilliseconds: 10_000), "all written once read")
        close(ends[1])
        let text = reader.join()
        // Where the writer thread happened to run decides which lines were kept: walk them.
        var next = 0
        var (kept, dropped) = (0, 0)
        for line in text.split(separator: "\n") {
            if line.hasSuffix(" log lines dropped"), let count = Int(line.split(separator: " ")[0]) {
                next += count
                dropped += count
            } else {
                #expect(line.hasPrefix("line \(next) "), "line \(next) next, in order: \(line.prefix(20))")
                next += 1
                kept += 1
            }
        }
        #expect(next == 1_000, "every line kept or said dropped, once: kept \(kept), dropped \(dropped)")
        #expect(dropped > 0 && kept >= 80, "at least the pipe's and the queue's worth kept: kept \(kept), dropped \(dropped)")
    }

    @Test func linesAreWrittenAtOnceWhileTheReaderReads() throws {
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        let reader = Thread(ends[0])
        let queue = LogLineQueue(descriptor: ends[1], capacity: 1 << 20) { "\($0) dropped" }
        for index in 0..<10_000 { queue.append(Array("line \(index)\n".utf8)) }
        #expect(queue.flush(withinMilliseconds: 10_000))
        #expect(queue.droppedNow == 0)
        close(ends[1])
        let lines = reader.join().split(separator: "\n")
        #expect(lines.count == 10_000)
        #expect(lines.last == "line 9999")
    }

    /// A reader of `fd` on a thread of its own (the test's queue writes from another).
    final class Thread: @unchecked Sendable {
        private var thread = pthread_t()
        private let fd: Int32
        private var text = ""

        init(_ fd: Int32) {
            self.fd = fd
            let box = Unmanaged.passRetained(self)
            pthread_create(&thread, nil, { argument in
                let reader = Unmanaged<Thread>.fromOpaque(argument!).takeRetainedValue()
                reader.text = LogLineQueueTests.readAll(reader.fd)
                return nil
            }, box.toOpaque())
        }

        func join() -> String {
            pthread_join(thread, nil)
            close(fd)
            return text
        }
    }
}
