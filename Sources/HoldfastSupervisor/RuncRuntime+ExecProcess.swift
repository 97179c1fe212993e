import HoldfastPosix
import HoldfastProtocol

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Any JSON value, kept as read, so an OCI process spec can be taken whole from a bundle and
/// only the fields an exec sets changed (what runc itself does for `runc exec` without
/// `--process`).
enum JSONValue: Codable, Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case unsigned(UInt64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Int64.self) {
            self = .integer(value)
        } else if let value = try? container.decode(UInt64.self) {
            self = .unsigned(value)  // rlimits may be 2^64-1
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .integer(let value): try container.encode(value)
        case .unsigned(let value): try container.encode(value)
        case .number(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }

    subscript(key: String) -> JSONValue? {
        get {
            if case .object(let object) = self { return object[key] }
            return nil
        }
        set {
            guard case .object(var object) = self else { return }
            object[key] = newValue
            self = .object(object)
        }
    }
}

extension RuncRuntime {
    /// The process spec for `runc exec --process`: the container's own process from its
    /// bundle's config.json (environment, capabilities, user, rlimits...) with the exec's args,
    /// terminal flag and — the reason for not using runc's flags — its console size, which runc
    /// applies before the program starts. Set afterwards, a quick program (`stty size`) could
    /// run first and see a 0×0 terminal.
    static func execProcess(bundle: String, spec: ProcessSpec) async throws(HoldfastError) -> [UInt8] {
        let path = bundle + "/config.json"
        guard let bytes = await OffThreadWork.readWholeFile(path) else {
            throw HoldfastError(.runtimeFailed, "cannot read the container's config \(path)")
        }
        guard let config = try? JSONDecoder().decode(JSONValue.self, from: Data(bytes)), var process = config["process"],
            case .object = process
        else {
            throw HoldfastError(.runtimeFailed, "\(path) has no process object")
        }
        process["args"] = .array(spec.argv.map { .string($0) })
        process["terminal"] = .bool(spec.tty)
        process["consoleSize"] =
            spec.tty ? .object(["height": .integer(Int64(spec.rows ?? 24)), "width": .integer(Int64(spec.columns ?? 80))]) : nil
        if let cwd = spec.cwd { process["cwd"] = .string(cwd) }
        if let extra = spec.env, !extra.isEmpty {
            // A variable given here replaces the container's of the same name.
            let names = Set(extra.map { $0.split(separator: "=", maxSplits: 1).first.map(String.init) ?? $0 })
            var environment: [JSONValue] = []
            if case .array(let existing) = process["env"] ?? .null {
                environment = existing.filter {
                    guard case .string(let entry) = $0 else { return true }
                    return !names.contains(entry.split(separator: "=", maxSplits: 1).first.map(String.init) ?? entry)
                }
            }
            process["env"] = .array(environment + extra.map { .string($0) })
        }
        if let user = spec.user {
            let ids = user.split(separator: ":").compactMap { UInt32($0) }
            var account = process["user"] ?? .object([:])
            account["uid"] = .integer(Int64(ids[0]))
            if ids.count > 1 { account["gid"] = .integer(Int64(ids[1])) }
            process["user"] = account
        }
        do {
            return Array(try JSONEncoder().encode(process))
        } catch {
            throw HoldfastError(.runtimeFailed, "cannot encode the exec's process: \(error)")
        }
    }
}
