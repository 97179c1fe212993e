import Configuration
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import SystemPackage
import Yams

#if canImport(Glibc)
import Glibc
#endif

/// Reads and checks the daemon's configuration.
///
/// swift-configuration does the reading: the file (YAML or JSON, by extension) under
/// `HOLDFAST_*` environment variables, which override single keys. Yams is used once more to
/// list the keys the file actually has, so a misspelt key is an error rather than silently
/// ignored.
public enum ConfigurationLoader {
    /// Every key the daemon understands, with its default (nil: required), in the order of
    /// config/holdfast.yaml (`holdfast config check` lists them so).
    static let keys: [(key: String, fallback: String?)] = [
        ("run_directory", "/run/holdfast"),
        ("bridge.address", nil),
        ("bridge.authentication", BridgeAuthenticationMethod.hmacSHA256.rawValue),
        ("bridge.key_file", "/etc/holdfast/bridge.key"),
        ("bridge.reconnect_initial", "100ms"),
        ("bridge.reconnect_max", "5s"),
        ("broker.user", ""),
        ("broker.allow_shared_uid", "false"),
        ("broker.restart_backoff_max", "5s"),
        ("broker.seccomp", "kill"),
        ("handoff.socket", "{run}/broker.sock"),
        ("handoff.mode", "0660"),
        ("handoff.allowed_uids", "0"),
        ("handoff.allowed_gids", ""),
        ("handoff.max_connections", "256"),
        ("handoff.release_kept_for", "1m"),
        ("streams.redial_attempts", "60"),
        ("streams.redial_interval", "100ms"),
        ("streams.connect_timeout", "2s"),
        ("streams.drain_timeout", "30s"),
        ("streams.ring_capacity", "1MiB"),
        ("processes.signal_guard", "true"),
        ("processes.start_timeout", "1m"),
        ("shutdown.signal", "SIGTERM"),
        ("shutdown.grace", "10s"),
        ("shutdown.timeout", "30s"),
        ("control.socket", "{run}/control.sock"),
        ("runc.path", "runc"),
        ("runc.root", "{run}/runc"),
        ("metrics.address", ""),
    ]

    /// The environment variable that moves every default path (`{run}` above) at once; it wins
    /// over `run_directory` in the file, so parallel test runs never collide.
    public static let runDirectoryVariable = "HOLDFAST_RUN_DIR"

