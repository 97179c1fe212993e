import HoldfastCore
import HoldfastPosix
import HoldfastTestSupport
import Testing

@testable import HoldfastConfig

@Suite("Configuration: every bad value names the file, the key and the reason", .timeLimit(.minutes(5)))
struct ConfigurationTests {
    func write(_ text: String, name: String = "holdfast.yaml") throws -> (TemporaryDirectory, String) {
        let directory = try TemporaryDirectory("holdfast-config")
        let path = directory.file(name)
        try writeFile(path, bytes(text))
        return (directory, path)
    }

    @Test func shippedConfigurationsLoad() async throws {
        // The production file names the 'holdfast' user the package creates; here it may not
        // exist, so the environment override stands in (which also shows overrides work).
        let environment = ["HOLDFAST_BROKER_USER": "nobody"]
        for file in ["config/holdfast.yaml", "config/holdfast-dev.yaml"] {
            let config = try await ConfigurationLoader.load(path: file, environment: environment)
            #expect(config.streams.redialAttempts == 60)
            #expect(config.shutdown.signal == 15)
        }
        let production = try await ConfigurationLoader.load(path: "config/holdfast.yaml", environment: environment)
        // Parsed only, never dialled: the shipped file names the host's well-known CID.
        #expect(production.bridge.address == .vsock(cid: SocketAddress.vsockHostCID, port: 5000))
        #expect(production.handoff.socket == "/run/holdfast/broker.sock")
        #expect(production.handoff.mode == 0o660)
        #expect(production.handoff.releaseKeptFor == 60_000)
        #expect(production.streams.ringCapacity == 1 << 20)
    }

    /// The bridge key: authenticated by default, the production file at /etc/holdfast, the
    /// development one in the run directory; `none` needs no file.
    @Test func bridgeAuthenticationKeys() async throws {
        let environment = ["HOLDFAST_BROKER_USER": "nobody"]
        let production = try await ConfigurationLoader.load(path: "config/holdfast.yaml", environment: environment)
        #expect(production.bridge.authentication == .hmacSHA256 && production.bridge.keyFile == "/etc/holdfast/bridge.key")
        let development = try await ConfigurationLoader.load(path: "config/holdfast-dev.yaml", environment: ["HOLDFAST_RUN_DIR": "/tmp/x"])
        #expect(development.bridge.authentication == .hmacSHA256 && development.bridge.keyFile == "/tmp/x/bridge.key")
        let (directory, path) = try write("bridge:\n  address: vsock://3:1\n")
        defer { directory.remove() }
        let defaults = try await ConfigurationLoader.load(path: path, environment: [:])
        #expect(defaults.bridge.authentication == .hmacSHA256, "authenticated unless the file says otherwise")
        #expect(defaults.bridge.keyFile == "/etc/holdfast/bridge.key")
        let none = try await ConfigurationLoader.load(
            path: path, environment: ["HOLDFAST_BRIDGE_AUTHENTICATION": "none", "HOLDFAST_BRIDGE_KEY_FILE": ""])
        #expect(none.bridge.authentication == .none && none.bridge.keyFile.isEmpty)
    }

    @Test func runDirectoryVariableMovesEveryDefaultPath() async throws {
        let config = try await ConfigurationLoader.load(path: "config/holdfast-dev.yaml", environment: ["HOLDFAST_RUN_DIR": "/tmp/elsewhere"])
        #expect(config.runDirectory == "/tmp/elsewhere")
        #expect(config.bridge.address.description == "unix:/tmp/elsewhere/host-bridge.sock")
        #expect(config.handoff.socket == "/tmp/elsewhere/broker.sock")
        #expect(config.control.socket == "/tmp/elsewhere/control.sock")
    }

    @Test func aBrokerUIDNeedsNoPasswordEntryAndSharingIsOffByDefault() async throws {
        let (directory, path) = try write("bridge:\n  address: vsock://3:5000\nbroker:\n  user: \"uid:65600\"\n")
        defer { directory.remove() }
        let config = try await ConfigurationLoader.load(path: path, environment: [:])
        #expect(config.broker.user == "uid:65600")
        #expect(config.broker.allowSharedUID == false)
        let shared = try await ConfigurationLoader.load(path: path, environment: ["HOLDFAST_BROKER_ALLOW_SHARED_UID": "true"])
        #expect(shared.broker.allowSharedUID)
    }

