import HoldfastCore
import HoldfastProtocol
import Testing

/// `Handshake.hello(atStartOf:)`: what a server makes of the bytes it peeked at as it accepted a
/// connection (whatever a guest process sent: nothing is trusted).
@Suite("A hello peeked at as the connection is accepted")
struct PeekedHelloTests {
    static let hello = StreamAuthentication.sign(
        StreamHello(role: .guest, token: Array("real".utf8), receivedOffset: 7, attempt: 3, nonce: StreamAuthentication.nonce()),
        secret: .random())

    @Test func aWholeHelloIsReadAndWhatFollowsItIgnored() {
        let encoded = Self.hello.encoded
        #expect(Handshake.hello(atStartOf: encoded) == Self.hello)
        #expect(Handshake.hello(atStartOf: encoded + [1, 2, 3]) == Self.hello, "data sent right after it")
    }

    @Test func anyPartOfAHelloIsNotYetOne() {
        let encoded = Self.hello.encoded
        for length in 0..<encoded.count {
            #expect(Handshake.hello(atStartOf: Array(encoded.prefix(length))) == nil, "\(length) bytes")
        }
    }

    @Test func garbageAndOtherFramesAreNotHellos() {
        #expect(Handshake.hello(atStartOf: [UInt8](repeating: 0xFF, count: 600)) == nil)
        #expect(Handshake.hello(atStartOf: [UInt8](repeating: 0, count: 600)) == nil)
        var wrongMagic = Self.hello.encoded
        wrongMagic[StreamFramePrefix.size] ^= 0x01
        #expect(Handshake.hello(atStartOf: wrongMagic) == nil)
        #expect(Handshake.hello(atStartOf: StreamProtocolError.wrongToken.refusal.encoded) == nil, "an ERROR frame")
    }
}
