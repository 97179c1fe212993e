import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The bridge worker: dials the host's bridge, says hello, and tells the supervisor when the
/// bridge is up and when it is lost; redials forever with capped exponential back-off. It
/// parses everything the host sends, so a bug here is a crash of a restartable worker, never of
/// the stdio.
public enum BridgeWorker {
    public struct Options: Sendable {
        public var address: SocketAddress
        public var reconnectInitial: Duration
        public var reconnectMax: Duration
        public var connectTimeout: Duration

        public init(address: SocketAddress, reconnectInitial: Duration, reconnectMax: Duration, connectTimeout: Duration = .seconds(2)) {
            self.address = address
            self.reconnectInitial = reconnectInitial
            self.reconnectMax = reconnectMax
            self.connectTimeout = connectTimeout
        }
    }

    /// Runs until the supervisor's channel closes.
    public static func run(supervisor: FDChannel, options: Options, logger: Logger) async {
        // The supervisor never writes to this channel: end-of-file means it is gone, and a
        // bridge worker without a supervisor has nothing to do.
        Task {
            _ = try? await supervisor.receive()
            logger.info("supervisor gone; bridge worker exiting")
            exit(0)
        }
        var backoff = options.reconnectInitial
        while true {
            let connection: AsyncFD
            do {
                connection = try await Dialer.connect(to: options.address, timeout: options.connectTimeout)
            } catch {
                logger.debug("bridge dial failed", metadata: ["address": "\(options.address)", "error": "\(error)"])
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, options.reconnectMax)
                continue
            }
            backoff = options.reconnectInitial
            do {
                try await FrameIO.write(ControlFrame(type: 0x1001, id: 0, body: ControlJSON.encode(hello())).encoded, to: connection)
            } catch {
                connection.close()
                continue
            }
            logger.info("bridge connected", metadata: ["address": "\(options.address)"])
            try? await supervisor.send(ControlFrame(type: SupervisorMessageType.bridgeUp.rawValue, id: 0, body: []).encoded)
            await drain(connection)
            connection.close()
            logger.warning("bridge lost", metadata: ["address": "\(options.address)"])
            try? await supervisor.send(ControlFrame(type: SupervisorMessageType.bridgeDown.rawValue, id: 0, body: []).encoded)
            try? await Task.sleep(for: options.reconnectInitial)
        }
    }

    /// Reads until the connection ends (the full request protocol comes with the next issue).
    private static func drain(_ connection: AsyncFD) async {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer { buffer.deallocate() }
        while let count = try? await connection.read(into: buffer), count > 0 {}
    }

    struct Hello: Codable {
        var version: Int
        var bootID: String
    }

    static func hello() -> Hello {
        Hello(version: 1, bootID: bootID())
    }

    /// The kernel's boot id: changes on every boot of the VM, not on migration.
    static func bootID() -> String {
        let fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "unknown" }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return "unknown" }
        return String(decoding: buffer[..<count], as: UTF8.self).filter { $0 != "\n" }
    }
}
