import CHoldfastShims

public enum Memory {
    /// Makes glibc give data-plane buffers (64 KiB and up: relay buffers, replay-ring blocks)
    /// their own mappings, so memory taken in a burst goes back to the system when the burst is
    /// acknowledged, instead of staying in malloc's arenas as RSS for the life of the process.
    /// Small allocations are unaffected. Call once at start-up, before threads allocate.
    public static func returnLargeBuffersToTheSystem(threshold: Int = 64 * 1024) {
        _ = hf_malloc_mmap_threshold(Int32(threshold))
    }
}
