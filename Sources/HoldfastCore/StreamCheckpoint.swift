/// One stream's progress, written where the crash of its relay cannot take it: a 128-byte slot of
/// memory shared with a process that outlives the relay (the broker writes, the supervisor holds
/// the memfd, a new broker reads it back). It says where the stream stands in its producer's
/// pipe, so a relay started after a crash resumes at the right offset and can say exactly which
/// bytes may be missing or repeated (docs/ARCHITECTURE.md, "Surviving a broker crash").
///
/// One writer, one word per step. A *take* moves bytes between the process's pipe and the
/// stream (output: a read from the pipe into the replay ring; input: a write into the pipe):
///
///     beginTake(at: o, upTo: n)   state = o | pending, pendingLength = n    (before the syscall)
///     took(upTo: o + k)           state = o + k                              (one store after it)
///
/// A crash leaves either a settled state (every byte before it taken, none after) or a pending
/// one: the syscall may have taken up to `n` bytes at `o`. A take through a *window* (a pipe the
/// supervisor holds, between the process's pipe and the relay) also records the window's level
/// before the syscall, so a reader after the crash measures how many of the `n` bytes moved —
/// from the level it finds — instead of guessing (`Recovered.settled`). The stores before the syscall need
/// no order among themselves (the syscall has not run until both are done); the one after it is
/// a single aligned 64-bit store, which a crash cannot tear. Nothing here orders stores for
/// another CPU: the reader only reads after the writer is dead.
public struct StreamCheckpoint: @unchecked Sendable {
    public static let slotSize = 128
    /// Changed with the slot's layout: a slot of another layout is not read (nor is the area,
    /// across a live upgrade: `UpgradeState.MemoryLayout`).
    public static let magic: UInt64 = 0x4846_434B_5054_3032  // "HFCKPT02"
    static let pendingBit: UInt64 = 1 << 63
    /// The pending take goes through a window whose level before it is in `windowLevel`.
    static let windowBit: UInt64 = 1 << 62

    private enum Field: Int {
        case magic = 0
        case state = 8
        case pendingLength = 16
        case acknowledged = 24
        case start = 32
        case restarts = 40
        case lost = 48
        case lostTo = 56
        case repeated = 64
        case holeFrom = 72
        case holeTo = 80
        case windowLevel = 88
    }

    /// What a checkpoint said when its writer died.
    public struct Recovered: Sendable, Equatable {
        /// Every byte before this offset was taken; none after it, except...
        public var taken: UInt64
        /// ...up to this many bytes at `taken`, by a take the crash interrupted (0: none was).
        public var uncertain: Int
        /// The peer's last acknowledgement the writer saw (output streams).
        public var acknowledged: UInt64
        /// Where the last incarnation started, and how many incarnations resumed before it.
        public var start: UInt64
        public var restarts: UInt64
        /// Bytes reported lost (GAP) by every incarnation so far: a stream's loss is counted
        /// once, however many brokers carried it.
        public var lost: UInt64
        /// The end of the highest range counted in `lost`: a later incarnation told the same
        /// bytes again (its GAP lost with a connection) does not count them twice.
        public var lostTo: UInt64
        /// Input streams: bytes every incarnation so far may have written to the process twice
        /// (a crash inside a write to its pipe), counted once each.
        public var repeated: UInt64
        /// Output streams: offsets whose bytes are unknown (an earlier incarnation's interrupted
        /// read), never to be sent as data — told to the host as a gap until it has moved past.
        /// A successor that dies before its GAP went out leaves them here for the next.
        public var hole: Range<UInt64>?
        /// The interrupted take went through a window that held this many bytes before it
        /// (nil: no window, or no take was interrupted).
        public var windowLevel: Int? = nil

        /// The interrupted take, settled by the window's level now (read after the writer
        /// died): an output's read *out of* its window took `before - now` bytes of it, an
        /// input's write *into* its stage put `now - before` there. Either way every one of them
        /// is accounted for — in the ring (output) or in a pipe the process will read (input) —
        /// so the take is no longer uncertain. A level outside what the take could have done
        /// (the window touched by someone else) settles nothing.
        public func settled(direction: StreamDirection, windowLevelNow now: Int) -> Recovered {
            guard uncertain > 0, let before = windowLevel else { return self }
            let moved = direction == .send ? before - now : now - before
            guard moved >= 0, moved <= uncertain else { return self }
            var settled = self
            settled.taken += UInt64(moved)
            settled.uncertain = 0
            settled.windowLevel = nil
            return settled
        }

        /// An output stream resumes after every byte that may have left the pipe: the
        /// uncertain ones, if any, are reported missing.
        public var outputResumesAt: UInt64 { taken + UInt64(uncertain) }
        /// An input stream resumes at the first byte not known to be in the pipe: the
        /// uncertain ones, if any, may reach the process twice.
        public var inputResumesAt: UInt64 { taken }

        /// The offsets of `restored` (an output's ring, as the crashed relay's memory left it)
        /// whose bytes are unknown, so never sent as data: the read this crash interrupted, and
        /// a hole an earlier incarnation started with whose GAP may never have gone out. Two
        /// are merged into one (the bytes between them are then reported lost too: more than
        /// was, never unknown bytes sent as data). Nil when the ring holds none.
        public func outputHole(in restored: RestoredRing?) -> Range<UInt64>? {
            guard let restored else { return nil }
            // Within the restored ring (what is outside it is no ring byte to hold back).
            func clamp(_ range: Range<UInt64>) -> Range<UInt64>? {
                let lower = max(range.lowerBound, restored.start)
                let upper = min(range.upperBound, restored.end)
                return lower < upper ? lower..<upper : nil
            }
            var hole = uncertain > 0 ? clamp(taken..<outputResumesAt) : nil
            if let carried = self.hole.flatMap(clamp) {
                hole = hole.map { min($0.lowerBound, carried.lowerBound)..<max($0.upperBound, carried.upperBound) } ?? carried
            }
            return hole
        }
    }

