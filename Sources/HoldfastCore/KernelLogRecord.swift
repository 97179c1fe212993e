/// One record of the kernel's log as `/dev/kmsg` gives it, one per read:
/// `3,1652,32832108395,-;Memory cgroup out of memory: Killed process 11641 (awk) total-vm:48864kB, ...`
/// (the priority — facility × 8 + level —, the sequence number, microseconds since boot, flags,
/// more comma-separated fields on some kernels, then after `;` the text; continuation lines
/// after a newline). Pure.
public struct KernelLogRecord: Equatable, Sendable {
    /// 0 only for the kernel's own records: a record written to `/dev/kmsg` from user space is
    /// given LOG_USER (1) when it asks for facility 0. (The kernel's own records may still quote
    /// what a process chose: `oomKilledPID` reads only the OOM killer's.)
    public var facility: Int
    public var level: Int
    public var sequence: UInt64
    /// The record's first line.
    public var text: Substring

    public init(facility: Int, level: Int, sequence: UInt64, text: Substring) {
        self.facility = facility
        self.level = level
        self.sequence = sequence
        self.text = text
    }

    /// A record's bytes as one read of `/dev/kmsg` returned them; nil for anything else.
    public static func parse(_ record: String) -> KernelLogRecord? {
        guard let semicolon = record.firstIndex(of: ";") else { return nil }
        let fields = record[..<semicolon].split(separator: ",", omittingEmptySubsequences: false)
        guard fields.count >= 3, let priority = Int(fields[0]), priority >= 0, let sequence = UInt64(fields[1]) else { return nil }
        let rest = record[record.index(after: semicolon)...]
        let text = rest.firstIndex(of: "\n").map { rest[..<$0] } ?? rest
        return KernelLogRecord(facility: priority >> 3, level: priority & 7, sequence: sequence, text: text)
    }

    /// The pid in the OOM killer's "Killed process PID (COMM)" record, from the kernel itself:
    /// the text starts with one of the OOM killer's own prefixes (`Out of memory: Killed
    /// process 4321 (awk) ...`, `Memory cgroup out of memory: ...`, `Out of memory
    /// (oom_kill_allocating_task): ...`). Nothing less: the kernel also logs, at its own
    /// facility, text a process chose (a mount option it did not know, a process name), which
    /// can say "Killed process" anywhere but there. Nil for every other record.
    public var oomKilledPID: Int32? {
        guard facility == 0 else { return nil }
        for prefix in Self.oomKillPrefixes where text.hasPrefix(prefix) {
            let after = text.dropFirst(prefix.count)
            let digits = after.prefix { $0.isASCII && $0.isNumber }
            guard !digits.isEmpty, after.dropFirst(digits.count).hasPrefix(" ("), let pid = Int32(digits), pid > 0 else { return nil }
            return pid
        }
        return nil
    }

    /// The OOM killer's records (mm/oom_kill.c, Linux 4.19 and later).
    static let oomKillPrefixes = [
        "Out of memory: Killed process ", "Memory cgroup out of memory: Killed process ",
        "Out of memory (oom_kill_allocating_task): Killed process ",
    ]
}
