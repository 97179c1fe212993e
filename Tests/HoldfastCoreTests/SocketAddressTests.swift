import Testing

@testable import HoldfastCore

@Suite("SocketAddress parsing", .timeLimit(.minutes(5)))
struct SocketAddressTests {
    @Test(arguments: [
        ("vsock://2:5000", SocketAddress.vsock(cid: 2, port: 5000)),
        ("vsock://host:5000", .vsock(cid: 2, port: 5000)),
        ("vsock://any:1024", .vsock(cid: 0xFFFF_FFFF, port: 1024)),
        ("vsock://3:4294967295", .vsock(cid: 3, port: 4_294_967_295)),
        ("unix:/run/holdfast/bridge.sock", .unix(path: "/run/holdfast/bridge.sock")),
        ("unix:///tmp/x.sock", .unix(path: "/tmp/x.sock")),
        ("unix:relative.sock", .unix(path: "relative.sock")),
        ("tcp://127.0.0.1:8080", .tcp(host: "127.0.0.1", port: 8080)),
        ("tcp://localhost:0", .tcp(host: "localhost", port: 0)),
        ("tcp://[::1]:443", .tcp(host: "::1", port: 443)),
    ])
    func parses(text: String, expected: SocketAddress) throws {
        #expect(try SocketAddress(parsing: text) == expected)
    }

    @Test(arguments: [
        ("vsock://x:5", "x", "CID"),
        ("vsock://2:port", "port", "port"),
        ("vsock://2:99999999999", "99999999999", "port"),
        ("vsock://2", "2", "CID:PORT"),
        ("unix:", "", "empty"),
        ("tcp://127.0.0.1:70000", "70000", "0-65535"),
        ("tcp://:80", "", "host"),
        ("tcp://[::1:80", "[::1:80", "']'"),
        ("tcp://nohost", "nohost", "HOST:PORT"),
        ("http://example.com", "http", "unknown scheme"),
        ("", "", "unknown scheme"),
    ])
    func rejectsNamingTheBadPart(text: String, part: String, reasonMentions: String) {
        #expect {
            try SocketAddress(parsing: text)
        } throws: { error in
            guard let error = error as? AddressError else { return false }
            return error.part == part && error.reason.contains(reasonMentions) && (text.isEmpty || error.description.contains(text))
        }
    }

    @Test func rejectsAUnixPathTooLongForSockaddr() {
        let path = "/" + String(repeating: "a", count: 120)
        #expect(throws: AddressError.self) { try SocketAddress(parsing: "unix:" + path) }
    }

    @Test(arguments: ["vsock://host:5000", "vsock://any:1", "vsock://7:1", "unix:/a/b", "tcp://127.0.0.1:1", "tcp://[::1]:2"])
    func roundTripsThroughItsDescription(text: String) throws {
        let address = try SocketAddress(parsing: text)
        #expect(address.description == text)
        #expect(try SocketAddress(parsing: address.description) == address)
    }

    /// An address past 512 bytes is refused, however it would parse: a 60 KiB tcp host (or a
    /// CID padded with zeros) grew a handoff adopt's deposit past a frame, and the broker restarted.
    @Test func anAddressPast512BytesIsRefused() {
        #expect(throws: AddressError.self) { try SocketAddress(parsing: "tcp://" + String(repeating: "h", count: 600) + ":9") }
        #expect(throws: AddressError.self) { try SocketAddress(parsing: "vsock://" + String(repeating: "0", count: 600) + "2:9") }
        #expect((try? SocketAddress(parsing: "tcp://" + String(repeating: "h", count: 253) + ":9")) != nil)
    }
}

