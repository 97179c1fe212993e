import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// The fd numbers a process has open, from /proc/PID/fd.
private func descriptorNumbers(of pid: pid_t) -> [Int32] {
    guard let directory = opendir("/proc/\(pid)/fd") else { return [] }
    defer { closedir(directory) }
    var numbers: [Int32] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if let number = Int32(name) { numbers.append(number) }
    }
    return numbers.sorted()
}

@Suite("Spawning children", .timeLimit(.minutes(5)))
struct SpawnTests {
    /// A child must start with its stdio and the fds it was given, nothing else: a stray copy of
    /// some other pipe's write end in a long-lived child keeps that pipe's reader from ever seeing
    /// end-of-file. Here the parent holds a pipe opened *without* O_CLOEXEC on purpose.
    @Test func aChildGetsOnlyItsStdioAndTheDescriptorsItIsGiven() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        var leaky: [Int32] = [-1, -1]
        #expect(pipe(&leaky) == 0)
        defer { close(leaky[0]); close(leaky[1]) }
        let given = try PipeEnds.make()
        defer { close(given.read); close(given.write) }

        let plain = try processes.start(["sleep", "30"], stdout: given.write)
        var options = SpawnOptions(executable: "sleep", arguments: ["sleep", "30"])
        options.keepDescriptors = [given.read]
        options.stderr = 2
        options.parentDeathSignal = SIGKILL
        let keeping = try Spawner.spawn(options)
        processes.adopt(keeping)

        // Look once `sleep` sleeps: its name changes at exec, but the dynamic loader then still
        // opens (and closes) the libraries as fd 3 — a starved CI machine caught it there.
        // x86_64: 35 nanosleep, 230 clock_nanosleep; aarch64: 101 nanosleep, 115 clock_nanosleep.
        for pid in [plain, keeping] {
            try await eventually("\(pid) asleep") {
                let call = String(decoding: readFile("/proc/\(pid)/syscall") ?? [], as: UTF8.self).split(separator: " ").first
                return ["35", "230", "101", "115"].contains(call.map(String.init) ?? "")
            }
        }
        #expect(descriptorNumbers(of: plain) == [0, 1, 2])
        #expect(descriptorNumbers(of: keeping) == [0, 1, 2, given.read].sorted())
        // The child's stdout is the pipe it was given.
        var ours = stat()
        var theirs = stat()
        #expect(fstat(given.write, &ours) == 0 && stat("/proc/\(plain)/fd/1", &theirs) == 0)
        #expect(ours.st_ino == theirs.st_ino)
    }

    /// What a child is started with, whatever this process has: its open-file limits and its
    /// OOM score adjustment (raised here: lowering one takes CAP_SYS_RESOURCE, which a test
    /// run in a container lacks — then the child keeps ours, and starts all the same).
    @Test func aChildGetsTheOpenFileLimitsAndOOMAdjustmentItIsGiven() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        var options = SpawnOptions(executable: "sleep", arguments: ["sleep", "30"])
        options.openFileLimit = (soft: 77, hard: nil)
        options.oomScoreAdjustment = 123
        let pid = try Spawner.spawn(options)
        processes.adopt(pid)
        let limits = String(decoding: readFile("/proc/\(pid)/limits") ?? [], as: UTF8.self)
        let line = try #require(limits.split(separator: "\n").first { $0.hasPrefix("Max open files") })
        #expect(line.split(separator: " ").dropFirst(3).first == "77", "\(line)")
        #expect(String(decoding: readFile("/proc/\(pid)/oom_score_adj") ?? [], as: UTF8.self) == "123\n")
        // Lower than ours: granted with CAP_SYS_RESOURCE, else ours is kept and the child runs.
        var lower = SpawnOptions(executable: "sleep", arguments: ["sleep", "30"])
        lower.oomScoreAdjustment = -321
        let second = try Spawner.spawn(lower)
        processes.adopt(second)
        let got = String(decoding: readFile("/proc/\(second)/oom_score_adj") ?? [], as: UTF8.self)
        let ours = String(decoding: readFile("/proc/self/oom_score_adj") ?? [], as: UTF8.self)
        #expect(got == "-321\n" || got == ours, "\(got)")
    }
}
