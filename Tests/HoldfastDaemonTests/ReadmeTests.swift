import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// README.md as a reader uses it: every example runs as written, the Usage block lists what
/// `--help` lists, and the configuration table's defaults are the loader's.
///
/// Every fenced block of the README is classified here by its first line: run (each command
/// line has a step below, and a line with no step fails the test), the Usage block, output (a
/// transcript of what a command prints), or not run here with the reason. A new block fails the
/// test until it is classified. "As written" allows three substitutions, all of which the
/// README itself names as movable: `HOLDFAST_RUN_DIR` (every default path), `/srv/web` and
/// `/tmp/` become directories of the test's own, and the broker's uid is an unused one in case
/// the development config's 65600 is taken on this machine (`HOLDFAST_BROKER_USER`).
@Suite("README.md: examples run as written, Usage matches --help", .serialized, .timeLimit(.minutes(10)))
struct ReadmeTests {
    enum Kind: Equatable {
        case run
        case usage
        case output
        case transcript
        case swift
        case notRun(String)
    }

    /// Every fenced block, by the start of its first line.
    static let classification: [(String, Kind)] = [
        ("make demo ", .notRun("make itself: `make test` runs every test (this one too); `holdfast demo` is MigrationDemoTests")),
        ("demo: guest connected", .output),
        ("# on the host, beside a VM whose VMM", .notRun(
            "needs a VMM's hybrid vsock, which this machine has not: HostServiceOutcomeTests checks that --guest-streams is what a create names")),
        ("holdfast host serve ", .run),
        ("# in the guest: a bundle whose program waits", .run),
        ("holdfast demo [--beats", .usage),
        ("holdfast receive --mode resumable", .run),
        ("# a receiver killed at any instant", .notRun(
            "its point is a kill at a moment mid-stream: HostRestartTests runs the same command, SIGKILLs it three times while pipe sends, and compares the file")),
        ("let server = try StreamServer", .swift),
        ("                 supervisor (root)", .output),
        ("# start my-server", .notRun(
            "its addresses are vsock (tests never dial vsock) and my-server is the reader's program: HandoffExampleTests runs the "
                + "same handoff.py subcommands — adopt with a command and with --stdout-fd, list, release — against a real daemon")),
        ("$ printf 'streams:", .transcript),
        ("holdfast 0.1.0  pid", .output),
        ("broker: not answering:", .output),
        ("make deb ", .notRun("installs the package on this machine: `make deb-install-check` does that on a throwaway machine, and `make test` runs `make deb-check`")),
        ("curl -s --unix-socket", .notRun("needs metrics.address, off by default: MetricsTests scrapes the same endpoint from a daemon that has it")),
        ("<6>holdfast.supervisor", .output),
        ("holdfast host run: too-many-open-files", .output),
        ("holdfast host run: too-many-processes", .output),
        ("make fuzz ", .notRun("minutes of fuzzing: `make test` runs `make fuzz-smoke`")),
    ]

    struct Block {
        var language: String
        var lines: [String]
        var first: String { lines.first ?? "" }
    }

    static var checkout: String {
        let source: String = #filePath
        var parts = source.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/")
    }

    static func readme() -> String {
        String(decoding: readFile(checkout + "/README.md") ?? [], as: UTF8.self)
    }

