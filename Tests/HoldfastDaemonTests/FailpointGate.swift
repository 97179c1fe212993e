import HoldfastCore
import HoldfastTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The gate of a failpoint's hold (`Failpoint.hold`): the daemon started with `environment`
/// holds the armed step until the test calls `open()` — after it did what must happen while the
/// step is held, however long a loaded machine took to do it.
struct FailpointGate: Sendable {
    private let directory: TemporaryDirectory
    let path: String

    init() throws {
        directory = try TemporaryDirectory("holdfast-gate")
        chmod(directory.path, 0o755)  // every role may look for the file, whatever its uid
        path = directory.file("open")
    }

    var environment: [String: String] { [Failpoint.gateVariable: path] }

    func open() throws { try writeFile(path, []) }

    func remove() { directory.remove() }
}