    /// `subordinateUIDs`: /etc/subuid's ranges, read when nil (tests pass their own).
    public static func load(
        path: String, environment: [String: String] = currentEnvironment(), subordinateUIDs: [SubordinateIDRange]? = nil
    ) async throws(ConfigurationError) -> DaemonConfiguration {
        func fail(_ key: String, _ reason: String) -> ConfigurationError {
            ConfigurationError(file: path, key: key, reason: reason)
        }
        guard access(path, R_OK) == 0 else {
            let error = errno
            throw fail("", error == ENOENT ? "no such file" : "cannot read it: \(String(cString: strerror(error))) (errno \(error))")
        }
        let fileKeys = try listKeys(path: path)
        let known = Set(keys.map(\.key))
        if let unknown = fileKeys.sorted().first(where: { !known.contains($0) }) {
            let suggestion = closest(to: unknown, in: known).map { " (did you mean '\($0)'?)" } ?? ""
            throw fail(unknown, "unknown key\(suggestion)")
        }

        // HOLDFAST_BRIDGE_ADDRESS overrides bridge.address, and so on.
        var overrides: [String: String] = [:]
        for (name, value) in environment where name.hasPrefix("HOLDFAST_") && name != runDirectoryVariable {
            overrides[String(name.dropFirst("HOLDFAST_".count))] = value
        }
        let reader: ConfigReader
        do {
            let file: any ConfigProvider
            if path.hasSuffix(".json") {
                file = try await FileProvider<JSONSnapshot>(filePath: FilePath(path))
            } else {
                file = try await FileProvider<YAMLSnapshot>(filePath: FilePath(path))
            }
            reader = ConfigReader(providers: [EnvironmentVariablesProvider(environmentVariables: overrides), file])
        } catch {
            throw fail("", "cannot parse it: \(error)")
        }

        let runDirectory = environment[runDirectoryVariable] ?? (reader.string(forKey: "run_directory") ?? "/run/holdfast")
        func raw(_ key: String) throws(ConfigurationError) -> String {
            let fallback = keys.first { $0.key == key }!.fallback
            // An empty list (`allowed_uids: []`: gids only) is an empty list, not the default.
            if let arrayValue = reader.stringArray(forKey: ConfigKey(key)), reader.string(forKey: ConfigKey(key)) == nil {
                return arrayValue.joined(separator: ",")
            }
            if let value = reader.string(forKey: ConfigKey(key)) { return value.replacingRunDirectory(with: runDirectory) }
            guard let fallback else { throw fail(key, "is required") }
            return fallback.replacingRunDirectory(with: runDirectory)
        }
        func parse<T>(_ key: String, _ parser: (String) -> Result<T, Problem>) throws(ConfigurationError) -> T {
            let text = try raw(key)
            switch parser(text.trimmed) {
            case .success(let value): return value
            case .failure(let problem): throw fail(key, "'\(text)': \(problem.reason)")
            }
        }

        let address = try parse("bridge.address") { text -> Result<SocketAddress, Problem> in
            do throws(AddressError) { return .success(try SocketAddress(parsing: text)) } catch { return .failure(Problem(error.reason)) }
        }
        let authentication = try parse("bridge.authentication") { text -> Result<BridgeAuthenticationMethod, Problem> in
            BridgeAuthenticationMethod(rawValue: text).map { .success($0) } ?? .failure("must be hmac-sha256 or none")
        }
        let keyFile = try parse("bridge.key_file") { text -> Result<String, Problem> in
            if text.isEmpty, authentication == .none { return .success(text) }
            return text.hasPrefix("/") ? .success(text) : .failure("must be an absolute path")
        }
        let reconnectInitial = try parse("bridge.reconnect_initial", ValueParsers.positiveDuration)
        let reconnectMax = try parse("bridge.reconnect_max", ValueParsers.positiveDuration)
        guard reconnectMax >= reconnectInitial else {
            throw fail("bridge.reconnect_max", "must not be shorter than bridge.reconnect_initial")
        }
        let user = try parse("broker.user") { text -> Result<String?, Problem> in
            guard !text.isEmpty else { return .success(nil) }
            guard let account = UserAccount.resolve(text) else {
                return .failure(
                    text.hasPrefix(UserAccount.numericPrefix)
                        ? "expected uid:N with N from 1 to 4294967294 (e.g. uid:\(ReservedUIDs.development))"
                        : "no such user on this system")
            }
            guard account.uid != 0 else { return .failure("the broker must not run as root") }
            return .success(text)
        }
        let seccomp = try parse("broker.seccomp") { text -> Result<String, Problem> in
            ["kill", "log", "off"].contains(text) ? .success(text) : .failure("must be kill, log or off")
        }
        let allowSharedUID = try parse("broker.allow_shared_uid", ValueParsers.boolean)
        // A uid in someone's subordinate range is that user's to take in a user namespace of its
        // own (newuidmap), where a signal from it is the broker's own uid's: not the broker's own.
        if !allowSharedUID, let user, let uid = UserAccount.resolve(user)?.uid,
            let range = SubordinateIDs.range(holding: uid, in: subordinateUIDs ?? SubordinateIDs.systemUIDRanges())
        {
            throw fail(
                "broker.user",
                "uid \(uid) lies in \(range.owner)'s subordinate uid range (\(SubordinateIDs.uidFile): \(range.line)): "
                    + "\(range.owner)'s processes can take it in a user namespace of their own (newuidmap) and signal the broker; "
                    + "give the broker a system user (adduser --system) or a uid outside every range, or set broker.allow_shared_uid: true")
        }
        let restartBackoffMax = try parse("broker.restart_backoff_max", ValueParsers.positiveDuration)
        guard restartBackoffMax >= 100 else { throw fail("broker.restart_backoff_max", "must be at least 100ms (the first back-off)") }
        let handoffSocket = try parse("handoff.socket", ValueParsers.socketPath)
        let mode = try parse("handoff.mode", ValueParsers.fileMode)
        let uids = try parse("handoff.allowed_uids", ValueParsers.idList)
        let gids = try parse("handoff.allowed_gids", ValueParsers.idList)
        let handoffConnections = try parse("handoff.max_connections") { ValueParsers.integer($0, in: 1...65_536) }
        let releaseKeptFor = try parse("handoff.release_kept_for", ValueParsers.positiveDuration)
        let attempts = try parse("streams.redial_attempts") { ValueParsers.integer($0, in: 1...1_000_000) }
        let interval = try parse("streams.redial_interval", ValueParsers.positiveDuration)
        let connectTimeout = try parse("streams.connect_timeout", ValueParsers.positiveDuration)
        let drainTimeout = try parse("streams.drain_timeout", ValueParsers.positiveDuration)
        let ring = try parse("streams.ring_capacity") { ValueParsers.size($0, in: (64 << 10)...(1 << 30)) }
        let signal = try parse("shutdown.signal", ValueParsers.signal)
        let grace = try parse("shutdown.grace", ValueParsers.positiveDuration)
        let timeout = try parse("shutdown.timeout", ValueParsers.positiveDuration)
        guard timeout >= grace else { throw fail("shutdown.timeout", "must not be shorter than shutdown.grace") }

        let control = try parse("control.socket", ValueParsers.socketPath)
        guard !control.isEmpty else { throw fail("control.socket", "is required") }
        let runcPath = try parse("runc.path") { text -> Result<String, Problem> in
            text.isEmpty ? .failure("must name the runc binary") : .success(text)
        }
        let runcRoot = try parse("runc.root") { text -> Result<String, Problem> in
            text.hasPrefix("/") ? .success(text) : .failure("must be an absolute path")
        }
        let metricsAddress = try parse("metrics.address") { text -> Result<SocketAddress?, Problem> in
            guard !text.isEmpty else { return .success(nil) }
            // vsock too: the host's Prometheus cannot reach the guest's loopback.
            do throws(AddressError) { return .success(try SocketAddress(parsing: text)) } catch {
                return .failure(Problem(error.reason))
            }
        }
        let signalGuard = try parse("processes.signal_guard", ValueParsers.boolean)
        let startTimeout = try parse("processes.start_timeout", ValueParsers.positiveDuration)
        let run = try parse("run_directory") { text -> Result<String, Problem> in
            text.hasPrefix("/") ? .success(text) : .failure("must be an absolute path")
        }

        return DaemonConfiguration(
            bridge: .init(
                address: address, authentication: authentication, keyFile: keyFile, reconnectInitial: reconnectInitial,
                reconnectMax: reconnectMax),
            broker: .init(user: user, seccomp: seccomp, allowSharedUID: allowSharedUID, restartBackoffMax: restartBackoffMax),
            handoff: .init(socket: handoffSocket, mode: mode, allowedUIDs: uids, allowedGIDs: gids, maxConnections: handoffConnections,
                releaseKeptFor: releaseKeptFor),
            streams: .init(
                redialAttempts: attempts, redialInterval: interval, connectTimeout: connectTimeout, drainTimeout: drainTimeout,
                ringCapacity: ring),
            shutdown: .init(signal: signal, grace: grace, timeout: timeout),
            control: .init(socket: control),
            runc: .init(path: runcPath, root: runcRoot),
            metrics: .init(address: metricsAddress),
            runDirectory: environment[runDirectoryVariable] ?? run,
            processes: .init(signalGuard: signalGuard, startTimeout: startTimeout))
    }

