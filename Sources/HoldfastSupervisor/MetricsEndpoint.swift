import HoldfastCore
import HoldfastPosix
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The metrics endpoint: `GET /metrics` in the Prometheus text format, on a local TCP or Unix
/// address (`metrics.address`; off by default). HTTP/1.0-style: one request per connection,
/// answered and closed. A request head larger than 8 KiB or slower than 5 s is dropped.
struct MetricsEndpoint: Sendable {
    let listener: Listener
    let logger: Logger
    let render: @Sendable () async -> String

    static let maxHead = 8 * 1024
    static let headTimeout: Duration = .seconds(5)

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
        while !Task.isCancelled {
            guard let connection = try? await listener.accept() else { return }
            Task { await answer(connection) }
        }
    }

    private func answer(_ connection: AsyncFD) async {
        defer { connection.close() }
        // A peer that never finishes its head is cut off.
        let deadline = TimeoutWheel.shared.schedule(after: Self.headTimeout) { connection.close() }
        defer { TimeoutWheel.shared.cancel(deadline) }
        var head: [UInt8] = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
        defer { buffer.deallocate() }
        while !Self.isComplete(head) {
            guard head.count < Self.maxHead, let count = try? await connection.read(into: buffer), count > 0 else { return }
            head += buffer[..<count]
        }
        TimeoutWheel.shared.cancel(deadline)
        let response = await Self.response(toHead: head, body: render)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: response.count, alignment: 1)
        defer { out.deallocate() }
        out.copyBytes(from: response)
        try? await connection.write(UnsafeRawBufferPointer(out))
    }

    static func isComplete(_ head: [UInt8]) -> Bool {
        let blank: [UInt8] = [13, 10, 13, 10]
        guard head.count >= 4 else { return false }
        for start in 0...(head.count - 4) where head[start] == 13 && Array(head[start..<start + 4]) == blank { return true }
        return false
    }
}
