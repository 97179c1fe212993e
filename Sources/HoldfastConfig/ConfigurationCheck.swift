import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `holdfast config check FILE`: the loader's verdict, and on success every key with the value
/// the daemon would use and where it came from (the file, an environment variable, or the
/// default).
public struct ConfigurationCheck: Sendable, Equatable, Codable {
    /// One key of the effective configuration.
    public struct Setting: Sendable, Equatable, Codable {
        public var key: String
        /// In the file's syntax ("100ms", "1MiB", "0660", "[0]"): a file made of these values
        /// loads to the same configuration.
        public var value: String
        /// "file", "environment (HOLDFAST_…)" or "default".
        public var source: String
        /// What the value means on this system, when it is not obvious ("uid 999, gid 999").
        public var note: String?
    }

    public var file: String
    public var valid: Bool
    public var settings: [Setting]
    /// When invalid: the key at fault ("" for the file as a whole) and why.
    public var key: String?
    public var reason: String?

    /// Every key in the order of config/holdfast.yaml.
    public static let keyOrder: [String] = ConfigurationLoader.keys.map(\.key)

    /// Loads `path` with the daemon's loader (same checks, same errors) and describes the result.
    public static func run(path: String, environment: [String: String] = ConfigurationLoader.currentEnvironment()) async
        -> ConfigurationCheck
    {
        let configuration: DaemonConfiguration
        do {
            configuration = try await ConfigurationLoader.load(path: path, environment: environment)
        } catch {
            return ConfigurationCheck(file: path, valid: false, settings: [], key: error.key, reason: error.reason)
        }
        let inFile = Set((try? ConfigurationLoader.listKeys(path: path)) ?? [])
        let values = configuration.effectiveValues
        let settings = keyOrder.map { key -> Setting in
            let variable = ConfigurationLoader.environmentVariable(for: key)
            let source: String
            if key == "run_directory", environment[ConfigurationLoader.runDirectoryVariable] != nil {
                source = "environment (\(ConfigurationLoader.runDirectoryVariable))"
            } else if environment[variable] != nil {
                source = "environment (\(variable))"
            } else if inFile.contains(key) {
                source = "file"
            } else {
                source = "default"
            }
            let (value, note) = values[key] ?? ("?", nil)
            return Setting(key: key, value: value, source: source, note: note)
        }
        // A key file the daemon would refuse to start with (unsafe, malformed) makes the file
        // invalid, as the daemon's exit 2 would: "valid" before, then `systemctl restart` ended
        // every container and the daemon stayed down. (One not there yet is waited for; one
        // this uid cannot read is only a note: the daemon runs as root.)
        if let problem = configuration.keyFileProblem {
            return ConfigurationCheck(file: path, valid: false, settings: settings, key: "bridge.key_file", reason: problem)
        }
        return ConfigurationCheck(file: path, valid: true, settings: settings, key: nil, reason: nil)
    }

    /// What a person reads: the verdict, then a table.
    public func renderText() -> String {
        guard valid else { return ConfigurationError(file: file, key: key ?? "", reason: reason ?? "").description }
        let rows = [("KEY", "VALUE", "SOURCE")] + settings.map { setting in
            (setting.key, setting.value.isEmpty ? "\"\"" : setting.value, setting.source + (setting.note.map { "; \($0)" } ?? ""))
        }
        let keyWidth = rows.map(\.0.count).max() ?? 0
        let valueWidth = rows.map(\.1.count).max() ?? 0
        func pad(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(0, width - text.count)) }
        var lines = ["\(file): valid", ""]
        for row in rows { lines.append(pad(row.0, keyWidth + 2) + pad(row.1, valueWidth + 2) + row.2) }
        return lines.map { $0.trimmingTrailingSpaces }.joined(separator: "\n")
    }

    /// What a tool reads: this structure as JSON (keys sorted, one line).
    public func renderJSON() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(self) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}

extension ConfigurationLoader {
    /// The variable that overrides `key`: HOLDFAST_ + the key in upper case, dots as underscores.
    public static func environmentVariable(for key: String) -> String {
        "HOLDFAST_" + key.uppercased().map { $0 == "." || $0 == "-" ? "_" : $0 }.map(String.init).joined()
    }
}

