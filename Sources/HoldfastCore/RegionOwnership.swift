import Synchronization

/// Who owns one region of shared memory (a stream's slot of the ring area) in this process:
/// the newest claim. An older claim's writes to the region — a departed stream's storage
/// giving its blocks back or releasing their pages, which can come long after its process left
/// (`deinit` runs when the last task holding the stream lets go) — are refused once a newer
/// stream was given the region: in a reused slot they would zero bytes the newer stream has
/// not delivered yet, or erase its table entries (and with them what a successor restores
/// after a crash).
///
/// A claim's writes run under the ownership's lock, and a new claim takes it too: a write
/// already under way finishes before the new owner starts, none starts after.
public final class RegionOwnership: Sendable {
    private let generation = Mutex<UInt64>(0)

    public init() {}

    /// A claim that makes every earlier one stale.
    public func claim() -> Claim {
        Claim(ownership: self, generation: generation.withLock { g in
            g += 1
            return g
        })
    }

    /// Makes every claim stale and runs `body` while none can start (the region is cleared
    /// for its next owner).
    public func revoke(_ body: () -> Void) {
        generation.withLock { g in
            g += 1
            body()
        }
    }

    public struct Claim: Sendable {
        let ownership: RegionOwnership
        let generation: UInt64

        /// Runs `body` if this is still the region's newest claim; returns whether it ran.
        @discardableResult
        public func whileCurrent(_ body: () -> Void) -> Bool {
            ownership.generation.withLock { g in
                guard g == generation else { return false }
                body()
                return true
            }
        }

        public var isCurrent: Bool { ownership.generation.withLock { $0 == generation } }
    }
}