    /// The dotted keys present in the file (leaves only).
    static func listKeys(path: String) throws(ConfigurationError) -> [String] {
        guard let bytes = WholeFile.read(path) else { throw ConfigurationError(file: path, key: "", reason: "cannot read it") }
        let text = String(decoding: bytes, as: UTF8.self)
        let node: Node?
        do {
            node = try Yams.compose(yaml: text)
        } catch {
            throw ConfigurationError(file: path, key: "", reason: "not valid YAML or JSON: \(error)")
        }
        guard let node else { return [] }
        guard case .mapping = node else {
            throw ConfigurationError(file: path, key: "", reason: "the top level must be a mapping of keys")
        }
        var result: [String] = []
        func walk(_ node: Node, _ prefix: String) {
            if let mapping = node.mapping {
                for (key, value) in mapping {
                    let name = key.string ?? "\(key)"
                    walk(value, prefix.isEmpty ? name : "\(prefix).\(name)")
                }
            } else {
                result.append(prefix)
            }
        }
        walk(node, "")
        return result
    }

    public static func currentEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var cursor = environ
        while let entry = cursor.pointee {
            let text = String(cString: entry)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            cursor += 1
        }
        return result
    }

    /// The known key closest to a misspelt one (edit distance at most 3).
    static func closest(to key: String, in known: Set<String>) -> String? {
        func distance(_ a: [Character], _ b: [Character]) -> Int {
            var previous = Array(0...b.count)
            for (i, ca) in a.enumerated() {
                var current = [i + 1]
                for (j, cb) in b.enumerated() {
                    current.append(min(previous[j + 1] + 1, current[j] + 1, previous[j] + (ca == cb ? 0 : 1)))
                }
                previous = current
            }
            return previous[b.count]
        }
        let candidates = known.map { ($0, distance(Array(key), Array($0))) }.filter { $0.1 <= 3 }
        return candidates.min { $0.1 < $1.1 }?.0
    }
}

extension String {
    var trimmed: String {
        String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }

    /// "{run}" anywhere in a value stands for the run directory, so one setting (or
    /// HOLDFAST_RUN_DIR) moves every path at once.
    func replacingRunDirectory(with directory: String) -> String {
        guard contains("{run}") else { return self }
        return split(separator: "{run}", omittingEmptySubsequences: false).joined(separator: directory)
    }
}

