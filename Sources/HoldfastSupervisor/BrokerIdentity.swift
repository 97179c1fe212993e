import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// Start-up refused for a reason a restart would not cure — an unsafe run directory, another
/// daemon on it, a broker uid other processes use, a socket path that is not ours: exit code 2,
/// like a bad configuration (systemd's unit does not restart on it).
public struct StartRefused: Error, Sendable, CustomStringConvertible {
    public var description: String
    /// A shortage (memory, fds, space) stood in the way, not the configuration or the system's
    /// state: exit code 1, which the unit restarts, instead of 2, which it does not.
    public var transient: Bool
    public init(_ description: String, transient: Bool = false) {
        self.description = description
        self.transient = transient
    }
}

/// The broker's uid is its own: a process of the same uid that can see it could signal it (kill
/// it, stop it) and, were it dumpable (for a moment after its exec), take its fds with
/// `pidfd_getfd` or trace it. So the supervisor starts it only when no process in its pid
/// namespace runs as that uid — at start-up and before every restart — and never starts a
/// container process as that uid. (One in a pid namespace below, a container's, cannot see it.)
extension Supervisor {
    /// The uid the broker runs as: `broker.user`'s, or the daemon's own when it is empty.
    var brokerUID: uid_t { Self.brokerUID(of: configuration) }

    /// The uid a daemon with `configuration` runs its broker as.
    static func brokerUID(of configuration: DaemonConfiguration) -> uid_t {
        configuration.broker.user.flatMap(UserAccount.resolve)?.uid ?? geteuid()
    }

    /// Throws when a process runs as the broker's uid (unless `broker.allow_shared_uid`),
    /// naming a few of them.
    func checkBrokerUIDIsItsOwn() throws(StartRefused) {
        // A role this supervisor SIGKILLed at a failed start and has not reaped yet is no
        // sharer: it never runs its own code again, and its pid is its own until reaped.
        let dying = rolesKilledAtStart.withLockedValue { killed in
            killed.removeAll { !reaper.isUnreaped($0) }
            return Set(killed.map(\.pid))
        }
        try Self.checkBrokerUIDIsItsOwn(configuration, notCounting: dying, logger: logger)
    }

    /// `checkBrokerUIDIsItsOwn` for a daemon with `configuration`, not counting `dying`. Also
    /// asked by a live upgrade's check, with the new configuration file: a `broker.user` changed
    /// to a uid another process uses would otherwise be found only by the new image, after the
    /// old broker quiesced — every start of the new one refused, every stream stopped.
    static func checkBrokerUIDIsItsOwn(_ configuration: DaemonConfiguration, notCounting dying: Set<pid_t> = [], logger: Logger) throws(StartRefused) {
        guard !configuration.broker.allowSharedUID else { return }
        let uid = brokerUID(of: configuration)
        let others = ProcessScan.processes(withUID: uid).filter { !dying.contains($0) }
        // One in a pid namespace below ours (a runc container's root with CAP_SETUID can take
        // any uid: `setpriv --reuid`) cannot see the broker: no signal, trace or pidfd of its
        // reaches it. Counted as a sharer, it kept every broker after a crash, and a live
        // upgrade's, from starting for as long as it lived: every stream stopped.
        let sharers = others.filter { ProcessScan.sharesOurPIDNamespace($0) ?? true }
        let unseeing = others.filter { !sharers.contains($0) }
        if !unseeing.isEmpty {
            logger.warning(
                "processes in another pid namespace run as the broker's uid: they cannot see the broker, which starts all the same",
                metadata: ["uid": "\(uid)", "processes": "\(name(unseeing))"])
        }
        guard !sharers.isEmpty else { return }
        // Another daemon's broker (started with another run directory, `HOLDFAST_RUN_DIR` say):
        // said as what it is, not as a stray process that happens to have the uid.
        if let other = sharers.first(where: { ProcessScan.arguments(of: $0, first: 2) == ["holdfast", "broker"] }) {
            throw StartRefused(
                "another holdfast daemon runs (pid \(other), a holdfast broker as uid \(uid), is its broker): one daemon per guest — "
                    + "two would take each other's place on the host's bridge. Stop it first (its run directory is not \(configuration.runDirectory))")
        }
        let whose = configuration.broker.user.map { "broker.user '\($0)' (uid \(uid)) is not the broker's own" }
            ?? "broker.user is empty, so the broker would keep this daemon's uid \(uid), which is not its own"
        throw StartRefused(
            "\(whose): \(name(sharers)) run as it and could signal the broker; "
                + "give the broker a dedicated user or a uid no process uses (uid:N, e.g. from "
                + "\(ReservedUIDs.range.lowerBound)-\(ReservedUIDs.range.upperBound)), or set broker.allow_shared_uid: true")
    }

