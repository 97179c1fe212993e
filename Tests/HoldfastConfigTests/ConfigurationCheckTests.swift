import HoldfastCore
import HoldfastTestSupport
import Testing

@testable import HoldfastConfig

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

@Suite("holdfast config check: the loader's verdict and the effective configuration", .timeLimit(.minutes(5)))
struct ConfigurationCheckTests {
    func write(_ text: String, name: String = "holdfast.yaml") throws -> (TemporaryDirectory, String) {
        let directory = try TemporaryDirectory("holdfast-config-check")
        let path = directory.file(name)
        try writeFile(path, bytes(text))
        return (directory, path)
    }

    @Test func everyKeyIsListedOnceInTheFilesOrder() async throws {
        let check = await ConfigurationCheck.run(path: "config/holdfast-dev.yaml", environment: [:])
        #expect(check.valid)
        #expect(check.settings.map(\.key) == ConfigurationCheck.keyOrder)
        #expect(Set(check.settings.map(\.key)) == Set(ConfigurationLoader.keys.map(\.key)), "no key forgotten, none invented")
        #expect(check.settings.allSatisfy { $0.value != "?" }, "every key has a rendered value")
        // The file's order is the shipped file's: every key in it, uncommented, in that order
        // (the README and the man page call it the file that describes every key).
        var section = ""
        var keysInTheFile: [String] = []
        for line in String(decoding: try #require(readFile("config/holdfast.yaml")), as: UTF8.self).split(separator: "\n") {
            guard !line.hasPrefix("#"), !line.hasPrefix("  #"), let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].trimmingCharacters(in: .whitespaces)
            if !line.hasPrefix(" ") {
                section = name
                if line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces).isEmpty { continue }
                keysInTheFile.append(name)
            } else {
                keysInTheFile.append(section + "." + name)
            }
        }
        #expect(keysInTheFile == ConfigurationCheck.keyOrder, "config/holdfast.yaml has every key, in the order `config check` lists them")
    }

    @Test func valuesAreInTheFilesSyntax() async throws {
        let check = await ConfigurationCheck.run(
            path: "config/holdfast.yaml", environment: ["HOLDFAST_BROKER_USER": "nobody"])
        let values = Dictionary(uniqueKeysWithValues: check.settings.map { ($0.key, $0.value) })
        #expect(values["run_directory"] == "/run/holdfast")
        #expect(values["bridge.address"] == "vsock://host:5000")
        #expect(values["bridge.reconnect_initial"] == "100ms")
        #expect(values["bridge.reconnect_max"] == "5s")
        #expect(values["broker.user"] == "nobody")
        #expect(values["handoff.socket"] == "/run/holdfast/broker.sock", "{run} is expanded")
        #expect(values["handoff.mode"] == "0660")
        #expect(values["handoff.allowed_uids"] == "[0]")
        #expect(values["handoff.allowed_gids"] == "[]")
        #expect(values["handoff.release_kept_for"] == "1m")
        #expect(values["streams.ring_capacity"] == "1MiB")
        #expect(values["shutdown.signal"] == "SIGTERM")
        #expect(values["shutdown.timeout"] == "30s")
        #expect(check.settings.first { $0.key == "broker.user" }?.note == "uid 65534, gid 65534")
    }

    /// The key file's row says what the daemon would make of the file, checked as the daemon
    /// checks it, never showing the key.
    @Test func theKeyFileRowSaysWhetherTheDaemonWouldStart() async throws {
        let (directory, path) = try write("bridge:\n  address: unix:/tmp/b.sock\n  key_file: \"{run}/bridge.key\"\n")
        defer { directory.remove() }
        let environment = ["HOLDFAST_RUN_DIR": directory.path]
        func note() async -> String? {
            await ConfigurationCheck.run(path: path, environment: environment).settings.first { $0.key == "bridge.key_file" }?.note
        }
        // Not there yet: the daemon starts and waits for it (valid).
        #expect(await note() == "not there yet: the daemon starts with the bridge down until it is (no such file)")
        #expect(await ConfigurationCheck.run(path: path, environment: environment).valid)
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"
        try writeFile(directory.file("bridge.key"), bytes(hex), mode: 0o644)
        #expect(await note()?.hasPrefix("the daemon will refuse to start: mode 0644: group or other can read it") == true)
        // The daemon would exit 2 over it: so does the check (it said valid, exit 0, before).
        let unsafe = await ConfigurationCheck.run(path: path, environment: environment)
        #expect(!unsafe.valid && unsafe.key == "bridge.key_file" && unsafe.reason?.contains("group or other can read it") == true, "\(unsafe)")
        chmod(directory.file("bridge.key"), 0o600)
        #expect(await note() == "a 32-byte key that only its owner can read")
        #expect(await ConfigurationCheck.run(path: path, environment: environment).valid)
        #expect(await ConfigurationCheck.run(path: path, environment: environment).renderText().contains("00112233") == false)
        let none = await ConfigurationCheck.run(path: path, environment: environment.merging(["HOLDFAST_BRIDGE_AUTHENTICATION": "none"]) { $1 })
        #expect(none.settings.first { $0.key == "bridge.key_file" }?.note == "not used: bridge.authentication is none")
        #expect(none.settings.first { $0.key == "bridge.authentication" }?.note?.hasPrefix("WARNING") == true)
    }

    @Test func sourcesSayWhereEachValueCameFrom() async throws {
        let (directory, path) = try write("bridge:\n  address: unix:/tmp/b.sock\nstreams:\n  drain_timeout: 5s\n")
        defer { directory.remove() }
        let check = await ConfigurationCheck.run(
            path: path, environment: ["HOLDFAST_STREAMS_DRAIN_TIMEOUT": "7s", "HOLDFAST_RUN_DIR": "/tmp/elsewhere"])
        let sources = Dictionary(uniqueKeysWithValues: check.settings.map { ($0.key, $0.source) })
        #expect(sources["bridge.address"] == "file")
        #expect(sources["streams.drain_timeout"] == "environment (HOLDFAST_STREAMS_DRAIN_TIMEOUT)")
        #expect(check.settings.first { $0.key == "streams.drain_timeout" }?.value == "7s", "the environment wins over the file")
        #expect(sources["run_directory"] == "environment (HOLDFAST_RUN_DIR)")
        #expect(sources["streams.redial_attempts"] == "default")
        #expect(check.settings.first { $0.key == "control.socket" }?.value == "/tmp/elsewhere/control.sock")
    }

    /// The printed values are the configuration: written back as a file, they load to the same one.
    @Test(arguments: ["config/holdfast.yaml", "config/holdfast-dev.yaml"])
    func printedValuesLoadToTheSameConfiguration(file: String) async throws {
        let environment = ["HOLDFAST_BROKER_USER": "nobody"]
        let check = await ConfigurationCheck.run(path: file, environment: environment)
        #expect(check.valid)
        var yaml = ""
        var section = ""
        for setting in check.settings {
            let parts = setting.key.split(separator: ".").map(String.init)
            let isList = setting.value.hasPrefix("[")
            let value = isList ? setting.value : "\"\(setting.value)\""
            if parts.count == 1 {
                yaml += "\(parts[0]): \(value)\n"
                continue
            }
            if parts[0] != section {
                section = parts[0]
                yaml += "\(section):\n"
            }
            yaml += "  \(parts[1]): \(value)\n"
        }
        let (directory, path) = try write(yaml)
        defer { directory.remove() }
        let original = try await ConfigurationLoader.load(path: file, environment: environment)
        let reloaded = try await ConfigurationLoader.load(path: path, environment: environment)
        #expect(reloaded == original, "\(yaml)")
    }

    @Test func aBadFileGivesTheLoadersFileKeyAndReason() async throws {
        let (directory, path) = try write("bridge:\n  address: vsock://3:1\nstreams:\n  redial_atempts: 5\n")
        defer { directory.remove() }
        let check = await ConfigurationCheck.run(path: path, environment: [:])
        #expect(!check.valid)
        #expect(check.settings.isEmpty)
        #expect(check.key == "streams.redial_atempts")
        #expect(check.reason == "unknown key (did you mean 'streams.redial_attempts'?)")
        #expect(check.renderText() == "\(path): streams.redial_atempts: unknown key (did you mean 'streams.redial_attempts'?)")
        do {
            _ = try await ConfigurationLoader.load(path: path, environment: [:])
            Issue.record("the loader accepted it")
        } catch {
            #expect(error.description == check.renderText(), "the same words as the daemon")
        }
    }

    @Test func textIsATableAndJSONIsTheSameData() async throws {
        let check = await ConfigurationCheck.run(path: "config/holdfast-dev.yaml", environment: [:])
        let text = check.renderText()
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        #expect(lines[0] == "config/holdfast-dev.yaml: valid")
        #expect(lines[2].hasPrefix("KEY"))
        #expect(lines.count == 3 + ConfigurationCheck.keyOrder.count)
        let valueColumn = lines[2].distance(from: lines[2].startIndex, to: lines[2].range(of: "VALUE")!.lowerBound)
        for (line, setting) in zip(lines.dropFirst(3), check.settings) {
            #expect(line.hasPrefix(setting.key + " "))
            #expect(line.dropFirst(valueColumn).hasPrefix(setting.value), "values line up under VALUE: \(line)")
        }
        let decoded = try JSONDecoder().decode(ConfigurationCheck.self, from: Data(check.renderJSON().utf8))
        #expect(decoded == check)
        let bad = ConfigurationCheck(file: "f.yaml", valid: false, settings: [], key: "broker.user", reason: "no such user on this system")
        let json = bad.renderJSON()
        #expect(json.contains(#""valid":false"#) && json.contains(#""key":"broker.user""#), "\(json)")
    }

    @Test func environmentVariableNames() {
        #expect(ConfigurationLoader.environmentVariable(for: "bridge.address") == "HOLDFAST_BRIDGE_ADDRESS")
        #expect(ConfigurationLoader.environmentVariable(for: "handoff.allowed_uids") == "HOLDFAST_HANDOFF_ALLOWED_UIDS")
    }

    @Test func durationsAndSizesUseTheLargestWholeUnit() {
        #expect(DaemonConfiguration.duration(100) == "100ms")
        #expect(DaemonConfiguration.duration(1500) == "1500ms")
        #expect(DaemonConfiguration.duration(30_000) == "30s")
        #expect(DaemonConfiguration.duration(120_000) == "2m")
        #expect(DaemonConfiguration.duration(7_200_000) == "2h")
        #expect(DaemonConfiguration.size(1 << 20) == "1MiB")
        #expect(DaemonConfiguration.size(96 << 10) == "96KiB")
        #expect(DaemonConfiguration.size(65537) == "65537")
    }
}
