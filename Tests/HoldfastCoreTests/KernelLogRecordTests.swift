import HoldfastCore
import Testing

@Suite("KernelLogRecord: /dev/kmsg records, and the OOM killer's among them")
struct KernelLogRecordTests {
    @Test func theOOMKillersRecordsNameTheirPid() throws {
        let cgroup = try #require(KernelLogRecord.parse(
            "3,1652,32832108395,-;Memory cgroup out of memory: Killed process 11641 (awk) total-vm:48864kB, anon-rss:32292kB, UID:0 oom_score_adj:0\n"))
        #expect(cgroup.facility == 0 && cgroup.level == 3 && cgroup.sequence == 1652)
        #expect(cgroup.oomKilledPID == 11641)
        #expect(KernelLogRecord.parse("3,7,1,-;Out of memory: Killed process 42 (java) total-vm:1kB\n")?.oomKilledPID == 42)
        // More prefix fields (CONFIG_PRINTK_CALLER) and continuation lines.
        let caller = try #require(KernelLogRecord.parse("3,9,5,-,caller=T123;Out of memory: Killed process 7 (sh)\n SUBSYSTEM=x\n"))
        #expect(caller.oomKilledPID == 7 && caller.text == "Out of memory: Killed process 7 (sh)")
    }

    @Test func recordsWrittenFromUserSpaceOrSayingSomethingElseNameNoOne() {
        // What a process writes to /dev/kmsg gets the user facility (priority 8 and above).
        #expect(KernelLogRecord.parse("11,8,1,-;Out of memory: Killed process 42 (sh) total-vm:1kB\n")?.oomKilledPID == nil)
        #expect(KernelLogRecord.parse("14,8,1,-;Out of memory: Killed process 42 (sh)\n")?.facility == 1)
        #expect(KernelLogRecord.parse("6,9,1,-;oom_reaper: reaped process 42 (sh), now anon-rss:0kB\n")?.oomKilledPID == nil)
        #expect(KernelLogRecord.parse("6,9,1,-;audit: Killed process 42 (sh)\n")?.oomKilledPID == nil, "another subsystem's words")
        #expect(KernelLogRecord.parse("3,9,1,-;Out of memory (oom_kill_allocating_task): Killed process 42 (sh)\n")?.oomKilledPID == 42)
        #expect(KernelLogRecord.parse("6,9,1,-;something Killed process 42 (sh)\n")?.oomKilledPID == nil, "not after a subsystem's colon")
        // The kernel quoting what a process chose, at its own facility: a mount option it did not know.
        #expect(KernelLogRecord.parse("3,9,1,-;tmpfs: Unknown parameter 'Out of memory: Killed process 4242 (x'\n")?.oomKilledPID == nil)
        #expect(KernelLogRecord.parse("3,9,1,-;Killed process 42 (java) total-vm:1kB\n")?.oomKilledPID == nil, "without the OOM killer's prefix")
        #expect(KernelLogRecord.parse("6,9,1,-;Out of memory: Killed process 42(sh)\n")?.oomKilledPID == nil)
        #expect(KernelLogRecord.parse("6,9,1,-;Out of memory: Killed process x (sh)\n")?.oomKilledPID == nil)
        #expect(KernelLogRecord.parse("no semicolon") == nil)
        #expect(KernelLogRecord.parse("a,b,c;text") == nil)
        #expect(KernelLogRecord.parse("3,1;text") == nil)
    }
}
