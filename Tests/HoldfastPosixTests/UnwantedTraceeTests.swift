import HoldfastPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What the reaper hands on when it lets go of a child that made it its tracer (the daemon's
/// side is `ContainmentTests.aProcessThatAsksToBeTracedRunsOnAndItsExitIsItsOwn`).
@Suite struct UnwantedTraceeTests {
    @Test func everySignalButTheExecsTrapIsHandedOn() {
        let ownPIDs: [pid_t] = [4242]
        // SI_USER from itself: the trap the kernel sends after an exec of a traced process.
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (0, 4242), ownPIDs: ownPIDs) == 0)
        // raise(3) is tgkill (SI_TKILL, -6); a breakpoint instruction is the kernel's (SI_KERNEL
        // 0x80, TRAP_BRKPT 1); another process's kill(2) names that process.
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (-6, 4242), ownPIDs: ownPIDs) == SIGTRAP)
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (0x80, 0), ownPIDs: ownPIDs) == SIGTRAP)
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (1, 0), ownPIDs: ownPIDs) == SIGTRAP)
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (0, 1), ownPIDs: ownPIDs) == SIGTRAP)
        // Any other signal, whoever sent it; a group stop (no siginfo) keeps its signal.
        for signal in [SIGTERM, SIGUSR1, SIGSTOP, SIGINT, SIGWINCH, SIGCHLD] {
            #expect(UnwantedTracee.signalToHandOn(stopSignal: signal, sender: (0, 4242), ownPIDs: ownPIDs) == signal)
        }
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: nil, ownPIDs: ownPIDs) == SIGTRAP)
    }

    /// In a pid namespace (a runc container's process, reparented to the supervisor), the sender
    /// of the exec's trap is the process as its own namespace numbers it: the innermost pid.
    @Test func aContainersOwnTrapIsKnownByItsPidInItsNamespace() {
        let status = "Name:\tsh\nTgid:\t31337\nPid:\t31337\nNSpid:\t31337\t1\nNSpgid:\t31337\t1\n"
        let pids = UnwantedTracee.namespacePIDs(inStatus: status)
        #expect(pids == [31337, 1])
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (0, 1), ownPIDs: pids) == 0)
        #expect(UnwantedTracee.signalToHandOn(stopSignal: SIGTRAP, sender: (0, 31337), ownPIDs: pids) == SIGTRAP)
        #expect(UnwantedTracee.namespacePIDs(inStatus: "Name:\tx\nNSpid:\t7\n") == [7])
        #expect(UnwantedTracee.namespacePIDs(inStatus: "Name:\tx\n").isEmpty)
    }
}
