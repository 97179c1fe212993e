#if canImport(Glibc)
import Glibc
#endif

/// Work that may block for as long as something outside pleases — a read of a file on a file
/// system that can hang (a bundle's config.json on a stalled virtiofs, 9p or NFS mount) — run
/// on a thread of its own, awaited without holding a thread of the cooperative pool. That pool
/// has one thread per CPU and does not grow: as many such blocked reads as the guest has CPUs
/// stopped every task of the daemon. A thread per call: these are rare (one per runc create),
/// and a hung one costs its own thread alone.
public enum OffThreadWork {
    /// Runs `work` on a new thread and returns its result; nil only if no thread could be made
    /// (then `work` runs here, as it would have before).
    public static func run<Result: Sendable>(_ work: @escaping @Sendable () -> Result) async -> Result {
        await withCheckedContinuation { (continuation: CheckedContinuation<Result, Never>) in
            let job = OffThreadJob { continuation.resume(returning: work()) }
            let box = Unmanaged.passRetained(job)
            var thread = pthread_t()
            let created = pthread_create(&thread, nil, { context in
                Unmanaged<OffThreadJob>.fromOpaque(context!).takeRetainedValue().run()
                return nil
            }, box.toOpaque())
            guard created == 0 else {
                box.release()
                continuation.resume(returning: work())
                return
            }
            pthread_detach(thread)
        }
    }

    /// The whole file at `path` (`WholeFile.read`), read on a thread of its own.
    public static func readWholeFile(_ path: String) async -> [UInt8]? {
        await run { WholeFile.read(path) }
    }
}

/// What a thread of `OffThreadWork` runs (handed to it through pthread_create's argument).
private final class OffThreadJob: @unchecked Sendable {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}
