import HoldfastCore
import NIOConcurrencyHelpers

/// A terminal's resizes, made on the reactor's thread one at a time.
///
/// Why: TIOCSWINSZ on a pty's master takes the terminal's size lock, and the process on the
/// terminal can hold that lock inside the kernel as long as it likes (TIOCGWINSZ copies the size
/// out holding it, into memory that may never arrive: README, "Security"). Made on a control
/// request's thread, the resize would hold that thread — and the broker serves its control
/// requests one at a time. On the reactor's thread the watchdog takes over from it; the request
/// is answered after at most `answerWithin`; and a resize asked while one waits only replaces
/// the size applied next, so a held terminal holds one thread however often it is resized.
public final class TerminalSizer: Sendable {
    public enum Outcome: Sendable, Equatable {
        case applied
        case failed(SystemError)
        /// Not applied within the bound: the terminal's lock is held; applied when let go.
        case pending
    }

    private let terminal: AsyncFD
    private let answerWithin: Duration
    private let state = NIOLockedValueBox(State())

    private struct State {
        var next: WindowSize?
        /// The run applying sizes now, and what its last resize said.
        var running: Task<SystemError?, Never>?
    }

    public init(_ terminal: AsyncFD, answerWithin: Duration = .seconds(2)) {
        self.terminal = terminal
        self.answerWithin = answerWithin
    }

    public func resize(to size: WindowSize) async -> Outcome {
        let run = state.withLockedValue { s -> Task<SystemError?, Never> in
            s.next = size
            if let running = s.running { return running }
            let run = Task(executorPreference: terminal.reactor) { [self] in applySizes() }
            s.running = run
            return run
        }
        guard let failure = await run.value(within: answerWithin) else { return .pending }
        return failure.map { .failed($0) } ?? .applied
    }

    /// Applies the newest size asked until none is left; returns the last resize's error.
    private func applySizes() -> SystemError? {
        var failure: SystemError?
        while let size = state.withLockedValue({ s -> WindowSize? in
            defer { s.next = nil }
            if s.next == nil { s.running = nil }
            return s.next
        }) {
            do {
                try terminal.withSyscall { () throws(SystemError) in try Terminal.resize(fd: terminal.fd, to: size) }
                failure = nil
            } catch let error as SystemError {
                failure = error
            } catch {
                failure = SystemError("ioctl(TIOCSWINSZ, fd \(terminal.fd))", errno: .badFileDescriptor)
            }
        }
        return failure
    }
}
