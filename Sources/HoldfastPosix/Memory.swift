import CHoldfastShims
import NIOConcurrencyHelpers

public enum Memory {
    /// Makes glibc give data-plane buffers (64 KiB and up: relay buffers, replay-ring blocks)
    /// their own mappings, so memory taken in a burst goes back to the system when the burst is
    /// acknowledged, instead of staying in malloc's arenas as RSS for the life of the process.
    /// Small allocations are unaffected. Call once at start-up, before threads allocate.
    public static func returnLargeBuffersToTheSystem(threshold: Int = 64 * 1024) {
        _ = hf_malloc_mmap_threshold(Int32(threshold))
    }

    /// What malloc holds: bytes handed out and not returned (a leak grows this), and bytes
    /// free inside its heap and arenas (fragmentation: RSS that is not in use).
    public static func mallocUsage() -> (inUse: Int, free: Int) {
        var inUse = 0
        var free = 0
        hf_malloc_usage(&inUse, &free)
        return (inUse, free)
    }

    /// Gives malloc's free whole pages back to the system. The broker calls it after a burst
    /// of streams has finished: small allocations freed by many threads leave pages free in
    /// every thread's arena, which stay resident until trimmed.
    @discardableResult
    public static func returnFreePagesToTheSystem() -> Bool {
        hf_malloc_trim() != 0
    }
}

/// Gives malloc's free pages back to the system every `interval` while work was done since the
/// last time: a burst of requests (a host flooding the bridge) leaves pages free in every
/// thread's arena, resident for the life of the process unless trimmed. Idle, it costs a timer.
public final class MemoryTidier: Sendable {
    private let workSinceTidy = NIOLockedValueBox(0)
    public let interval: Duration

    public init(interval: Duration = .seconds(2)) { self.interval = interval }

    public func noteWork() { workSinceTidy.withLockedValue { $0 &+= 1 } }

    /// Runs until the task is cancelled.
    public func run() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            let worked = workSinceTidy.withLockedValue { count -> Bool in
                defer { count = 0 }
                return count > 0
            }
            if worked { Memory.returnFreePagesToTheSystem() }
        }
    }
}