    /// A broker uid in a user's subordinate uid range (/etc/subuid: the default first range,
    /// 100000:65536, held uids the README once recommended) is that user's to take in a user
    /// namespace of its own, where its signals reach the broker: refused, saying whose range
    /// and what to do; the same uid outside every range, or with sharing allowed, loads.
    @Test func aBrokerUIDInASubordinateRangeIsRefused() async throws {
        let ranges = SubordinateIDs.ranges(in: "# comment\nbob:200000:10\nalice:100000:65536\nbroken:1\n")
        #expect(ranges.map(\.owner) == ["bob", "alice"])
        #expect(SubordinateIDs.range(holding: 165_535, in: ranges)?.owner == "alice")
        #expect(SubordinateIDs.range(holding: 165_536, in: ranges) == nil && SubordinateIDs.range(holding: 99_999, in: ranges) == nil)
        let (directory, path) = try write("bridge:\n  address: vsock://3:5000\nbroker:\n  user: \"uid:100500\"\n")
        defer { directory.remove() }
        do {
            _ = try await ConfigurationLoader.load(path: path, environment: [:], subordinateUIDs: ranges)
            Issue.record("accepted a broker uid in alice's subordinate range")
        } catch {
            #expect(error.key == "broker.user")
            #expect(error.reason.contains("alice's subordinate uid range (/etc/subuid: alice:100000:65536)"), "\(error.reason)")
        }
        _ = try await ConfigurationLoader.load(path: path, environment: [:], subordinateUIDs: [])
        _ = try await ConfigurationLoader.load(path: path, environment: ["HOLDFAST_BROKER_ALLOW_SHARED_UID": "true"], subordinateUIDs: ranges)
        #expect(ReservedUIDs.range.upperBound < 100_000, "the uids Holdfast picks lie below where subordinate ranges begin")
    }

    @Test func environmentOverridesOneKey() async throws {
        let (directory, path) = try write("bridge:\n  address: vsock://3:5000\n")
        defer { directory.remove() }
        let config = try await ConfigurationLoader.load(
            path: path, environment: ["HOLDFAST_BRIDGE_ADDRESS": "tcp://127.0.0.1:7000", "HOLDFAST_STREAMS_REDIAL_ATTEMPTS": "5"])
        #expect(config.bridge.address.description == "tcp://127.0.0.1:7000")
        #expect(config.streams.redialAttempts == 5)
        #expect(config.streams.connectTimeout == 2000, "defaults fill what is absent")
    }

    @Test(arguments: [
        ("bridge:\n  address: vsock://x:5\n", "bridge.address", "CID"),
        ("bridge:\n  reconnect_initial: 10\n", "bridge.address", "required"),
        ("bridge:\n  address: vsock://3:1\n  reconnect_initial: 10\n", "bridge.reconnect_initial", "unit"),
        ("bridge:\n  address: vsock://3:1\n  reconnect_max: 10ms\n", "bridge.reconnect_max", "shorter"),
        ("bridge:\n  address: vsock://3:1\n  authentication: maybe\n", "bridge.authentication", "hmac-sha256 or none"),
        ("bridge:\n  address: vsock://3:1\n  key_file: bridge.key\n", "bridge.key_file", "absolute"),
        ("bridge:\n  address: vsock://3:1\n  key_file: \"\"\n", "bridge.key_file", "absolute"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  user: no-such-user-here\n", "broker.user", "no such user"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  seccomp: maybe\n", "broker.seccomp", "kill, log or off"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  user: root\n", "broker.user", "must not run as root"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  user: \"uid:0\"\n", "broker.user", "expected uid:N with N from 1"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  user: \"uid:12x\"\n", "broker.user", "expected uid:N"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  user: \"uid:4294967295\"\n", "broker.user", "expected uid:N"),
        ("bridge:\n  address: vsock://3:1\nbroker:\n  allow_shared_uid: perhaps\n", "broker.allow_shared_uid", "true or false"),
        ("bridge:\n  address: vsock://3:1\nhandoff:\n  mode: rw\n", "handoff.mode", "octal"),
        ("bridge:\n  address: vsock://3:1\nhandoff:\n  socket: relative.sock\n", "handoff.socket", "absolute"),
        ("bridge:\n  address: vsock://3:1\nhandoff:\n  allowed_uids: [root]\n", "handoff.allowed_uids", "numeric"),
        ("bridge:\n  address: vsock://3:1\nstreams:\n  redial_attempts: 0\n", "streams.redial_attempts", "between 1"),
        ("bridge:\n  address: vsock://3:1\nstreams:\n  ring_capacity: 1KiB\n", "streams.ring_capacity", "between"),
        ("bridge:\n  address: vsock://3:1\nshutdown:\n  signal: SIGWHAT\n", "shutdown.signal", "signal"),
        // Read as 10001001 before: the ids meant refused, another let in.
        ("bridge:\n  address: vsock://3:1\nhandoff:\n  allowed_uids: 1000 1001\n", "handoff.allowed_uids", "separate ids with commas"),
        ("bridge:\n  address: vsock://3:1\nshutdown:\n  grace: 40s\n", "shutdown.timeout", "shorter"),
        ("bridge:\n  address: vsock://3:1\nstreams:\n  redial_atempts: 5\n", "streams.redial_atempts", "did you mean 'streams.redial_attempts'"),
    ])
    func refusesWithFileKeyAndReason(yaml: String, key: String, reason: String) async throws {
        let (directory, path) = try write(yaml)
        defer { directory.remove() }
        do {
            _ = try await ConfigurationLoader.load(path: path, environment: [:])
            Issue.record("accepted a bad configuration")
        } catch {
            #expect(error.file == path)
            #expect(error.key == key)
            #expect(error.reason.contains(reason), "reason was: \(error.reason)")
            #expect(error.description.hasPrefix("\(path): \(key): "))
        }
    }

