import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Everything a live upgrade hands to the next binary (docs/ARCHITECTURE.md, "Live upgrade"):
/// written by the supervisor into a memfd just before it execs the new binary with
/// `--resume-from FD`, read back by the new image, which keeps the pid, the children and every
/// fd listed here (fd numbers survive an exec). It holds stream secrets: it lives in memory
/// only, never on disk or in a log.
///
/// `version` changes whenever a field changes meaning; a binary refuses a version it does not
/// know — and the old daemon asks it first (`--check-resume-snapshot`), so a refusal leaves the
/// old daemon running.
struct UpgradeState: Codable, Sendable {
    static let currentVersion = 1

    /// Which fields of meaning this binary writes and reads, counted up each time one is added
    /// whose absence a reader would misread (1: everything up to this field's arrival; 2: the
    /// slots of outputs held open past their process's exit, `StdioStore.Snapshot.heldOpen`;
    /// 3: those outputs whole, their fds kept, `StdioStore.Snapshot.heldOpenOutputs`).
    /// A reader refuses a state of a revision above its own: an older binary decodes what it
    /// knows and drops the rest without a word (a live *downgrade* then delivered a keyed
    /// signal twice, relayed a handoff release two readers held, or gave slots still written
    /// into to new streams). Binaries before revisions existed ignore it; a state without one
    /// is revision 1.
    static let currentRevision = 3
    var revision: Int? = UpgradeState.currentRevision

    /// The fds the new image takes over, by what each one is.
    struct Descriptors: Codable, Sendable, Equatable {
        /// The control socket's listener: connections made during the switch wait in its backlog.
        var control: Int32
        /// The public handoff socket's listener (nil: none configured).
        var handoff: Int32?
        /// The checkpoint area and the ring area (nil: the daemon has none).
        var checkpoints: Int32?
        var rings: Int32?
        /// The metrics endpoint's listener (nil: none configured).
        var metrics: Int32? = nil
        /// Control clients that connected during the switch, nothing read from them yet: the
        /// next image serves them from their first request.
        var parkedControl: [Int32] = []
        /// The run directory's lock file, locked (`RunDirectoryLock`): held across the exec.
        /// Absent from an older binary's state (the new image claims the lock anew).
        var runLock: Int32? = nil
    }

    /// A role's history, so `holdfast status` goes on counting across upgrades.
    struct Role: Codable, Sendable, Equatable {
        var name: String
        var restarts: Int
        var lastExit: String?
    }

    /// A child's exit the old image reaped before its watcher wrote it down.
    struct Reaped: Codable, Sendable, Equatable {
        var pid: Int32
        var status: HoldfastPosix.ExitStatus
    }

    var version: Int
    /// The release of the binary that wrote this.
    var writtenBy: String
    /// Live upgrades before this one finishes (this one included once read back).
    var upgrades: Int
    /// How long the daemon had run: its uptime goes on from there.
    var uptimeSeconds: Double
    /// The path the daemon runs from (what the next upgrade execs again) and its configuration.
    var executable: String
    var configPath: String
    /// The ring area's layout (each ring's capacity): fixed for the area's life, whatever the
    /// configuration file says now.
    var ringCapacity: Int
    /// Where the passed sockets are, and the run directory: kept for the process's life too.
    var runDirectory: String
    var controlSocket: String
    var handoffSocket: String
    var descriptors: Descriptors
    var table: ProcessTable.Snapshot
    var stdio: StdioStore.Snapshot
    var reaped: [Reaped]
    var roles: [Role]
    /// The soft limit on open files the daemon found at its first start, which its children
    /// get back (`ResourceLimits.raiseOpenFileLimit`): the new image's own is raised already.
    /// Absent from an older binary's state (which did not raise it: its limit is the one).
    var childOpenFileLimit: UInt64? = nil
    /// Likewise the OOM score adjustment the daemon found (`OOMScore.protect`).
    var childOOMScoreAdjustment: Int32? = nil
    /// Likewise the scheduling the first image started with (`StartScheduling`): the new
    /// image's own would be what an operator set on the daemon since (`renice`, `chrt`).
    var childScheduling: StartScheduling? = nil
    /// Log lines the previous image had queued and could not write before its exec (stderr not
    /// read: `LogLineQueue`), which the new image says; absent when none.
    var unwrittenLogLines: Int? = nil
    /// The binary that wrote this state, open on the very file it runs (even if a package has
    /// replaced the path since): if the next image cannot take over (its configuration no
    /// longer loads, a listener cannot be adopted, anything before it serves), it executes this
    /// one again on the same state rather than exit and take every container with it. Absent
    /// from an older binary's state (no way back there).
    var previousImage: Int32? = nil
    /// Upgrades that fell back so (`Resumption.fallBack`) since the start, and the last one's
    /// reason: `status` says them.
    var upgradesFellBack: Int? = nil
    var lastUpgradeFailure: String? = nil
    /// The configuration the writer ran with: what it goes on with if, fallen back to, its
    /// configuration file no longer loads (the likely reason its successor could not take over).
    var configuration: DaemonConfiguration? = nil
    /// The kernel's log as the earlier image read it (`KernelOOMLog`): its fd, whose read
    /// position crosses the exec, the processes it watched there and those of them the OOM
    /// killer killed. Absent from an older binary's state (its processes' answers are then not
    /// known), and where the earlier image could not read the log.
    var kernelLog: KernelOOMLog.Handover? = nil
    /// The broker running as the state was written (absent from an older binary's state): not
    /// counted as a process that took the broker's uid when the next binary checks it.
    var brokerPID: Int32? = nil

