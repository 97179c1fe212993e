import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast daemon --config FILE`.
public enum DaemonCommand {
    /// Loads the configuration (a bad one stops here: file, key, reason on stderr, exit 2) and
    /// runs the supervisor until SIGTERM/SIGINT. Returns the exit code.
    public static func run(configPath: String, logger: Logger) async -> Int32 {
        let configuration: DaemonConfiguration
        do {
            configuration = try await ConfigurationLoader.load(path: configPath)
        } catch {
            logger.critical("bad configuration: \(error)")
            return 2
        }
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else {
            logger.critical("cannot find my own executable (/proc/self/exe)")
            return 1
        }
        let executable = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // Before any role starts: they inherit it.
        let files = ResourceLimits.raiseOpenFiles()
        if files.after != files.before {
            logger.info("open file limit raised", metadata: ["from": "\(files.before)", "to": "\(files.after)"])
        }
        let supervisor = Supervisor(configuration: configuration, logger: logger, executable: executable)
        do {
            return try await supervisor.run()
        } catch {
            logger.critical("daemon failed: \(error)")
            return 1
        }
    }
}
