import CHoldfastShims
import Foundation
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

    /// A flood of SIGCHLDs (children exiting faster than they are reaped) does not fill the pipe:
    /// one record stands for them all until it is read, and a SIGTERM after them arrives. Before,
    /// each wrote a record, the full pipe dropped the next — the operator's stop was lost.
    @Test func aFloodOfChildExitsCannotCrowdOutAStop() async throws {
        guard try await isolated("aFloodOfChildExitsCannotCrowdOutAStop", timeout: .seconds(30)) else { return }
        let signals = try SignalPipe(signals: [SIGCHLD, SIGTERM])
        // raise() runs the handler before it returns, on a thread of our own that does not
        // block them (the pool's threads do): 6,000 records' worth, more than a pipe holds.
        // Read only once they are all in: the pipe holds what the flood left.
        let raised = DispatchSemaphore(value: 0)
        let raiser = Thread {
            ProcessImage.unblock([SIGCHLD, SIGTERM])
            for _ in 0..<6000 { raise(SIGCHLD) }
            raise(SIGTERM)
            raised.signal()
        }
        raiser.start()
        #expect(raised.wait(timeout: .now() + 20) == .success)
        var chld = 0
        var term = false
        while !term {
            guard let signal = try await withTimeout("the next record", .seconds(5), { await signals.next() }) else { break }
            if signal.number == SIGCHLD { chld += 1 }
            if signal.number == SIGTERM { term = true }
        }
        #expect(term, "the SIGTERM after the flood arrived")
        #expect(chld == 1, "one SIGCHLD record for the flood: \(chld)")
        // Read, it is written again for the next exit.
        #expect(kill(getpid(), SIGCHLD) == 0)
        let next = try await withTimeout("a SIGCHLD after the read", .seconds(5)) { await signals.next() }
        #expect(next?.number == SIGCHLD)
    }
}
