import HoldfastCore
import HoldfastPosix
import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The metrics endpoint: `GET /metrics` in the Prometheus text format, on a local TCP or Unix
/// address (`metrics.address`; off by default). HTTP/1.0-style: one request per connection,
/// answered and closed. A request head larger than 8 KiB or slower than 5 s is dropped, and a
/// whole exchange gets 15 s.
///
/// Any process in the guest may dial it, and every connection is an fd of the supervisor, the
/// process that must never run out (it keeps every container's stdio): at most
/// `maxWaitingForHead` connections wait for their head — one more closes the oldest, so a
/// flood cannot keep a scraper out — and at most `maxConnections` are open at once; beyond
/// that the endpoint stops accepting and the kernel's backlog holds (or refuses) the rest.
final class MetricsEndpoint: Sendable {
    let listener: Listener
    let logger: Logger
    let render: @Sendable () async -> String
    private let open = RequestLimit(capacity: MetricsEndpoint.maxConnections)
    private let waiting = NIOLockedValueBox(Waiting())

    private struct Waiting {
        var next: UInt64 = 0
        var connections: [UInt64: AsyncFD] = [:]
    }

    static let maxHead = 8 * 1024
    static let headTimeout: Duration = .seconds(5)
    static let exchangeTimeout: Duration = .seconds(15)
    static let maxWaitingForHead = 16
    static let maxConnections = 64

    init(listener: Listener, logger: Logger, render: @escaping @Sendable () async -> String) {
        self.listener = listener
        self.logger = logger
        self.render = render
    }

    /// What to answer a request head with (pure, tested apart).
    static func response(toHead head: [UInt8], body: () async -> String) async -> [UInt8] {
        guard let lineEnd = head.firstIndex(of: UInt8(ascii: "\r")) ?? head.firstIndex(of: UInt8(ascii: "\n")) else {
            return reply(400, "Bad Request", "malformed request\n")
        }
        let parts = String(decoding: head[..<lineEnd], as: UTF8.self).split(separator: " ")
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else { return reply(400, "Bad Request", "malformed request line\n") }
        guard parts[0] == "GET" || parts[0] == "HEAD" else { return reply(405, "Method Not Allowed", "only GET\n") }
        let path = parts[1].split(separator: "?", maxSplits: 1).first.map(String.init) ?? ""
        guard path == "/metrics" else { return reply(404, "Not Found", "metrics are at /metrics\n") }
        let text = await body()
        return reply(200, "OK", parts[0] == "HEAD" ? "" : text, contentType: "text/plain; version=0.0.4; charset=utf-8")
    }

    private static func reply(_ code: Int, _ reason: String, _ body: String, contentType: String = "text/plain; charset=utf-8") -> [UInt8] {
        let bytes = Array(body.utf8)
        let head = "HTTP/1.1 \(code) \(reason)\r\nContent-Type: \(contentType)\r\nContent-Length: \(bytes.count)\r\nConnection: close\r\n\r\n"
        return Array(head.utf8) + bytes
    }

    func serve() async {
        var failures = LogPacer<Int>(interval: .seconds(10))
        while !Task.isCancelled {
            await open.acquire()
            guard let connection = await listener.nextConnection(failed: { error in
                guard let unsaid = failures.note(0) else { return }
                logger.warning("metrics endpoint: accept failed; the connection waits and is accepted again", metadata: [
                    "error": "\(error)", "unsaid": "\(unsaid)",
                ])
            }) else {
                open.release()
                return
            }
            let ticket = waitForHead(connection)
            Task {
                defer { open.release() }
                await answer(connection, ticket: ticket)
            }
        }
    }

    /// Files `connection` among those waiting for their head, closing the oldest beyond
    /// `maxWaitingForHead` (its `answer` then reads nothing and ends).
    private func waitForHead(_ connection: AsyncFD) -> UInt64 {
        let (ticket, oldest) = waiting.withLockedValue { w -> (UInt64, AsyncFD?) in
            w.next &+= 1
            w.connections[w.next] = connection
            guard w.connections.count > Self.maxWaitingForHead, let key = w.connections.keys.min() else { return (w.next, nil) }
            return (w.next, w.connections.removeValue(forKey: key))
        }
        oldest?.close()
        return ticket
    }

    private func answer(_ connection: AsyncFD, ticket: UInt64) async {
        defer { connection.close() }
        // A peer that never finishes its head, or never reads the answer, is cut off.
        let headDeadline = TimeoutWheel.shared.schedule(after: Self.headTimeout) { connection.close() }
        let exchangeDeadline = TimeoutWheel.shared.schedule(after: Self.exchangeTimeout) { connection.close() }
        defer { TimeoutWheel.shared.cancel(exchangeDeadline) }
        var head: [UInt8] = []
        var looked = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
        defer { buffer.deallocate() }
        while !Self.headEnds(in: head, lookingFrom: looked) {
            guard head.count < Self.maxHead, let count = try? await connection.read(into: buffer), count > 0 else {
                _ = waiting.withLockedValue { $0.connections.removeValue(forKey: ticket) }
                TimeoutWheel.shared.cancel(headDeadline)
                return
            }
            looked = head.count
            head += buffer[..<count]
        }
        _ = waiting.withLockedValue { $0.connections.removeValue(forKey: ticket) }
        TimeoutWheel.shared.cancel(headDeadline)
        let response = await Self.response(toHead: head, body: render)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: response.count, alignment: 1)
        defer { out.deallocate() }
        out.copyBytes(from: response)
        try? await connection.write(UnsafeRawBufferPointer(out))
    }

    static func isComplete(_ head: [UInt8]) -> Bool { headEnds(in: head, lookingFrom: 0) }

    /// Whether `head` holds the blank line that ends an HTTP head, looking only at what came
    /// from `start` on (and the 3 bytes before it, where a CR LF CR LF split by a read begins):
    /// the bytes before were looked at after an earlier read. Looking at the whole head after
    /// every read, a peer sending its 8 KiB one byte at a time made the supervisor compare
    /// (and copy) some 33 million times per connection.
    static func headEnds(in head: [UInt8], lookingFrom start: Int) -> Bool {
        var index = max(0, start - 3)
        while index + 4 <= head.count {
            if head[index] == 13, head[index + 1] == 10, head[index + 2] == 13, head[index + 3] == 10 { return true }
            index += 1
        }
        return false
    }
}
