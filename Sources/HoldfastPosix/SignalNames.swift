#if canImport(Glibc)
import Glibc
#endif

/// Linux's signals by name, for the commands that take one (`host kill`, `host stop`): a name
/// with or without `SIG` in any case, `RTMIN+N`/`RTMAX-N`, or a number from 1 to 64.
public enum SignalNames {
    /// Every standard signal, in number order.
    public static let standard: [(name: String, number: Int32)] = [
        ("HUP", SIGHUP), ("INT", SIGINT), ("QUIT", SIGQUIT), ("ILL", SIGILL), ("TRAP", SIGTRAP), ("ABRT", SIGABRT),
        ("BUS", SIGBUS), ("FPE", SIGFPE), ("KILL", SIGKILL), ("USR1", SIGUSR1), ("SEGV", SIGSEGV), ("USR2", SIGUSR2),
        ("PIPE", SIGPIPE), ("ALRM", SIGALRM), ("TERM", SIGTERM), ("STKFLT", SIGSTKFLT), ("CHLD", SIGCHLD), ("CONT", SIGCONT),
        ("STOP", SIGSTOP), ("TSTP", SIGTSTP), ("TTIN", SIGTTIN), ("TTOU", SIGTTOU), ("URG", SIGURG), ("XCPU", SIGXCPU),
        ("XFSZ", SIGXFSZ), ("VTALRM", SIGVTALRM), ("PROF", SIGPROF), ("WINCH", SIGWINCH), ("IO", SIGIO), ("PWR", SIGPWR),
        ("SYS", SIGSYS),
    ]

    /// The highest signal number Linux has (SIGRTMAX).
    public static let highest: Int32 = 64
    /// The kernel's SIGRTMIN (glibc keeps 32 and 33 for itself and reports 34).
    static let realTimeFirst: Int32 = 34

    /// The number `text` names, or nil.
    public static func number(_ text: String) -> Int32? {
        if let number = Int32(text) { return (1...highest).contains(number) ? number : nil }
        var name = text.uppercased()
        if name.hasPrefix("SIG") { name.removeFirst(3) }
        if let match = standard.first(where: { $0.name == name }) { return match.number }
        if name == "RTMIN" { return realTimeFirst }
        if name == "RTMAX" { return highest }
        // The offset's range is checked before any arithmetic: `RTMIN+2147483614` overflowed
        // Int32 and trapped the CLI.
        let realTimeOffsets = 0...(highest - realTimeFirst)
        if name.hasPrefix("RTMIN+"), let offset = Int32(name.dropFirst(6)), realTimeOffsets.contains(offset) {
            return realTimeFirst + offset
        }
        if name.hasPrefix("RTMAX-"), let offset = Int32(name.dropFirst(6)), realTimeOffsets.contains(offset) {
            return highest - offset
        }
        return nil
    }

    /// "SIGTERM" for 15, "SIGRTMIN+2" for 36, "signal 99" for what is not a signal.
    public static func name(_ number: Int32) -> String {
        if let match = standard.first(where: { $0.number == number }) { return "SIG" + match.name }
        if (realTimeFirst...highest).contains(number) {
            return number == realTimeFirst ? "SIGRTMIN" : "SIGRTMIN+\(number - realTimeFirst)"
        }
        return "signal \(number)"
    }

    /// What an error about a bad signal lists.
    public static var validNames: String {
        standard.map(\.name).joined(separator: " ") + ", RTMIN, RTMIN+N, RTMAX-N, RTMAX (with or without SIG, any case), or a number from 1 to \(highest)"
    }
}