    /// A shutdown signal that ends nothing (SIGSTOP, SIGCONT, SIGWINCH...) and a timeout that
    /// leaves the drains under 2 s after the grace are said (a warning in `config check`, and in
    /// the daemon's log at start), not refused: a file that loaded before must still start.
    @Test func aPoorShutdownSignalOrTimeoutIsWarnedOfNotRefused() async throws {
        let (directory, path) = try write("bridge:\n  address: vsock://3:1\nshutdown:\n  signal: 19\n  grace: 10s\n  timeout: 10s\n")
        defer { directory.remove() }
        let check = await ConfigurationCheck.run(path: path, environment: [:])
        #expect(check.valid)
        let notes = Dictionary(uniqueKeysWithValues: check.settings.map { ($0.key, $0.note ?? "") })
        #expect(notes["shutdown.signal"]?.hasPrefix("WARNING: SIGSTOP does not end a process") == true, "\(notes["shutdown.signal"] ?? "")")
        #expect(notes["shutdown.timeout"]?.hasPrefix("WARNING: less than 2s longer than shutdown.grace") == true, "\(notes["shutdown.timeout"] ?? "")")
        #expect(ValueParsers.shutdownSignalWarning(15) == nil, "SIGTERM")
    }

    /// An id list is the ids it names: an empty one is empty (gids only), not the default [0];
    /// ids are separated by commas, in a YAML list or a plain string, and so from the
    /// environment.
    @Test func anIdListIsExactlyTheIdsItNames() async throws {
        let (directory, path) = try write("bridge:\n  address: vsock://3:1\nhandoff:\n  allowed_uids: []\n  allowed_gids: [0, 1001]\n")
        defer { directory.remove() }
        let config = try await ConfigurationLoader.load(path: path, environment: [:])
        #expect(config.handoff.allowedUIDs == [])
        #expect(config.handoff.allowedGIDs == [0, 1001])
        let listed = try await ConfigurationLoader.load(path: path, environment: ["HOLDFAST_HANDOFF_ALLOWED_UIDS": " 0, 1000 "])
        #expect(listed.handoff.allowedUIDs == [0, 1000])
        await #expect(throws: ConfigurationError.self) {
            try await ConfigurationLoader.load(path: path, environment: ["HOLDFAST_HANDOFF_ALLOWED_UIDS": "0 1000"])
        }
    }

    @Test func aMissingOrMalformedFileIsReported() async throws {
        await #expect(throws: ConfigurationError.self) { try await ConfigurationLoader.load(path: "/nonexistent/holdfast.yaml", environment: [:]) }
        let (directory, path) = try write("bridge: [unclosed\n")
        defer { directory.remove() }
        do {
            _ = try await ConfigurationLoader.load(path: path, environment: [:])
            Issue.record("accepted malformed YAML")
        } catch {
            #expect(error.file == path)
            #expect(error.reason.contains("YAML"))
        }
    }

    @Test func jsonWorksToo() async throws {
        let (directory, path) = try write(#"{"bridge": {"address": "unix:/tmp/b.sock"}, "streams": {"drain_timeout": "5s"}}"#, name: "h.json")
        defer { directory.remove() }
        let config = try await ConfigurationLoader.load(path: path, environment: [:])
        #expect(config.bridge.address.description == "unix:/tmp/b.sock")
        #expect(config.streams.drainTimeout == 5000)
    }

    @Test func durationAndSizeParsers() throws {
        #expect(try ValueParsers.positiveDuration("100ms").get() == 100)
        #expect(try ValueParsers.positiveDuration("1.5s").get() == 1500)
        #expect(try ValueParsers.positiveDuration("2m").get() == 120_000)
        #expect((try? ValueParsers.positiveDuration("0s").get()) == nil)
        #expect(try ValueParsers.size("1MiB", in: 1...(1 << 30)).get() == 1 << 20)
        #expect(try ValueParsers.size("65536", in: 1...(1 << 30)).get() == 65536)
    }
}