    private let base: UnsafeMutableRawPointer

    /// What a successor found its predecessor's interrupted take left unknown, written into the
    /// slot by `start` *before* the new state: an output's hole, an input's bytes that may reach
    /// the process twice. Written after it (as before), a successor killed between the two left
    /// a slot that said nothing was pending and held no hole — its own successor sent the
    /// unknown bytes as data, and counted no repeat.
    public struct TakenOver: Sendable, Equatable {
        public var hole: Range<UInt64>?
        public var repeated: UInt64
        public init(hole: Range<UInt64>? = nil, repeated: UInt64 = 0) {
            self.hole = hole
            self.repeated = repeated
        }
    }

    /// Set by a successor before its stream starts (`start(at:resumed: true)` writes it).
    public var takenOver = TakenOver()

    /// A view of the 64 bytes at `slot` (8-byte aligned, inside a shared mapping that outlives
    /// this value).
    public init(slot: UnsafeMutableRawPointer) {
        precondition(Int(bitPattern: slot) % 8 == 0, "a checkpoint slot is 8-byte aligned")
        base = slot
    }

    private func load(_ field: Field) -> UInt64 { base.load(fromByteOffset: field.rawValue, as: UInt64.self) }
    private func store(_ value: UInt64, _ field: Field) { base.storeBytes(of: value, toByteOffset: field.rawValue, as: UInt64.self) }

    /// A stream (re)starts at `offset`: a fresh stream at 0, a resumed one where its recovery
    /// said. The restart count and the loss so far survive a resume.
    public func start(at offset: UInt64, resumed: Bool) {
        let carried = resumed && load(.magic) == Self.magic
        let restarts = carried ? load(.restarts) + 1 : 0
        store(carried ? load(.lost) : 0, .lost)
        store(carried ? load(.lostTo) : 0, .lostTo)
        let takenOver = resumed ? self.takenOver : TakenOver()
        store((carried ? load(.repeated) : 0) + takenOver.repeated, .repeated)
        store(takenOver.hole?.lowerBound ?? (carried ? load(.holeFrom) : 0), .holeFrom)
        store(takenOver.hole?.upperBound ?? (carried ? load(.holeTo) : 0), .holeTo)
        // Only now the state that says nothing is pending any more.
        store(offset, .state)
        store(0, .pendingLength)
        store(offset, .acknowledged)
        store(offset, .start)
        store(restarts, .restarts)
        store(Self.magic, .magic)
    }

    /// Before a syscall that may take up to `length` bytes at `offset` — through a window that
    /// holds `windowLevel` bytes now, if it goes through one.
    public func beginTake(at offset: UInt64, upTo length: Int, windowLevel: Int? = nil) {
        store(UInt64(length), .pendingLength)
        if let windowLevel { store(UInt64(windowLevel), .windowLevel) }
        store(offset | Self.pendingBit | (windowLevel == nil ? 0 : Self.windowBit), .state)
    }

    /// After it: every byte before `end` was taken (`end` equal to the take's offset when it
    /// took none).
    public func took(upTo end: UInt64) {
        store(end, .state)
    }

    /// The peer acknowledged everything before `offset`.
    public func acknowledged(_ offset: UInt64) {
        store(offset, .acknowledged)
    }

    /// The stream's loss over every incarnation is now `total` bytes, the highest of it ending
    /// at `to`.
    public func lost(total: UInt64, to: UInt64) {
        // The total first: a relay killed between the two stores leaves its successor counting
        // the newest range once more (the exit over-reports the loss), never counted as done and
        // missing from the total (a loss the exit did not report).
        store(total, .lost)
        store(to, .lostTo)
    }

    /// An input stream's bytes that may have reached its process twice, over every incarnation.
    public var repeated: UInt64 { load(.repeated) }

    /// Offsets whose bytes this stream will never send (the hole a resumed output starts with).
    public func hole(_ range: Range<UInt64>) {
        store(range.lowerBound, .holeFrom)
        store(range.upperBound, .holeTo)
    }

    /// The slot is free again (its process is gone).
    public func clear() {
        store(0, .magic)
    }

    /// What the slot says, read after its writer died; nil if it was never started or was
    /// cleared.
    public var recovered: Recovered? {
        guard load(.magic) == Self.magic else { return nil }
        let state = load(.state)
        let pending = state & Self.pendingBit != 0
        let windowed = pending && state & Self.windowBit != 0
        return Recovered(
            taken: state & ~(Self.pendingBit | Self.windowBit), uncertain: pending ? Int(clamping: load(.pendingLength)) : 0,
            acknowledged: load(.acknowledged), start: load(.start), restarts: load(.restarts), lost: load(.lost),
            lostTo: load(.lostTo), repeated: load(.repeated),
            hole: load(.holeTo) > load(.holeFrom) ? load(.holeFrom)..<load(.holeTo) : nil,
            windowLevel: windowed ? Int(clamping: load(.windowLevel)) : nil)
    }
}