extension DaemonConfiguration {
    /// Every key's value in the file's syntax, with a note where the value means more.
    public var effectiveValues: [String: (value: String, note: String?)] {
        func ids(_ list: [UInt32]) -> String { "[" + list.map(String.init).joined(separator: ", ") + "]" }
        var userNote: String?
        if let name = broker.user, let account = UserAccount.resolve(name) {
            let passwd = name.hasPrefix(UserAccount.numericPrefix) ? " (no password entry)" : ""
            userNote = "uid \(account.uid), gid \(account.gid)\(passwd)"
        } else if broker.user == nil {
            userNote = "none: the broker keeps the daemon's user"
        }
        return [
            "run_directory": (runDirectory, nil),
            "bridge.address": (bridge.address.description, nil),
            "bridge.authentication": (
                bridge.authentication.rawValue,
                bridge.authentication == .none ? "WARNING: the bridge is not authenticated; any process in the guest can pose as the daemon" : nil
            ),
            "bridge.key_file": (bridge.keyFile, keyFileNote),
            "bridge.reconnect_initial": (Self.duration(bridge.reconnectInitial), nil),
            "bridge.reconnect_max": (Self.duration(bridge.reconnectMax), nil),
            "broker.user": (broker.user ?? "", userNote),
            "broker.seccomp": (broker.seccomp, nil),
            "broker.allow_shared_uid": (broker.allowSharedUID ? "true" : "false", nil),
            "broker.restart_backoff_max": (Self.duration(broker.restartBackoffMax), nil),
            "handoff.socket": (handoff.socket, handoff.socket.isEmpty ? "no handoff socket" : nil),
            "handoff.mode": ("0" + String(handoff.mode, radix: 8), nil),
            "handoff.allowed_uids": (ids(handoff.allowedUIDs), nil),
            "handoff.allowed_gids": (ids(handoff.allowedGIDs), nil),
            "handoff.max_connections": (String(handoff.maxConnections), nil),
            "handoff.release_kept_for": (Self.duration(handoff.releaseKeptFor ?? BrokerSettings.defaultReleaseKeptFor), nil),
            "streams.redial_attempts": (String(streams.redialAttempts), nil),
            "streams.redial_interval": (Self.duration(streams.redialInterval), nil),
            "streams.connect_timeout": (Self.duration(streams.connectTimeout), nil),
            "streams.drain_timeout": (Self.duration(streams.drainTimeout), nil),
            "streams.ring_capacity": (Self.size(streams.ringCapacity), nil),
            "shutdown.signal": (ValueParsers.signalName(shutdown.signal), ValueParsers.shutdownSignalWarning(shutdown.signal) ?? "signal \(shutdown.signal)"),
            "shutdown.grace": (Self.duration(shutdown.grace), nil),
            "shutdown.timeout": (Self.duration(shutdown.timeout), shutdown.timeoutWarning),
            "control.socket": (control.socket, nil),
            "runc.path": (runc.path, nil),
            "runc.root": (runc.root, nil),
            "metrics.address": (metrics.address?.description ?? "", metrics.address == nil ? "no metrics endpoint" : nil),
            "processes.signal_guard": (
                (processes ?? .init()).signalGuard ? "true" : "false",
                (processes ?? .init()).signalGuard ? nil : "WARNING: a root direct process can stop or reload the daemon (a kill from anything it starts)"
            ),
            "processes.start_timeout": (Self.duration(processes?.startTimeout ?? Processes.defaultStartTimeout), nil),
        ]
    }

    /// What the daemon would make of the key file, checked as it would check it at start-up.
    var keyFileNote: String {
        guard bridge.authentication == .hmacSHA256 else { return "not used: bridge.authentication is none" }
        do {
            let key = try BridgeKeyFile.load(bridge.keyFile)
            return "a \(key.bytes.count)-byte key that only its owner can read"
        } catch {
            switch error.kind {
            case .unreadable where geteuid() != 0: return "cannot check it as uid \(geteuid()): \(error.reason)"
            case .missing: return "not there yet: the daemon starts with the bridge down until it is (\(error.reason))"
            default: return "the daemon will refuse to start: \(error.reason)"
            }
        }
    }

    /// Why the daemon would refuse to start over its key file, or nil: not for a key not there
    /// yet (waited for), nor one this uid cannot read when not root (the daemon runs as root).
    var keyFileProblem: String? {
        guard bridge.authentication == .hmacSHA256 else { return nil }
        do {
            _ = try BridgeKeyFile.load(bridge.keyFile)
            return nil
        } catch {
            switch error.kind {
            case .missing: return nil
            case .unreadable where geteuid() != 0: return nil
            default: return "\(error)"
            }
        }
    }

    /// The largest whole unit: 90000 → "90s", 120000 → "2m", 1500 → "1500ms".
    static func duration(_ milliseconds: Int) -> String {
        for (unit, scale) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] where milliseconds % scale == 0 {
            return "\(milliseconds / scale)\(unit)"
        }
        return "\(milliseconds)ms"
    }

    /// The largest whole binary unit: 1048576 → "1MiB".
    static func size(_ bytes: Int) -> String {
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] where bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes)"
    }
}

extension String {
    fileprivate var trimmingTrailingSpaces: String {
        String(reversed().drop { $0 == " " }.reversed())
    }
}
