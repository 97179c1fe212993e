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
        let (reading, writing) = try FDChannel.pair()  // SOCK_SEQPACKET: one message per read
        #expect(fcntl(reading, F_SETFL, fcntl(reading, F_GETFL) | O_NONBLOCK) == 0)
        return (reading, writing)
    }

    func log(_ fd: Int32, _ record: String) {
        let bytes = Array(record.utf8)
        #expect(write(fd, bytes, bytes.count) == bytes.count)
    }

    static func kill(_ pid: pid_t, sequence: Int, priority: Int = 3) -> String {
        "\(priority),\(sequence),100,-;Memory cgroup out of memory: Killed process \(pid) (awk) total-vm:1kB\n"
    }

    @Test func onlyTheKernelsRecordOfAProcessAfterItsMarkCounts() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let oom = KernelOOMLog(fd: reading)
        // An earlier process with pid 50, killed before the new one started: read by the mark.
        log(writing, Self.kill(50, sequence: 1))
        let mark = oom.mark()
        oom.watch("a", pid: 50, since: mark)
        oom.watch("b", pid: 60, since: mark)
        oom.watch("c", pid: 70, since: mark)
        log(writing, Self.kill(60, sequence: 2))
        log(writing, Self.kill(70, sequence: 3, priority: 11))  // written from user space: facility 1
        log(writing, "6,4,100,-;eth0: link up\n")
        #expect(oom.take("a") == false, "the earlier holder's record was read before the mark")
        #expect(oom.take("b") == true)
        #expect(oom.take("c") == false, "a forged record")
        #expect(oom.take("b") == nil, "no longer watched")
        #expect(oom.take("z") == nil, "never watched: not known")
    }

    @Test func aKillReadBeforeItsProcessIsWatchedStillCounts() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let oom = KernelOOMLog(fd: reading)
        let mark = oom.mark()
        // The process runs and is killed before it is watched; another create's mark reads the record.
        log(writing, Self.kill(61, sequence: 5))
        _ = oom.mark()
        oom.watch("fast", pid: 61, since: mark)
        #expect(oom.take("fast") == true)
    }

    @Test func aNewProcessThatTookThePidDoesNotTakeTheAnswerOfTheOneThatHadIt() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let oom = KernelOOMLog(fd: reading)
        oom.watch("old", pid: 70, since: oom.mark())
        log(writing, Self.kill(70, sequence: 1))
        // Reaped, its pid reused at once by a new process before the old one's exit was taken.
        let mark = oom.mark()
        oom.watch("new", pid: 70, since: mark)
        #expect(oom.take("old") == true)
        #expect(oom.take("new") == false)
    }

    @Test func recordsThatMayHaveGoneUnreadMakeTheAnswerUnknownNotFalse() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let oom = KernelOOMLog(fd: reading, recordsPerRead: 4)
        oom.watch("a", pid: 10, since: oom.mark())
        oom.watch("b", pid: 11, since: oom.mark())
        for sequence in 1...6 { log(writing, "6,\(sequence),100,-;noise\n") }
        log(writing, Self.kill(11, sequence: 7))
        #expect(oom.take("a") == nil, "its read stopped at the bound: a record of it may be among the rest")
        #expect(oom.take("b") == true, "read on from there")
        oom.watch("c", pid: 12, since: oom.mark())
        #expect(oom.take("c") == false)

        // More kills between a process's mark and its watch than are kept: not known.
        let (reading2, writing2) = try logPair()
        defer { close(writing2) }
        let busy = KernelOOMLog(fd: reading2, recordsPerRead: 1000)
        let mark = busy.mark()
        for index in 0..<(KernelOOMLog.recentKillsKept + 10) { log(writing2, Self.kill(pid_t(1000 + index), sequence: index + 1)) }
        _ = busy.mark()
        busy.watch("late", pid: 99, since: mark)
        #expect(busy.take("late") == nil)
    }

    @Test func aLiveUpgradesNextImageReadsOnFromWhereTheEarlierOneStoppedAndKeepsItsKills() throws {
        let (reading, writing) = try logPair()
        defer { close(writing) }
        let earlier = KernelOOMLog(fd: reading)
        earlier.watch("a", pid: 30, since: earlier.mark())
        earlier.watch("b", pid: 31, since: earlier.mark())
        log(writing, Self.kill(30, sequence: 4))
        earlier.drainForTests()
        var handover = earlier.handover()
        #expect(handover.descriptor == reading && handover.watched == ["a": 30, "b": 31] && handover.killed == ["a"])
        // What the exec carries: the same open file (here a duplicate, as `earlier` closes its own).
        handover.descriptor = dup(reading)
        // Logged between the handover and the next image's first read (during the exec).
        log(writing, Self.kill(31, sequence: 5))
        let next = KernelOOMLog.adopt(handover)
        #expect(next.take("a") == true, "the kill the earlier image saw")
        #expect(next.take("b") == true, "logged while no image read: the position crossed the exec")
    }
}
