import HoldfastCore
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// `KernelOOMLog` over a socket that gives one record per read, as `/dev/kmsg` does.
@Suite("KernelOOMLog: which watched process the OOM killer killed, or not known")
struct KernelOOMLogTests {
    /// The log's reading end (non-blocking) and the end records are written to.
    func logPair() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        let type = Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
        guard socketpair(AF_UNIX, type, 0, &fds) == 0 else { throw SystemError.last("socketpair") }
        return (fds[0], fds[1])
    }

    func log(_ fd: Int32, _ record: String) {
        let bytes = Array(record.utf8)
        #expect(write(fd, bytes, bytes.count) == bytes.count)
    }

    static func kill(_ pid: pid_t, sequence: Int, priority: Int = 3) -> String {
        "\(priority),\(sequence),100,-;Memory cgroup out of memory: Killed process \(pid) (awk) total-vm:1kB\n"
    }

    @Test func onlyTheKernelsRecordOfAWatchedPidAfterItsWatchCounts() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let oom = KernelOOMLog(fd: reading, after: nil, watched: [], killed: [])
        // An earlier process with pid 50, killed before the new one started: read by the drain
        // that comes before each start.
        log(writing, Self.kill(50, sequence: 1))
        oom.drain()
        oom.watch(50)
        oom.watch(60)
        oom.watch(70)
        log(writing, Self.kill(60, sequence: 2))
        log(writing, Self.kill(70, sequence: 3, priority: 11))  // written from user space: facility 1
        log(writing, "6,4,100,-;eth0: link up\n")
        #expect(oom.take(50) == false, "the earlier holder's record was read before the pid was watched")
        #expect(oom.take(60) == true)
        #expect(oom.take(70) == false, "a forged record")
        #expect(oom.take(60) == nil, "no longer watched")
        #expect(oom.take(80) == nil, "never watched: not known")
    }

    @Test func recordsThatMayHaveGoneUnreadMakeTheAnswerUnknownNotFalse() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let oom = KernelOOMLog(fd: reading, after: nil, watched: [], killed: [], recordsPerDrain: 4)
        oom.watch(10)
        oom.watch(11)
        for sequence in 1...6 { log(writing, "6,\(sequence),100,-;noise\n") }
        log(writing, Self.kill(11, sequence: 7))
        #expect(oom.take(10) == nil, "the drain stopped at its bound: a record of it may be among the rest")
        // Read on: the kill is found, and a kill is a kill whatever went unread.
        #expect(oom.take(11) == true)
        // Watched after the bound was reached, nothing unread since: known again.
        oom.watch(12)
        #expect(oom.take(12) == false)
    }

    @Test func aLiveUpgradesNextImageSkipsWhatTheEarlierOneReadAndKeepsItsKills() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let earlier = KernelOOMLog(fd: reading, after: nil, watched: [], killed: [])
        earlier.watch(30)
        log(writing, Self.kill(30, sequence: 4))
        let handed = earlier.handover()
        #expect(handed.sequence == 4 && handed.watched == [30] && handed.killed == [30])

        // The next image opens the log from its start (here: the same records again, then new ones).
        let (nextReading, nextWriting) = try logPair()
        defer { close(nextWriting) }
        log(nextWriting, Self.kill(40, sequence: 3))  // read there before 40 was watched: an earlier holder's
        log(nextWriting, Self.kill(30, sequence: 4))
        log(nextWriting, Self.kill(31, sequence: 5))
        let next = KernelOOMLog(fd: nextReading, after: handed.sequence, watched: handed.watched + [31, 40], killed: handed.killed)
        #expect(next.take(30) == true, "the kill the earlier image saw")
        #expect(next.take(31) == true, "logged after the earlier image's last read")
        #expect(next.take(40) == false, "a record the earlier image had read is not read again")
    }
}
