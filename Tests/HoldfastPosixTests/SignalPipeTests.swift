import CHoldfastShims
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// The self-pipe's records: each signal with who sent it — the supervisor tells an operator's
/// stop from a container's `kill $PPID` by that — and no sender for one the kernel raised.
@Suite("SignalPipe: each signal with its sender", .timeLimit(.minutes(2)))
struct SignalPipeTests {
    @Test func eachSignalArrivesWithItsSenderOrAsTheKernels() async throws {
        // A handler is per process: in a process of its own, not the test runner.
        guard try await isolated("eachSignalArrivesWithItsSenderOrAsTheKernels", timeout: .seconds(30)) else { return }
        let realtime = hf_sigrtmin() + 5
        let signals = try SignalPipe(signals: [SIGUSR2, realtime, SIGCHLD])
        #expect(kill(getpid(), SIGUSR2) == 0)
        var value = sigval()
        value.sival_int = 7
        #expect(sigqueue(getpid(), realtime, value) == 0)
        // Two signals pending at once may be handled in either order (a handler can be
        // interrupted by the next before it writes).
        var received: [ReceivedSignal] = []
        for _ in 0..<2 { if let signal = await signals.next() { received.append(signal) } }
        let fromHere = [SIGUSR2, realtime].map { ReceivedSignal(number: $0, senderPID: getpid(), senderUID: getuid()) }
        #expect(Set(received.map(\.number)) == Set([SIGUSR2, realtime]) && received.allSatisfy { fromHere.contains($0) }, "\(received)")
        #expect(received.first?.sender.hasPrefix("pid \(getpid()) (uid \(getuid())") == true)

        // A child's exit: the kernel's SIGCHLD, no sender.
        let child = try Spawner.spawn(SpawnOptions(executable: "/bin/true", arguments: ["true"]))
        let exited = await signals.next()
        #expect(exited == ReceivedSignal(number: SIGCHLD), "\(String(describing: exited))")
        #expect(exited?.sender == "the kernel")
        var status: Int32 = 0
        #expect(waitpid(child, &status, 0) == child)
    }

    /// Two pipes for different signals (a host client's INT/TERM/HUP to one, its SIGWINCH to
    /// another): each signal reaches its own. The handler had one fd for every signal, so the
    /// second pipe took the first's: a terminal client's SIGTERM was read as a window change, and
    /// neither passed on nor ending the client.
    @Test func twoPipesForDifferentSignalsEachGetTheirOwn() async throws {
        guard try await isolated("twoPipesForDifferentSignalsEachGetTheirOwn", timeout: .seconds(30)) else { return }
        let first = try SignalPipe(signals: [SIGUSR1])
        let second = try SignalPipe(signals: [SIGUSR2])
        #expect(kill(getpid(), SIGUSR1) == 0)
        #expect(kill(getpid(), SIGUSR2) == 0)
        let toFirst = try await withTimeout("SIGUSR1 at the first pipe", .seconds(10)) { await first.next() }
        let toSecond = try await withTimeout("SIGUSR2 at the second pipe", .seconds(10)) { await second.next() }
        #expect(toFirst?.number == SIGUSR1)
        #expect(toSecond?.number == SIGUSR2)
    }
}
