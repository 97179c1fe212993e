#if canImport(Glibc)
import Glibc
#endif

/// A place where a test makes a holdfast process die, as a crash would, at an instant no signal
/// sent from outside could hit: `HOLDFAST_FAILPOINT=NAME:PROCESS` kills the process that passes
/// `NAME` for process `PROCESS` with SIGKILL. Debug builds only: a release build (the package)
/// has no failpoints, so no environment can make it die.
public enum Failpoint {
    /// The broker stopped a handoff peer's process's streams and told the supervisor it is
    /// releasing it; the answer with the fds is not written yet.
    public static let brokerReleaseMarked = "broker-release-marked"
    /// The broker wrote the answer to a `release`; the supervisor was not told it ended yet.
    public static let brokerReleaseAnswered = "broker-release-answered"
    /// The broker told the supervisor a handoff peer's process exited; its drain has not begun.
    public static let brokerExitMarked = "broker-exit-marked"

    /// Whether this build has failpoints (tests that need one skip without).
    public static var compiledIn: Bool {
        #if DEBUG
        true
        #else
        false
        #endif
    }

    #if DEBUG
    private static let armed: String? = getenv("HOLDFAST_FAILPOINT").map { String(cString: $0) }
    #endif

    /// Dies here if a test armed `name` for `process` (debug builds only).
    @inline(__always)
    public static func pass(_ name: String, process: String) {
        #if DEBUG
        guard let armed, armed == "\(name):\(process)" else { return }
        // tgkill to itself: the one kill the broker's seccomp filter allows.
        raise(SIGKILL)
        #endif
    }
}
