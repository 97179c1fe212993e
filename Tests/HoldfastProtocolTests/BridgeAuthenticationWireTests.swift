import HoldfastProtocol
import Testing

@Suite("Bridge authentication: the key's file format and the handshake's messages", .timeLimit(.minutes(5)))
struct BridgeAuthenticationWireTests {
    let hex64 = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

    @Test func aKeyFileIsHexDigitsWithOptionalSurroundingWhitespace() throws {
        let expected = Array(UInt8(0)..<32)
        #expect(try BridgeKey(fileContents: Array(hex64.utf8)).bytes == expected)
        #expect(try BridgeKey(fileContents: Array((hex64 + "\n").utf8)).bytes == expected, "echo's newline")
        #expect(try BridgeKey(fileContents: Array((" \t" + hex64.uppercased() + "\r\n").utf8)).bytes == expected)
        let long = String(repeating: "ab", count: 128)
        #expect(try BridgeKey(fileContents: Array(long.utf8)).bytes.count == 128)
    }

    @Test func aKeyFileThatIsNotExactlyThatIsRefusedWithoutShowingIt() {
        let cases: [(String, BridgeKeyFormatError)] = [
            ("", .empty),
            ("\n\n", .empty),
            (String(hex64.dropLast()), .oddDigitCount(63)),
            (String(hex64.prefix(62)), .tooShort(bytes: 31)),
            (String(repeating: "ab", count: 129), .tooLong(bytes: 129)),
            (hex64.prefix(10) + " " + hex64.dropFirst(10), .notHex(offset: 10)),
            ("0x" + hex64, .notHex(offset: 1)),
        ]
        for (text, expected) in cases {
            #expect(throws: expected) { try BridgeKey(fileContents: Array(text.utf8)) }
        }
        // 32 raw random bytes: refused, not taken for hex or guessed at.
        let raw: [UInt8] = [0xC3, 0x28, 0xA0, 0xA1] + Array(repeating: 0x99, count: 28)
        #expect(throws: BridgeKeyFormatError.notHex(offset: 0)) { try BridgeKey(fileContents: raw) }
        // The reasons never quote the file.
        let secret = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedZ"
        do {
            _ = try BridgeKey(fileContents: Array(secret.utf8))
            Issue.record("accepted a key with a stray character")
        } catch {
            #expect(!error.description.contains("f00dfeed"), "\(error)")
            #expect(error.description.contains("hex digit"))
        }
    }

    @Test func aKeyNeverDescribesItsBytes() throws {
        let key = try BridgeKey(fileContents: Array(String(repeating: "ab", count: 32).utf8))  // every byte 171
        #expect("\(key)" == "bridge key (32 bytes)")
        #expect("\(String(reflecting: key))" == "bridge key (32 bytes)")
        var dumped = ""
        dump(key, to: &dumped)
        #expect(!dumped.contains("171") && !dumped.contains("ab"), "\(dumped)")
    }

    @Test func generatedKeysRoundTripThroughTheirFileForm() throws {
        let key = BridgeKey.generate()
        #expect(key.bytes.count == 32)
        #expect(key.fileContents.count == 65 && key.fileContents.last == 0x0A)
        #expect(try BridgeKey(fileContents: key.fileContents) == key)
        #expect(BridgeKey.generate() != key)
    }

    @Test func theHandshakeMessagesAreByteForByteAsDocumented() throws {
        let nonce = Array(UInt8(0x20)..<0x40)
        let challenge = BridgeHandshakeWire.Challenge(guestNonce: nonce).encoded
        #expect(challenge.count == 40)
        #expect(Array(challenge.prefix(8)) == [0x48, 0x46, 0x42, 0x41, 1, 1, 0, 0])
        #expect(try BridgeHandshakeWire.Challenge.decode(challenge).guestNonce == nonce)

        let proof = Array(UInt8(0x60)..<0x80)
        let answer = BridgeHandshakeWire.Answer(hostNonce: nonce, hostProof: proof).encoded
        #expect(answer.count == 72 && Array(answer.prefix(8)) == [0x48, 0x46, 0x42, 0x41, 1, 1, 0, 0])
        #expect(try BridgeHandshakeWire.Answer.decode(answer) == BridgeHandshakeWire.Answer(hostNonce: nonce, hostProof: proof))

        #expect(BridgeHandshakeWire.Verdict.accepted.encoded == [0x48, 0x46, 0x42, 0x41, 1, 0, 0, 0])
        #expect(BridgeHandshakeWire.Verdict.refused.encoded == [0x48, 0x46, 0x42, 0x41, 1, 1, 0, 0])
        #expect(throws: BridgeHandshakeWire.Malformed.unknownVerdict(7)) {
            try BridgeHandshakeWire.Verdict.decode([0x48, 0x46, 0x42, 0x41, 1, 7, 0, 0])
        }
        #expect(throws: BridgeHandshakeWire.Malformed.notAHandshake) {
            try BridgeHandshakeWire.Verdict.decode([0, 0, 0, 0, 1, 0, 0, 0])
        }
    }
}
