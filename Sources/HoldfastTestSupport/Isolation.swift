import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// Runs a test's body in a fresh test process of its own.
///
/// Swift Testing runs tests in parallel in one process, so a test that counts `/proc/self/fd` or
/// RSS would see other tests' fds come and go. Such a test calls
///
///     guard try await isolated("myTestName") else { return }
///
/// In the normal run this re-executes the test binary with `--filter myTestName` and an
/// environment marker, waits for it, and returns false after reporting its outcome through
/// the returned `IsolatedRun` (thrown as an error if it failed). Inside that child run it returns
/// true and the test body does the real work, alone in its process.
///
/// `timeout` bounds the child run and must stay below the suite's time limit: a child that
/// outlives it is killed with an account of where it was (its output so far, the state of it and
/// of every process under it, its threads' stacks when gdb is there), which a suite's time limit
/// would cut short with no word of it.
public func isolated(_ testName: String, timeout: Duration = .seconds(120)) async throws -> Bool {
    let marker = "HOLDFAST_ISOLATED_TEST"
    if let value = getenv(marker), String(cString: value) == testName { return true }
    let directory = try TemporaryDirectory("holdfast-isolated")
    defer { directory.remove() }
    let logPath = directory.file("output.log")
    let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard log >= 0 else { throw SystemError.last("open(\(logPath))") }
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { throw SystemError.last("readlink(/proc/self/exe)") }
    let executable = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let processes = TestProcesses()
    defer { processes.killAll() }
    let pid = try processes.start(
        [executable, "--testing-library", "swift-testing", "--filter", testName + "\\("],
        stdout: log, stderr: log,
        environment: SpawnOptions.inheritedEnvironment() + ["\(marker)=\(testName)"])
    close(log)
    let status: ExitStatus
    do {
        status = try await processes.wait(pid, timeout: timeout)
    } catch let timedOut as TimedOut {
        // Taken before the kill: where the child and what it started are.
        let account = await ProcessAccount.tree(under: pid)
        _ = kill(-pid, SIGKILL)  // its process group: what it started without a session of its own
        processes.kill(pid)
        let output = String(decoding: readFile(logPath) ?? [], as: UTF8.self)
        throw IsolatedRunFailed(testName: testName, outcome: "\(timedOut); killed", output: output + "\n" + account)
    }
    let output = String(decoding: readFile(logPath) ?? [], as: UTF8.self)
    guard status == .exited(0), output.contains("passed") else {
        throw IsolatedRunFailed(testName: testName, outcome: "ended with \(status)", output: output)
    }
    return false
}

public struct IsolatedRunFailed: Error, CustomStringConvertible {
    public var testName: String
    public var outcome: String
    public var output: String
    public var description: String { "isolated run of \(testName): \(outcome):\n\(output)" }
}