    /// A few processes by pid and command name, for a message.
    static func name(_ processes: [pid_t]) -> String {
        let named = processes.prefix(5).map { pid in "pid \(pid)" + (ProcessScan.commandName(of: pid).map { " (\($0))" } ?? "") }
        return named.joined(separator: ", ") + (processes.count > 5 ? " and \(processes.count - 5) more" : "")
    }

    /// A process the host or a local client asks for may not run as the broker's uid.
    func refuseTheBrokersUID(_ spec: ProcessSpec) async throws(HoldfastError) {
        guard !configuration.broker.allowSharedUID, configuration.broker.user != nil else { return }
        let broker = brokerUID
        let uid: uid_t?
        switch spec.runtime ?? .direct {
        case .direct:
            if let user = spec.user { uid = UserAccount.forProcess(user)?.uid } else { uid = geteuid() }
        case .runc:
            let bundle = spec.container.flatMap { id in entry(id)?.container?.bundle } ?? spec.bundle
            let inContainer = spec.user.flatMap { UInt32($0.split(separator: ":").first ?? "") }
            if let bundle { uid = await RuncBundleIdentity.hostUID(bundle: bundle, containerUID: inContainer) } else { uid = nil }
        }
        if uid == broker {
            throw HoldfastError(.badUser, "the process would run as uid \(broker), the broker's: no other process may share the broker's uid")
        }
        // A container in the guest's pid namespace whose user namespace maps the broker's uid:
        // any process in it with CAP_SETUID (its root) can take that uid and signal the broker.
        if spec.runtime == .runc, spec.container == nil, let bundle = spec.bundle, await RuncBundleIdentity.sharesThisPIDNamespace(bundle: bundle),
            let mapping = await RuncBundleIdentity.mapping(holding: broker, bundle: bundle)
        {
            throw HoldfastError(
                .badUser,
                "the bundle's linux.uidMappings map uid \(broker), the broker's (\(mapping)), and the container shares the guest's pid namespace: "
                    + "a process in it could take that uid and signal the broker; map a range without it, or give the container a pid namespace of its own")
        }
    }
}

/// Which host uid a runc container's process runs as: its config.json's `process.user.uid` (or
/// an exec's own), mapped through `linux.uidMappings` when the container has a user namespace;
/// and whether it shares this process's pid namespace.
enum RuncBundleIdentity {
    private struct Config: Decodable {
        struct Process: Decodable {
            struct User: Decodable { var uid: UInt32? }
            var user: User?
        }
        struct Linux: Decodable {
            struct Mapping: Decodable {
                var containerID: UInt32
                var hostID: UInt32
                var size: UInt32
            }
            var uidMappings: [Mapping]?
            struct Namespace: Decodable {
                var type: String
                var path: String?
            }
            var namespaces: [Namespace]?
        }
        var process: Process?
        var linux: Linux?
    }

    /// The parts of `bundle`'s config.json read here; nil if it cannot be read or parsed. Read
    /// off the cooperative pool: a bundle on a hung file system holds its create alone.
    private static func config(of bundle: String) async -> Config? {
        guard let bytes = await OffThreadWork.readWholeFile(bundle + "/config.json") else { return nil }
        return try? JSONDecoder().decode(Config.self, from: Data(bytes))
    }

    /// Whether a container made from `bundle` shares this process's pid namespace: its
    /// config.json names no pid namespace, or one at a path that is this one. A bundle that
    /// cannot be read counts as sharing it (the guard then applies; runc says what is wrong).
    static func sharesThisPIDNamespace(bundle: String) async -> Bool {
        guard let config = await config(of: bundle) else { return true }
        guard let pid = config.linux?.namespaces?.first(where: { $0.type == "pid" }) else { return true }
        guard let path = pid.path, !path.isEmpty else { return false }
        return PIDNamespace.isOurs(path) ?? true
    }

    /// The mapping of `bundle`'s `linux.uidMappings` that maps host uid `hostUID` into the
    /// container ("containerID:hostID:size"), if any.
    static func mapping(holding hostUID: uid_t, bundle: String) async -> String? {
        guard let mappings = await config(of: bundle)?.linux?.uidMappings else { return nil }
        return mappings.first { hostUID >= $0.hostID && UInt64(hostUID) < UInt64($0.hostID) + UInt64($0.size) }
            .map { "\($0.containerID):\($0.hostID):\($0.size)" }
    }

    /// nil when the bundle cannot be read (runc will say why) or the uid is not mapped.
    static func hostUID(bundle: String, containerUID: uid_t?) async -> uid_t? {
        guard let config = await config(of: bundle) else { return nil }
        let uid = containerUID ?? config.process?.user?.uid ?? 0
        guard let mappings = config.linux?.uidMappings, !mappings.isEmpty else { return uid }
        for mapping in mappings where uid >= mapping.containerID && UInt64(uid) < UInt64(mapping.containerID) + UInt64(mapping.size) {
            return mapping.hostID + (uid - mapping.containerID)
        }
        return nil
    }
}