    /// The fenced blocks of the README, in order.
    static func blocks() -> [Block] {
        var blocks: [Block] = []
        var current: Block?
        for line in readme().split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if line.hasPrefix("```") {
                if let open = current {
                    blocks.append(open)
                    current = nil
                } else {
                    current = Block(language: String(line.dropFirst(3)), lines: [])
                }
            } else if current != nil {
                current!.lines.append(line)
            }
        }
        return blocks
    }

    static func kind(of block: Block) -> Kind? {
        classification.first { block.first.hasPrefix($0.0) }?.1
    }

    @Test func everyReadmeBlockIsClassified() {
        let blocks = Self.blocks()
        #expect(blocks.count >= Self.classification.count)
        for block in blocks {
            #expect(Self.kind(of: block) != nil, "a README block nobody runs or explains: '\(block.first)' — classify it in ReadmeTests")
        }
        for (start, _) in Self.classification {
            #expect(blocks.contains { $0.first.hasPrefix(start) }, "ReadmeTests classifies a block the README no longer has: '\(start)'")
        }
    }

    // MARK: Usage against --help

    /// Each command the Usage block shows names every option its `--help` lists (one of an
    /// option's names suffices: `-w|--cwd|--workdir`), and no option `--help` does not know;
    /// every command `--help` lists has a line.
    @Test func theUsageBlockListsWhatHelpLists() async throws {
        let usage = try #require(Self.blocks().first { Self.kind(of: $0) == .usage })
        var optionsByCommand: [String: Set<String>] = [:]
        var command = ""
        for line in usage.lines where !line.isEmpty {
            let words = line.split(separator: " ").map(String.init)
            if line.hasPrefix("holdfast ") {
                command = words.dropFirst().prefix { $0.first.map { $0.isLowercase } ?? false }.joined(separator: " ")
            }
            optionsByCommand[command, default: []].formUnion(Self.longOptions(in: line))
        }
        let commands = try await Self.visibleCommands()
        #expect(commands.count >= 16, "\(commands)")
        for path in commands {
            let help = try await Self.holdfast(path.split(separator: " ").map(String.init) + ["--help"])
            #expect(help.status == .exited(0), "\(path) --help")
            let documented = optionsByCommand[path]
            #expect(documented != nil, "the Usage block has no line for 'holdfast \(path)'")
            let helpOptions = Self.helpOptions(help.out)
            for names in helpOptions where names.isDisjoint(with: documented ?? []) {
                #expect(Bool(false), "'holdfast \(path)': the Usage block lacks \(names.sorted().joined(separator: "|"))")
            }
            let known = helpOptions.reduce(Set<String>()) { $0.union($1) }
            for option in (documented ?? []).subtracting(known) {
                #expect(Bool(false), "'holdfast \(path)': the Usage block shows \(option), which --help does not know")
            }
        }
        for path in optionsByCommand.keys where !path.isEmpty {
            #expect(commands.contains(path), "the Usage block shows 'holdfast \(path)', which --help does not list")
        }
    }

    /// `--name` words of a line, without what follows `=`.
    static func longOptions(in text: String) -> Set<String> {
        var found: Set<String> = []
        var index = text.startIndex
        while let range = text.range(of: "--", range: index..<text.endIndex) {
            var end = range.upperBound
            while end < text.endIndex, text[end].isLowercase || text[end] == "-" { end = text.index(after: end) }
            let name = String(text[range.lowerBound..<end])
            if name.count > 2 { found.insert(name) }
            index = end
        }
        return found
    }

    /// The options of a `--help` text, each as the set of its long names (help and version left out).
    static func helpOptions(_ help: String) -> [Set<String>] {
        var inOptions = false
        var options: [Set<String>] = []
        for line in help.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("OPTIONS:") {
                inOptions = true
                continue
            }
            if inOptions, !line.isEmpty, !line.hasPrefix(" ") { inOptions = false }
            guard inOptions, line.hasPrefix("  -") else { continue }
            // "  -w, --cwd, --workdir <cwd>   The working..." : the names come before the text.
            let head = line.split(separator: "  ", omittingEmptySubsequences: true).first.map(String.init) ?? ""
            let names = longOptions(in: head.split(separator: "<").first.map(String.init) ?? head)
            if !names.isEmpty, names.isDisjoint(with: ["--help", "--version"]) { options.append(names) }
        }
        return options
    }

    /// Every command `holdfast --help` shows, its groups' subcommands in their place.
    static func visibleCommands() async throws -> [String] {
        func subcommands(_ path: [String]) async throws -> [String] {
            let help = try await holdfast(path + ["--help"]).out
            var inList = false
            var names: [String] = []
            for line in help.split(separator: "\n", omittingEmptySubsequences: false) {
                if line.hasPrefix("SUBCOMMANDS:") {
                    inList = true
                    continue
                }
                if inList, line.isEmpty { break }
                if inList, line.hasPrefix("  "), !line.hasPrefix("   "), let name = line.split(separator: " ").first {
                    names.append(String(name))
                }
            }
            return names
        }
        var commands: [String] = []
        for name in try await subcommands([]) {
            let nested = try await subcommands([name])
            if nested.isEmpty {
                commands.append(name)
            } else {
                commands += nested.map { "\(name) \($0)" }
            }
        }
        return commands
    }

    static func holdfast(_ arguments: [String]) async throws -> (status: HoldfastPosix.ExitStatus, out: String, err: String) {
        let directory = try TemporaryDirectory("holdfast-readme")
        defer { directory.remove() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let out = open(directory.file("out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let err = open(directory.file("err"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start([holdfastExecutable()] + arguments, stdout: out, stderr: err)
        close(out)
        close(err)
        let status = try await processes.wait(pid, timeout: .seconds(30))
        return (
            status, String(decoding: readFile(directory.file("out")) ?? [], as: UTF8.self),
            String(decoding: readFile(directory.file("err")) ?? [], as: UTF8.self)
        )
    }

    // MARK: The configuration table

    /// The configuration table's defaults are what `config check` reports for a key the file
    /// does not set (`bridge.address` is required: the file sets it).
    @Test func theConfigurationTableHasTheLoadersDefaults() async throws {
        let directory = try TemporaryDirectory("holdfast-readme-config")
        defer { directory.remove() }
        try writeFile(directory.file("min.yaml"), bytes("bridge:\n  address: \"unix:/tmp/b.sock\"\n"))
        try writeFile(directory.file("bridge.key"), bytes(String(repeating: "ab", count: 32) + "\n"), mode: 0o600)
        var environment = SpawnOptions.inheritedEnvironment().filter { !$0.hasPrefix("HOLDFAST_") }
        environment.append("HOLDFAST_BRIDGE_KEY_FILE=" + directory.file("bridge.key"))
        let processes = TestProcesses()
        defer { processes.killAll() }
        let out = open(directory.file("out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start(
            [holdfastExecutable(), "config", "check", directory.file("min.yaml"), "--json"], stdout: out, environment: environment)
        close(out)
        #expect(try await processes.wait(pid, timeout: .seconds(30)) == .exited(0))
        struct Check: Decodable {
            struct Setting: Decodable {
                var key: String
                var value: String
                var source: String
            }
            var settings: [Setting]
        }
        let check = try ControlJSON.decode(Check.self, from: readFile(directory.file("out")) ?? [], frameType: 0)

        // "| `a.b` / `c` | `x` / `y` | ..." rows: later keys name a sibling of the first.
        var table: [String: String] = [:]
        let section = Self.readme().components(separatedBy: "### Configuration").dropFirst().first ?? ""
        for row in section.split(separator: "\n") where row.hasPrefix("| `") {
            let cells = row.split(separator: "|").map { trim(String($0), " ") }
            guard cells.count >= 2 else { continue }
            let keys = cells[0].components(separatedBy: " / ").map { trim($0, "`") }
            let values = cells[1].components(separatedBy: " / ").map { trim($0, "`") }
            let prefix = keys[0].split(separator: ".").dropLast().joined(separator: ".")
            for (index, key) in keys.enumerated() {
                let full = key.contains(".") || prefix.isEmpty ? key : prefix + "." + key
                table[full] = index < values.count ? values[index] : values.last
            }
        }
        #expect(table.count >= 20, "\(table.keys.sorted())")
        for setting in check.settings {
            guard let documented = table[setting.key] else {
                Issue.record("the README's configuration table has no row for \(setting.key)")
                continue
            }
            if setting.source.hasPrefix("environment") { continue }
            if setting.source == "file" {
                #expect(documented.hasPrefix("*(required"), "\(setting.key): the file had to set it, the README says \(documented)")
                continue
            }
            let shown = documented.replacing("{run}", with: "/run/holdfast")
            if setting.value.isEmpty || setting.value == "\"\"" {
                #expect(shown.hasPrefix("*(empty"), "\(setting.key): default empty, the README says \(documented)")
            } else {
                #expect(shown == setting.value, "\(setting.key): default \(setting.value), the README says \(documented)")
            }
        }
    }

    // MARK: Running the examples

    /// The shell examples (Three terminals, runc, pipe/receive) and the `config check`
    /// transcript, run as written against `holdfast host serve` and a daemon started by the
    /// README's own first two lines.
    @Test(.enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root (the daemon), runc and busybox-static"))
    func everyShellExampleRunsAsWritten() async throws {
        let runner = try Runner()
        defer { runner.cleanUp() }
        let blocks = Self.blocks()
        let run = blocks.filter { Self.kind(of: $0) == .run }
        #expect(run.count == 3)
        for block in run { try await runner.runBlock(block) }
        for block in blocks where Self.kind(of: block) == .transcript { try await runner.runTranscript(block) }
    }

    /// The Swift example of "The host side as a library", as written (its socket path moved into
    /// a temp directory), against a daemon.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theLibraryExampleRunsAsWritten() async throws {
        let block = try #require(Self.blocks().first { Self.kind(of: $0) == .swift })
        #expect(block.lines.joined(separator: "\n") + "\n" == Self.swiftExample, "README's Swift example changed: copy it here")
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let bridge = daemon.bridge
        let agent = daemon.directory.file("agent")
        #expect(mkdir(agent, 0o755) == 0)
        // --- the README's lines, with "/run/agent" → the temp directory ---
        let server = try StreamServer(listeningOn: .unix(path: agent + "/streams.sock"))
        let stdout = try server.open(token: Array("c1-stdout".utf8), direction: .receive)  // a new random secret each
        let stdin = try server.open(token: Array("c1-stdin".utf8), direction: .send)
        server.start()
        let address = server.address.description
        let spec = ProcessSpec(id: "c1", argv: ["cat"], stdin: stdin.streamSpec(at: address), stdout: stdout.streamSpec(at: address))
        let pid = try await bridge.create(spec)   // token and secret travel to the guest over the bridge
        // --- end ---
        defer { server.close() }
        chmod(agent + "/streams.sock", 0o666)  // the broker dials as its own uid
        #expect(pid > 0)
        let echoed = NIOLockedValueBox<[UInt8]>([])
        let reader = Task { for await chunk in stdout.chunks() { echoed.withLockedValue { $0 += chunk } } }
        defer { reader.cancel() }
        try await stdin.send(bytes("through cat\n"))
        _ = await stdin.finish()
        try await eventually("cat's echo") { echoed.withLockedValue { $0 } == bytes("through cat\n") }
    }

    static let swiftExample = """
        let server = try StreamServer(listeningOn: .unix(path: "/run/agent/streams.sock"))
        let stdout = try server.open(token: Array("c1-stdout".utf8), direction: .receive)  // a new random secret each
        let stdin = try server.open(token: Array("c1-stdin".utf8), direction: .send)
        server.start()
        let address = server.address.description
        let spec = ProcessSpec(id: "c1", argv: ["cat"], stdin: stdin.streamSpec(at: address), stdout: stdout.streamSpec(at: address))
        let pid = try await bridge.create(spec)   // token and secret travel to the guest over the bridge

        """
}

/// Runs README lines through `/bin/sh -c` with `holdfast` on PATH.
final class Runner: Sendable {
    let directory: TemporaryDirectory
    let processes = TestProcesses()
    let environment: [String]
    let serveLog: String

    init() throws {
        directory = try TemporaryDirectory("holdfast-readme-run")
        chmod(directory.path, 0o755)  // the broker, unprivileged, reaches the sockets in here
        for made in ["t", "srv"] { mkdir(directory.file(made), 0o755) }
        serveLog = directory.file("serve.log")
        let binaries = holdfastExecutable().split(separator: "/").dropLast().joined(separator: "/")
        var environment = SpawnOptions.inheritedEnvironment().filter {
            !$0.hasPrefix("HOLDFAST_") && !$0.hasPrefix("PATH=")
        }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/sbin:/usr/bin:/sbin:/bin"
        environment += [
            "PATH=/\(binaries):\(path)", "HOLDFAST_RUN_DIR=" + directory.file("run"),
            "HOLDFAST_BROKER_USER=uid:\(ReservedUIDs.unused())",
        ]
        self.environment = environment
    }

    func cleanUp() {
        processes.killAll()
        // The daemon is killed, not stopped: what its processes left goes with their cgroups.
        endDaemonCgroups(runDirectory: directory.file("run"))
        directory.remove()
    }

    /// The line as this test runs it: its movable paths moved (see ReadmeTests).
    func moved(_ line: String) -> String {
        // /tmp/ first: the test's own directories are under /tmp too.
        line.replacing("/tmp/", with: directory.file("t") + "/").replacing("/srv/web", with: directory.file("srv") + "/web")
    }

    struct Finished {
        var status: HoldfastPosix.ExitStatus
        var out: String
        var err: String
    }

    struct Started {
        var pid: pid_t
        var outPath: String
        var errPath: String
        var out: String { String(decoding: readFile(outPath) ?? [], as: UTF8.self) }
        var err: String { String(decoding: readFile(errPath) ?? [], as: UTF8.self) }
    }

    func start(_ line: String, stdin: String = "", directory workingDirectory: String? = nil, output: String? = nil) throws -> Started {
        let tag = UInt32.random(in: 0..<UInt32.max)
        let input = directory.file("in.\(tag)")
        try writeFile(input, bytes(stdin))
        let outPath = output ?? directory.file("out.\(tag)")
        let errPath = output ?? directory.file("err.\(tag)")
        let inFD = open(input, O_RDONLY | O_CLOEXEC)
        let outFD = open(outPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        let errFD = open(errPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        defer {
            close(inFD)
            close(outFD)
            close(errFD)
        }
        let pid = try processes.start(
            ["/bin/sh", "-c", moved(line)], stdin: inFD, stdout: outFD, stderr: errFD, environment: environment,
            directory: workingDirectory ?? directory.file("t"))
        return Started(pid: pid, outPath: outPath, errPath: errPath)
    }

    func finish(_ started: Started, within bound: Duration = .seconds(120)) async throws -> Finished {
        let status = try await processes.wait(started.pid, timeout: bound)
        return Finished(status: status, out: started.out, err: started.err)
    }

    func run(_ line: String, stdin: String = "", directory: String? = nil) async throws -> Finished {
        try await finish(try start(line, stdin: stdin, directory: directory))
    }

    /// Runs a block's lines in order, each by its step; a command line with no step fails.
    func runBlock(_ block: ReadmeTests.Block) async throws {
        let steps = self.steps()
        for raw in block.lines {
            let line = trim(raw, " ")
            guard !line.isEmpty, !line.hasPrefix("#") else { continue }
            guard let step = steps.first(where: { line.hasPrefix($0.0) }) else {
                Issue.record("README line with no step in ReadmeTests: \(line)")
                continue
            }
            print("README step: \(line)")
            do {
                try await step.1(line)
            } catch {
                Issue.record("README line '\(line)': \(error)")
                throw error
            }
        }
    }

    /// The steps, by the start of the README line: how each is driven and what it must do.
    func steps() -> [(String, @Sendable (String) async throws -> Void)] {
        let checkout = ReadmeTests.checkout
        let background = NIOLockedValueBox<[String: Started]>([:])
        return [
            // Three terminals.
            // The two servers run in place of their shell (`exec`): the pid the runner ends at
            // cleanup is theirs, so none outlives the test.
            ("holdfast host serve", { line in
                _ = try self.start("exec " + line, directory: checkout, output: self.serveLog)
                try await eventually("host serve listening") { access(self.directory.file("run/host.sock"), F_OK) == 0 }
            }),
            ("holdfast daemon --config config/holdfast-dev.yaml", { line in
                let log = self.directory.file("daemon.log")
                _ = try self.start("exec " + line, directory: checkout, output: log)
                do {
                    try await eventually("the guest connected to host serve") { self.text(self.serveLog).contains("guest connected") }
                } catch {
                    Issue.record("host serve:\n\(self.text(self.serveLog))\ndaemon:\n\(self.text(log))")
                    throw error
                }
                #expect(self.text(self.serveLog).contains("bridge key \(self.directory.file("run/bridge.key")) (new)"))
            }),
            ("holdfast host run --id count", { line in
                // Terminal 3 counts while the migration below happens.
                background.withLockedValue { $0["count"] = try? self.start(line) }
            }),
            ("holdfast host migrate --blackout 1000", { line in
                let count = try #require(background.withLockedValue { $0["count"] })
                try await eventually("the count under way") { count.out.contains("5\n") }
                let migrated = try await self.run(line)
                #expect(migrated.status == .exited(0), "\(migrated.err)")
                #expect(migrated.out.hasPrefix("migrated: dropped the bridge and "), "\(migrated.out)")
                let counted = try await self.finish(count)
                #expect(counted.status == .exited(0), "\(counted.err)")
                #expect(counted.out == (1...100).map { "\($0)\n" }.joined(), "every number once, in order, through the migration")
            }),
            ("holdfast host run -- cat", { line in
                let typed = try await self.run(line, stdin: "typed line\n")
                #expect(typed.status == .exited(0) && typed.out == "typed line\n", "\(typed.err)")
            }),
            ("holdfast host run -d --id clock", { line in
                let started = try await self.run(line)
                #expect(started.status == .exited(0) && started.out == "clock\n", "\(started.err)")
            }),
            ("holdfast host ps", { line in
                let listed = try await self.run(line)
                let row = listed.out.split(separator: "\n").first { $0.hasPrefix("clock ") }.map(String.init) ?? ""
                #expect(row.contains("running") && row.contains("while :"), "\(listed.out)")
            }),
            ("holdfast host logs clock", { line in
                try await eventually("the clock's output in its log") { try await !self.run(line).out.isEmpty }
            }),
            ("holdfast host attach clock", { line in
                // Ctrl-C after the next line of output.
                let attached = try self.start(line)
                try await eventually("a line through attach") { attached.out.contains("\n") }
                // As a terminal's Ctrl-C does: to the foreground process group (the shell and holdfast).
                kill(-attached.pid, SIGINT)
                let ended = try await self.finish(attached)
                #expect(ended.status == .signaled(SIGINT) || ended.status == .exited(128 + SIGINT), "\(ended.status)")
                #expect(ended.err.contains("detached; reattach with: holdfast host attach clock"), "\(ended.err)")
            }),
            ("holdfast host stop clock", { line in
                let stopped = try await self.run(line)
                #expect(stopped.status == .exited(0) && stopped.out == "clock\n", "\(stopped.err)")
            }),
            ("holdfast host wait clock", { line in
                let waited = try await self.run(line)
                #expect(waited.status == .exited(0) && waited.out == "143\n", "\(waited.err)")
            }),
            // Containers with runc: the bundle, then the host's commands.
            ("mkdir -p /srv/web/rootfs/bin", { line in
                let result = try await self.run(line)
                #expect(result.status == .exited(0), "\(result.err)")
            }),
            ("for applet in sh cat ls sleep", { line in
                let result = try await self.run(line)
                #expect(result.status == .exited(0), "\(result.err)")
            }),
            ("cd /srv/web && runc spec", { line in
                let made = try await self.run(line)
                #expect(made.status == .exited(0), "\(made.err)")
                let config = self.text(self.directory.file("srv/web/config.json"))
                #expect(config.contains("\"sleep\", \"100000\"") && config.contains("\"terminal\": false"), "\(config)")
            }),
            ("holdfast host run -d --runtime runc --bundle /srv/web --id web", { line in
                let started = try await self.run(line)
                #expect(started.status == .exited(0) && started.out == "web\n", "\(started.err)")
            }),
            ("holdfast host exec web -- sh -c 'cat /proc/1/comm'", { line in
                let exec = try await self.run(line)
                #expect(exec.status == .exited(0) && exec.out == "sleep\n", "\(exec.err)")
            }),
            ("holdfast host exec -t web -- sh", { line in
                let shell = try await self.run(line, stdin: "echo inside-$((40+2))\nexit 7\n")
                #expect(shell.status == .exited(7), "\(shell.err)")
                #expect(shell.out.contains("inside-42"), "\(shell.out)")
            }),
            ("holdfast host stop web", { line in
                let stopped = try await self.run(line)
                #expect(stopped.status == .exited(0) && stopped.out == "web\n", "\(stopped.err)")
                #expect(stopped.err.contains("killed with SIGKILL"), "pid 1 ignores SIGTERM: \(stopped.err)")
            }),
            // pipe and receive.
            ("holdfast receive --mode resumable", { line in
                let command = line.hasSuffix("&") ? String(line.dropLast()) : line
                background.withLockedValue { $0["receive"] = try? self.start(command) }
            }),
            ("head -c 10M /dev/urandom | tee original | holdfast pipe", { line in
                let piped = try await self.run(line)
                #expect(piped.status == .exited(0), "\(piped.err)")
                let receiver = try #require(background.withLockedValue { $0["receive"] })
                #expect(try await self.finish(receiver).status == .exited(0))
            }),
            ("cmp original copy", { line in
                let compared = try await self.run(line)
                #expect(compared.status == .exited(0), "\(compared.out)")
                var info = stat()
                #expect(stat(self.directory.file("t/copy"), &info) == 0 && info.st_size == 10 << 20)
            }),
        ]
    }

    /// A `$ command` transcript: each command's output, as printed there, in order (`...`
    /// stands for lines left out).
    func runTranscript(_ block: ReadmeTests.Block) async throws {
        var commands: [(String, [String])] = []
        for line in block.lines where !line.isEmpty {
            if line.hasPrefix("$ ") {
                commands.append((String(line.dropFirst(2)), []))
            } else if !commands.isEmpty {
                commands[commands.count - 1].1.append(line)
            }
        }
        for (command, expected) in commands {
            if command.contains("/etc/holdfast/holdfast.yaml") {
                // The installed package's file and user: `make deb-check` runs config check on
                // the unpacked package.
                continue
            }
            let result = try await run(command)
            let printed = (result.err + result.out).split(separator: "\n").map(String.init)
            let wanted = expected.filter { $0 != "..." }.map(moved)
            var position = printed.startIndex
            for line in wanted {
                guard let found = printed[position...].firstIndex(of: line) else {
                    Issue.record("'\(command)' did not print '\(line)'; it printed:\n\(printed.joined(separator: "\n"))")
                    break
                }
                position = found + 1
            }
        }
    }

    func text(_ path: String) -> String { String(decoding: readFile(path) ?? [], as: UTF8.self) }
}

/// `text` without `character` at either end.
func trim(_ text: String, _ character: Character) -> String {
    String(text.drop { $0 == character }.reversed().drop { $0 == character }.reversed())
}
