#if canImport(Glibc)
import Glibc
#endif

/// Parsers for configuration values. Each returns the value or the reason it is wrong, in words
/// an operator can act on.
public enum ValueParsers {
    /// "250ms", "2s", "1.5s", "5m", "1h" → milliseconds (> 0).
    public static func positiveDuration(_ text: String) -> Result<Int, Problem> {
        let units: [(String, Double)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            let number = text.dropLast(suffix.count)
            // "5ms" also ends in "s": only accept a clean number before the unit.
            guard let value = Double(number), value.isFinite else { continue }
            let milliseconds = (value * scale).rounded()
            guard milliseconds >= 1 else { return .failure("must be at least 1ms") }
            guard milliseconds <= 86_400_000 else { return .failure("must be at most 24h") }
            return .success(Int(milliseconds))
        }
        return .failure("expected a duration with a unit: ms, s, m or h (e.g. 100ms, 2s)")
    }

    /// "1MiB", "64KiB", "1048576" → bytes.
    public static func size(_ text: String, in range: ClosedRange<Int>) -> Result<Int, Problem> {
        let units: [(String, Int)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("B", 1), ("", 1)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let value = Int(text.dropLast(suffix.count)) else { continue }
            let bytes = value.multipliedReportingOverflow(by: scale)
            guard !bytes.overflow, range.contains(bytes.partialValue) else {
                return .failure("must be between \(range.lowerBound) and \(range.upperBound) bytes")
            }
            return .success(bytes.partialValue)
        }
        return .failure("expected a size such as 1MiB, 256KiB or a number of bytes")
    }

    public static func integer(_ text: String, in range: ClosedRange<Int>) -> Result<Int, Problem> {
        guard let value = Int(text) else { return .failure("expected a whole number") }
        guard range.contains(value) else { return .failure("must be between \(range.lowerBound) and \(range.upperBound)") }
        return .success(value)
    }

    /// "SIGTERM", "TERM" or "15".
    static let signalNames: [String: Int32] = [
        "HUP": SIGHUP, "INT": SIGINT, "QUIT": SIGQUIT, "KILL": SIGKILL, "USR1": SIGUSR1, "USR2": SIGUSR2,
        "TERM": SIGTERM,
    ]

    /// The name `signal` accepts for a number ("SIGTERM"), or the number itself.
    public static func signalName(_ number: Int32) -> String {
        signalNames.first { $0.value == number }.map { "SIG" + $0.key } ?? String(number)
    }

    public static func signal(_ text: String) -> Result<Int32, Problem> {
        let names = signalNames
        let number: Int32
        if let given = Int32(text), given > 0, given < 65 {
            number = given
        } else {
            let name = text.uppercased().hasPrefix("SIG") ? String(text.uppercased().dropFirst(3)) : text.uppercased()
            guard let named = names[name] ?? neverEnds.first(where: { $0.value == name })?.key else {
                return .failure("expected a signal such as SIGTERM, SIGINT or a number")
            }
            number = named
        }
        return .success(number)
    }

    /// Why `number` makes a poor shutdown signal, or nil: one whose default is to do nothing,
    /// or to stop or continue the process, ends nothing, and every stop waits out the whole
    /// grace, then ends everything with SIGKILL. A warning (the daemon's log at start, `config
    /// check`), not a refusal: a file that loaded before must not stop a reboot's start.
    public static func shutdownSignalWarning(_ number: Int32) -> String? {
        guard let name = neverEnds[number] else { return nil }
        return "WARNING: SIG\(name) does not end a process (ignored, or stops or continues it, by default): every stop waits out shutdown.grace, then SIGKILLs; use SIGTERM, SIGINT, SIGHUP, SIGQUIT or SIGUSR1/2"
    }

    /// Signals whose default action is to ignore them or to stop or continue the process
    /// (signal(7)), by name.
    static let neverEnds: [Int32: String] = [
        SIGCHLD: "CHLD", SIGCONT: "CONT", SIGSTOP: "STOP", SIGTSTP: "TSTP", SIGTTIN: "TTIN", SIGTTOU: "TTOU", SIGURG: "URG", SIGWINCH: "WINCH",
    ]

    /// "true" or "false" (YAML's yes/no spellings too).
    public static func boolean(_ text: String) -> Result<Bool, Problem> {
        switch text.lowercased() {
        case "true", "yes", "on": return .success(true)
        case "false", "no", "off": return .success(false)
        default: return .failure("expected true or false")
        }
    }

    /// An octal file mode such as "0660".
    public static func fileMode(_ text: String) -> Result<UInt32, Problem> {
        guard let mode = UInt32(text, radix: 8), mode <= 0o777 else { return .failure("expected an octal mode such as 0660") }
        return .success(mode)
    }

    /// "0, 1000" or a YAML list of numbers → ids.
    public static func idList(_ text: String) -> Result<[UInt32], Problem> {
        var ids: [UInt32] = []
        for part in text.split(separator: ",") {
            let trimmed: (Character) -> Bool = { $0.isWhitespace || $0 == "[" || $0 == "]" }
            let item = String(part.drop(while: trimmed).reversed().drop(while: trimmed).reversed())
            if item.isEmpty { continue }
            // "1000 1001" once read as 10001001: the ids meant were refused, another let in.
            if item.contains(where: \.isWhitespace) { return .failure("'\(item)': separate ids with commas (1000, 1001)") }
            guard let id = UInt32(item) else { return .failure("'\(item)' is not a numeric id") }
            ids.append(id)
        }
        return .success(ids)
    }

    /// An absolute Unix socket path that fits a sockaddr_un; "" means "none".
    public static func socketPath(_ text: String) -> Result<String, Problem> {
        guard !text.isEmpty else { return .success("") }
        guard text.hasPrefix("/") else { return .failure("must be an absolute path") }
        guard text.utf8.count <= 107 else { return .failure("is \(text.utf8.count) bytes; a socket path holds at most 107") }
        return .success(text)
    }
}

/// Why a value is wrong, in words.
public struct Problem: Error, Sendable, Equatable, ExpressibleByStringLiteral, ExpressibleByStringInterpolation {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public init(stringLiteral value: String) { reason = value }
}
