#if canImport(Glibc)
import Glibc
#endif

/// A signal to a process group whose leader was reaped: what it left behind (an orphan holding
/// its output open). The kernel gives a number out again only once no task uses it as a pid, a
/// process group or a session, so while any member lives no process has the number as its pid.
/// A process that does is a stranger that got it after every member had ended (at once, when
/// something moves `ns_last_pid` back) and may lead a group of its own (any `setsid` child):
/// `kill(-N)` reached that group. Then nothing is sent.
public enum ProcessGroupSignal {
    public enum Outcome: Sendable, Equatable {
        /// Sent to the group's members.
        case sent
        /// A process now has the number as its pid: the group is gone, and the number another's.
        case numberTaken
        /// No member is left.
        case noMembers
    }

    public static func sendAfterLeaderReaped(group: pid_t, _ signal: Int32) -> Outcome {
        guard group > 1 else { return .noMembers }
        if kill(group, 0) == 0 || errno == EPERM { return .numberTaken }
        // Between the check and the send the last member could end and the number go to a new
        // group leader: a window of a syscall, where the number alone was a window of as long
        // as the stop took.
        return kill(-group, signal) == 0 ? .sent : .noMembers
    }
}
