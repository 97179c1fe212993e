import HoldfastCore
import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast pipe --to ADDR`: relays this process's stdin to ADDR through a ConnSlot, redialing
/// whenever the connection is lost — socat's `-u - CONNECT` with Holdfast's reconnect semantics.
/// Also the Holdfast row of `make bench`.
public enum PipeRelay {
    public struct Options: Sendable {
        public var destination: SocketAddress
        public var policy: RedialPolicy
        public var bufferSize: Int
        public var pipeCapacity: Int?

        public init(destination: SocketAddress, policy: RedialPolicy = .default, bufferSize: Int = 128 * 1024, pipeCapacity: Int? = nil) {
            self.destination = destination
            self.policy = policy
            self.bufferSize = bufferSize
            self.pipeCapacity = pipeCapacity
        }
    }

    /// Runs until stdin ends; returns the relay's report.
    public static func run(_ options: Options) async throws -> RelayReport {
        let input = dup(0)
        guard input >= 0 else { throw SystemError.last("dup(stdin)") }
        if let capacity = options.pipeCapacity { PipeEnds.setCapacity(of: input, to: capacity) }
        let source = try AsyncFD(adopting: input)
        defer { source.close() }
        let destination = options.destination
        let policy = options.policy
        let slot = ConnSlot<AsyncFD>(
            name: "stdin", policy: policy,
            dial: { try await Dialer.connect(to: destination, timeout: policy.connectTimeout) })
        slot.disconnect()  // starts the first dial
        return await Relay.output(from: source, to: slot, pool: BufferPool(bufferSize: options.bufferSize, retained: 2))
    }
}
