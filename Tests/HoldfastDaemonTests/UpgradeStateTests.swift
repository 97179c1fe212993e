import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Testing

#if canImport(Glibc)
import Glibc
#endif

import Foundation

@testable import HoldfastSupervisor

/// What a live upgrade writes down for the next binary, read back; and the rule that lets the
/// fd store grow without the upgrade knowing its fields in advance.
@Suite("The live upgrade's state")
struct UpgradeStateTests {
    func store() throws -> StdioStore {
        var store = StdioStore(slots: 64)
        let secret = try StreamSecret(hex: String(repeating: "cd", count: 32))
        var request = AdoptRequest(process: "p1", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .resumable, token: "t-out", secret: secret),
            StreamDescription(kind: .stdin, fd: 1, address: "unix:/run/in.sock", mode: .resumable, token: "t-in", secret: secret),
        ])
        store.assignCheckpoints(&request)
        store.keep("p1", request: request, descriptors: [41, 42], adoptedBy: 3)
        store.exited("p1")
        var handoff = AdoptRequest(process: "h1", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .resumable, token: "h-out", secret: secret, checkpoint: 60_000)
        ])
        handoff.handoffOwner = nil
        let kept = store.keepHandoff(HandoffDeposit(request: handoff, owner: 1000), descriptors: [43], adoptedBy: 3)
        #expect(kept == .kept)
        _ = store.inputEnded("p1", endedByHost: true)  // its stdin (fd 42) closed: -1 in the entry, not passed on
        return store
    }

    @Test func theStateRoundTripsAndNamesEveryFdItPasses() throws {
        let store = try store()
        let table = ProcessTable(instanceID: "instance-9")
        let state = UpgradeState(
            version: UpgradeState.currentVersion, writtenBy: "0.1.0", upgrades: 3, uptimeSeconds: 12.5, executable: "/usr/bin/holdfast",
            configPath: "/etc/holdfast/holdfast.yaml", ringCapacity: 1 << 20,
            runDirectory: "/run/holdfast", controlSocket: "/run/holdfast/control.sock", handoffSocket: "/run/holdfast/broker.sock",
            descriptors: .init(control: 7, handoff: 8, checkpoints: 9, rings: 10), table: table.snapshot(), stdio: store.snapshot(),
            reaped: [.init(pid: 4321, status: .exited(3))], roles: [.init(name: "broker", restarts: 2, lastExit: "exit code 0")],
            kernelLog: .init(descriptor: 12, watched: ["p1": 4321, "p2": 4400], killed: ["p2"]))
        #expect(Set(state.keptDescriptors) == [7, 8, 9, 10, 12, 41, 43], "the listeners, the memory areas, the kernel's log and every open stdio fd")
        let (decoded, restoredTable) = try UpgradeState.decode(Array(try JSONEncoder().encode(state)))
        #expect(decoded.stdio == state.stdio)
        #expect(decoded.kernelLog == state.kernelLog, "where the kernel's log was read to, and the OOM kills seen but not yet reported")
        #expect(decoded.reaped == state.reaped && decoded.roles == state.roles && decoded.descriptors == state.descriptors)
        #expect(restoredTable.instanceID == "instance-9")
        // The next image's first broker is handed every process, and owes every exit.
        var restored = StdioStore(restoring: decoded.stdio)
        #expect(restored.slots == store.slots)
        let (ours, theirs) = try FDChannel.pair()
        defer { close(theirs) }
        let client = RPCClient(channel: FDChannel(try AsyncFD(adopting: ours)))
        defer { client.close() }
        let first = restored.brokerStarted(client)
        let claimed = restored.claim(for: first)
        #expect(claimed.map(\.process) == ["h1", "p1"])
        // The stdin the host ended goes over as a placeholder (the supervisor opens /dev/null for
        // it): the successor owes the host its acknowledgements and END echo.
        #expect(claimed.first { $0.process == "p1" }?.descriptors == [41, StdioStore.endedInput], "the ended stdin is handed over, without its pipe")
        #expect(claimed.allSatisfy { $0.request.streams.allSatisfy { $0.resume == true } })
    }

    /// The configuration a fallen-back image goes on with when its file no longer loads
    /// (`Resumption.fallBack`) travels in the state whole: every shipped one round-trips.
    @Test(arguments: ["config/holdfast.yaml", "config/holdfast-dev.yaml"])
    func theRunningConfigurationRoundTrips(file: String) async throws {
        let configuration = try await ConfigurationLoader.load(path: file, environment: ["HOLDFAST_BROKER_USER": "nobody"])
        let state = UpgradeState(
            version: UpgradeState.currentVersion, writtenBy: "0.1.0", upgrades: 1, uptimeSeconds: 1, executable: "/usr/bin/holdfast",
            configPath: file, ringCapacity: 1 << 20, runDirectory: "/run/holdfast", controlSocket: "/run/holdfast/control.sock",
            handoffSocket: "/run/holdfast/broker.sock", descriptors: .init(control: 7), table: ProcessTable(instanceID: "i").snapshot(),
            stdio: try store().snapshot(), reaped: [], roles: [], previousImage: 12, configuration: configuration)
        #expect(state.keptDescriptors.contains(12), "the way back is passed across the exec")
        let (decoded, _) = try UpgradeState.decode(Array(try JSONEncoder().encode(state)))
        #expect(decoded.configuration == configuration)
        #expect(decoded.previousImage == 12)
    }

    @Test func aStateOfAnotherVersionIsRefusedBeforeItsShapeIsRead() throws {
        let newer = Array(#"{"version": 2, "writtenBy": "9.0.0", "whatever": {"comes": "next"}}"#.utf8)
        #expect {
            _ = try UpgradeState.decode(newer)
        } throws: { error in
            (error as? HoldfastError)?.code == .incompatibleState
                && (error as? HoldfastError)?.message.contains("written as version 2 (by holdfast 9.0.0)") == true
        }
        #expect(throws: HoldfastError.self) { _ = try UpgradeState.decode(Array("not json".utf8)) }
    }

    /// A state with nothing in it but what every state has, as binary `writtenBy` writes it.
    func minimalState(writtenBy: String) throws -> UpgradeState {
        UpgradeState(
            version: UpgradeState.currentVersion, writtenBy: writtenBy, upgrades: 1, uptimeSeconds: 1, executable: "/usr/bin/holdfast",
            configPath: "/etc/holdfast/holdfast.yaml", ringCapacity: 1 << 20, runDirectory: "/run/holdfast", controlSocket: "/run/holdfast/control.sock",
            handoffSocket: "/run/holdfast/broker.sock", descriptors: .init(control: 7), table: ProcessTable(instanceID: "i").snapshot(),
            stdio: try store().snapshot(), reaped: [], roles: [])
    }

    /// A newer binary's state (a higher revision: fields of meaning this binary does not know)
    /// is refused, saying what to do, so a live downgrade never drops them silently; its own
    /// revision and an older binary's state (no revision: 1) are read.
    @Test func aStateOfANewerRevisionIsRefusedAndAnOlderOneRead() throws {
        let state = try minimalState(writtenBy: "0.1.0")
        let encoded = try JSONEncoder().encode(state)
        var object = try #require(try JSONSerialization.jsonObject(with: encoded) as? [String: Any])
        #expect(object["revision"] as? Int == UpgradeState.currentRevision, "written with this binary's revision")
        #expect(try UpgradeState.decode(Array(encoded)).state.revision == UpgradeState.currentRevision)
        object["revision"] = UpgradeState.currentRevision + 1
        object["writtenBy"] = "9.0.0"
        let newer = Array(try JSONSerialization.data(withJSONObject: object))
        #expect {
            _ = try UpgradeState.decode(newer)
        } throws: { error in
            let message = (error as? HoldfastError)?.message ?? ""
            return (error as? HoldfastError)?.code == .incompatibleState && message.contains("written by holdfast 9.0.0")
                && message.contains("A live upgrade onto an older binary is refused")
        }
        object.removeValue(forKey: "revision")
        let older = Array(try JSONSerialization.data(withJSONObject: object))
        #expect(try UpgradeState.decode(older).state.revision == nil, "an older binary's state (revision 1) is read")
    }

    /// A state whose shared memory areas are laid out otherwise (a release that changed the
    /// checkpoint slot or the ring block) is refused before the exec, saying so: taken over, its
    /// checkpoints read as none and every resumable stream started again at 0, which the host
    /// refuses for ever. The writer's own layout, and a state without one (older), are read.
    @Test func aStateLaidOutOtherwiseIsRefused() throws {
        let state = try minimalState(writtenBy: "0.2.0")
        let encoded = try JSONEncoder().encode(state)
        #expect(try UpgradeState.decode(Array(encoded)).state.memoryLayout == .current, "written with this build's layout")
        var object = try #require(try JSONSerialization.jsonObject(with: encoded) as? [String: Any])
        let changes: [(String, Any)] = [
            ("checkpointSlotSize", 64), ("checkpointMagic", 0x4846_434B_5054_3031), ("checkpointSlots", 1024), ("handoffSlotsFrom", 100),
            ("ringBlockSize", 16384), ("ringSlots", 8),
        ]
        for change in changes {
            var layout = try #require(object["memoryLayout"] as? [String: Any])
            layout[change.0] = change.1
            var other = object
            other["memoryLayout"] = layout
            #expect {
                _ = try UpgradeState.decode(Array(try JSONSerialization.data(withJSONObject: other)))
            } throws: { error in
                let message = (error as? HoldfastError)?.message ?? ""
                return (error as? HoldfastError)?.code == .incompatibleState && message.contains("holdfast 0.2.0 lays out")
                    && message.contains("A live upgrade between them is refused")
            }
        }
        object.removeValue(forKey: "memoryLayout")
        #expect(try UpgradeState.decode(Array(try JSONSerialization.data(withJSONObject: object))).state.memoryLayout == nil, "an older state is read")
    }

    /// The fd store is written down whole (`StdioStore.Held` is Codable), so a field added to it
    /// travels by itself; but the fds it holds must stay open across the exec, which only those
    /// `heldDescriptors` lists do. Every `Int32` anywhere in an entry is an fd (stream fds are
    /// indexes, `Int`): this fails when one is added and not listed.
    @Test func everyFdAnEntryHoldsIsListedForTheExec() throws {
        let store = try store()
        for (process, entry) in store.snapshot().held {
            var found: [Int32] = []
            func walk(_ value: Any) {
                if let number = value as? Int32 { found.append(number) }
                for child in Mirror(reflecting: value).children { walk(child.value) }
            }
            walk(entry)
            #expect(Set(found.filter { $0 >= 0 }) == Set(entry.heldDescriptors), "\(process): Int32s \(found), listed \(entry.heldDescriptors)")
        }
    }
}
