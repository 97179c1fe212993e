import Testing

@testable import HoldfastProtocol

@Suite("Stream frames", .timeLimit(.minutes(5)))
struct StreamFrameTests {
    @Test func prefixRoundTrips() throws {
        for type in StreamFrameType.allCases {
            let length = type == .data ? 65536 : (type == .ack || type == .end || type == .gap ? 0 : 10)
            let prefix = StreamFramePrefix(type: type, bodyLength: length, value: 0x0102_0304_0506_0708)
            let decoded = try prefix.encoded.withUnsafeBytes { try StreamFramePrefix.decode($0) }
            #expect(decoded == prefix)
        }
    }

    @Test func prefixIsBigEndianWithFixedLayout() {
        let bytes = StreamFramePrefix(type: .ack, bodyLength: 0, value: 258).encoded
        #expect(bytes == [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    }

    @Test(arguments: [
        ([UInt8](repeating: 0, count: 16), "unknown frame type 0"),
        ([9] + [UInt8](repeating: 0, count: 15), "unknown frame type 9"),
        ([2, 1] + [UInt8](repeating: 0, count: 14), "flags"),
        ([3, 0, 0, 0, 0, 0, 0, 8] + [UInt8](repeating: 0, count: 8), "exceeds the limit of 0"),
        ([2, 0, 0, 0, 0, 0x20, 0, 0] + [UInt8](repeating: 0, count: 8), "exceeds the limit"),
        ([2, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 8), "empty data frame"),
        ([1, 0, 0, 0, 0, 0, 4, 0] + [UInt8](repeating: 0, count: 8), "exceeds the limit of 512"),
    ])
    func rejectsBadPrefixes(bytes: [UInt8], mentions: String) {
        #expect {
            try bytes.withUnsafeBytes { try StreamFramePrefix.decode($0) }
        } throws: { error in
            (error as? StreamProtocolError)?.description.contains(mentions) == true
        }
    }

    @Test func rejectsATruncatedPrefix() {
        #expect(throws: StreamProtocolError.truncated) {
            try [UInt8](repeating: 3, count: 15).withUnsafeBytes { try StreamFramePrefix.decode($0) }
        }
    }

    @Test func helloRoundTrips() throws {
        let hello = StreamHello(role: .guest, token: Array("c0ffee-stdout".utf8), receivedOffset: 1 << 40, attempt: 0xDEAD_BEEF_0102)
        let bytes = hello.encoded
        let prefix = try bytes.withUnsafeBytes { try StreamFramePrefix.decode($0) }
        #expect(prefix.value == 1 << 40)
        #expect(try StreamHello.decode(prefix: prefix, body: Array(bytes[16...])) == hello)
    }

    @Test func helloRejectsGarbage() throws {
        let prefix = StreamFramePrefix(type: .hello, bodyLength: 12, value: 0)
        #expect(throws: StreamProtocolError.self) {
            try StreamHello.decode(prefix: prefix, body: Array("GET / HTTP/1".utf8))
        }
        var wrongVersion = StreamHello(role: .host, token: [1], receivedOffset: 0).encoded
        wrongVersion[16 + 5] = 9
        let wrongPrefix = try wrongVersion.withUnsafeBytes { try StreamFramePrefix.decode($0) }
        #expect(throws: StreamProtocolError.unsupportedVersion(9)) {
            try StreamHello.decode(prefix: wrongPrefix, body: Array(wrongVersion[16...]))
        }
        var badLength = StreamHello(role: .host, token: [1, 2, 3], receivedOffset: 0).encoded
        badLength[16 + 17] = 200
        let badPrefix = try badLength.withUnsafeBytes { try StreamFramePrefix.decode($0) }
        #expect(throws: StreamProtocolError.self) {
            try StreamHello.decode(prefix: badPrefix, body: Array(badLength[16...]))
        }
    }

    @Test func refusalCarriesCodeAndMessage() throws {
        let refusal = StreamRefusal(code: .unknownToken, message: "no stream 'x'")
        let bytes = refusal.encoded
        let prefix = try bytes.withUnsafeBytes { try StreamFramePrefix.decode($0) }
        #expect(StreamRefusal.decode(prefix: prefix, body: Array(bytes[16...])) == refusal)
    }
}
