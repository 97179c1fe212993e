/// The subordinate uid ranges of /etc/subuid (`newuidmap`'s: `alice:100000:65536`): a user may
/// map any uid of its ranges into a user namespace of its own and run as it there — and to the
/// kernel's permission checks (a signal, ptrace) that is that uid. A broker whose uid lies in
/// someone's range is not its own.
public struct SubordinateIDRange: Sendable, Equatable {
    /// The user (a name or a uid) the range belongs to.
    public var owner: String
    public var start: UInt64
    public var count: UInt64

    public func contains(_ id: UInt32) -> Bool { UInt64(id) >= start && UInt64(id) - start < count }

    /// As the file says it.
    public var line: String { "\(owner):\(start):\(count)" }
}

public enum SubordinateIDs {
    public static let uidFile = "/etc/subuid"

    /// The ranges in a subuid file's text; lines that are not `owner:start:count` are skipped
    /// (newuidmap skips them too).
    public static func ranges(in text: String) -> [SubordinateIDRange] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: ":", omittingEmptySubsequences: false)
            guard fields.count == 3, !fields[0].isEmpty, let start = UInt64(fields[1]), let count = UInt64(fields[2]), count > 0 else {
                return nil
            }
            return SubordinateIDRange(owner: String(fields[0]), start: start, count: count)
        }
    }

    /// The first range that holds `id`, if any.
    public static func range(holding id: UInt32, in ranges: [SubordinateIDRange]) -> SubordinateIDRange? {
        ranges.first { $0.contains(id) }
    }

    /// This system's subordinate uid ranges (none if the file is absent or unreadable).
    public static func systemUIDRanges() -> [SubordinateIDRange] {
        ranges(in: readSmallFile(uidFile) ?? "")
    }
}