    /// A SIGHUP came during this upgrade (before its signals were held): the new image reloads
    /// once more when it serves. Absent when none did.
    var reloadFollows: Bool? = nil

    /// How the writer's build lays out the shared memory areas handed over with the state (the
    /// checkpoints' slots, the rings' blocks): compile-time constants a later release may
    /// change. A reader laying them out otherwise refuses the state: it would have found no
    /// valid checkpoint (every resumable stream started again at offset 0, which the host
    /// refuses as an offset from the future, for ever) or read the rings at the wrong offsets.
    /// Absent from an older binary's state: laid out as `current` (the only layout released).
    struct MemoryLayout: Codable, Sendable, Equatable, CustomStringConvertible {
        var checkpointSlotSize: Int
        var checkpointMagic: UInt64
        var checkpointSlots: Int
        /// Where the slots handoff peers' processes take begin (the supervisor's are below).
        var handoffSlotsFrom: Int
        var ringBlockSize: Int
        var ringSlots: Int

        static let current = MemoryLayout(
            checkpointSlotSize: StreamCheckpoint.slotSize, checkpointMagic: StreamCheckpoint.magic,
            checkpointSlots: CheckpointMemory.defaultSlotCount, handoffSlotsFrom: CheckpointMemory.handoffSlots.lowerBound,
            ringBlockSize: ReplayRing.defaultBlockSize, ringSlots: RingMemory.defaultSlotCount)

        var description: String {
            let magic = withUnsafeBytes(of: checkpointMagic.bigEndian) { String(decoding: $0, as: UTF8.self) }
            return "\(checkpointSlots) checkpoint slots of \(checkpointSlotSize) bytes (\(magic)), handoff slots from \(handoffSlotsFrom), "
                + "\(ringSlots) rings of \(ringBlockSize)-byte blocks"
        }
    }
    var memoryLayout: MemoryLayout? = .current

    /// Every fd the new image must find open: the listeners, the shared memory areas, and every
    /// process's stdio the store holds (whatever kinds of fds it holds).
    var keptDescriptors: [Int32] {
        [descriptors.control]
            + [descriptors.handoff, descriptors.checkpoints, descriptors.rings, descriptors.metrics, descriptors.runLock].compactMap { $0 }
            + descriptors.parkedControl + stdio.heldDescriptors + [previousImage, kernelLog?.descriptor].compactMap { $0 }
    }

    private struct Envelope: Decodable {
        var version: Int
        var writtenBy: String?
        var revision: Int?
    }

    /// Reads a state, refusing (`incompatible-state`) a version this binary does not know —
    /// before decoding the rest, whose shape may differ — and a process table it cannot read.
    static func decode(_ bytes: [UInt8]) throws(HoldfastError) -> (state: UpgradeState, table: ProcessTable) {
        let envelope: Envelope
        do {
            envelope = try JSONDecoder().decode(Envelope.self, from: Data(bytes))
        } catch {
            throw HoldfastError(.incompatibleState, "the upgrade state is not readable: \(error)")
        }
        guard envelope.version == currentVersion else {
            throw HoldfastError(
                .incompatibleState,
                "the upgrade state was written as version \(envelope.version) (by holdfast \(envelope.writtenBy ?? "?")); this binary (holdfast \(HoldfastVersion.string)) reads version \(currentVersion)")
        }
        guard (envelope.revision ?? 1) <= currentRevision else {
            throw HoldfastError(
                .incompatibleState,
                "the upgrade state was written by holdfast \(envelope.writtenBy ?? "?") (revision \(envelope.revision ?? 1)), newer than this binary (holdfast \(HoldfastVersion.string), revision \(currentRevision)): it would drop what it does not know. A live upgrade onto an older binary is refused; restart the daemon onto it (which ends every container process), or install holdfast \(envelope.writtenBy ?? "the running version") or newer")
        }
        let state: UpgradeState
        do {
            state = try JSONDecoder().decode(UpgradeState.self, from: Data(bytes))
        } catch {
            throw HoldfastError(.incompatibleState, "the upgrade state (version \(envelope.version)) is not readable: \(error)")
        }
        let layout = state.memoryLayout ?? .current
        guard layout == .current else {
            throw HoldfastError(
                .incompatibleState,
                "holdfast \(envelope.writtenBy ?? "?") lays out the streams' shared memory as \(layout); this binary (holdfast \(HoldfastVersion.string)) as \(MemoryLayout.current): taken over live, every resumable stream would start again from nothing. A live upgrade between them is refused; restart the daemon onto it (which ends every container process)")
        }
        return (state, try ProcessTable(restoring: state.table))
    }
}
