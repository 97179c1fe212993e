import Crypto
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Checks one stream as it arrives: each chunk against the expected content (keeping the offset
/// of the first difference, for diagnosis), and at the end the SHA-256 of every byte that
/// arrived against the SHA-256 of the content the process should have produced.
final class StreamCheck: Sendable {
    let name: String
    private let state: NIOLockedValueBox<State>

    private struct State: @unchecked Sendable {  // only touched under the lock
        var pieces: [Piece]
        var nextPiece = 0
        var current: [UInt8] = []
        var position = 0
        var expectedHash = SHA256()
        var receivedHash = SHA256()
        var expectedRendered = 0
        var received = 0
        var firstDifference: Int?
        var ended = false
    }

    struct Result: Sendable {
        var name: String
        var received: Int
        var expected: Int
        var receivedDigest: String
        var expectedDigest: String
        var firstDifference: Int?
        var ended: Bool
        var passed: Bool { ended && received == expected && receivedDigest == expectedDigest }
    }

    init(name: String, expected: [Piece]) {
        self.name = name
        state = NIOLockedValueBox(State(pieces: expected))
    }

    var receivedBytes: Int { state.withLockedValue { $0.received } }

    func feed(_ chunk: [UInt8]) {
        state.withLockedValue { s in
            s.receivedHash.update(data: chunk)
            var offset = 0
            while offset < chunk.count {
                if s.position == s.current.count {
                    guard s.nextPiece < s.pieces.count else {
                        // More than expected.
                        if s.firstDifference == nil { s.firstDifference = s.received + offset }
                        break
                    }
                    var rendered: [UInt8] = []
                    s.pieces[s.nextPiece].render(into: &rendered)
                    s.nextPiece += 1
                    s.expectedHash.update(data: rendered)
                    s.expectedRendered += rendered.count
                    s.current = rendered
                    s.position = 0
                    continue
                }
                let count = min(chunk.count - offset, s.current.count - s.position)
                if s.firstDifference == nil {
                    let equal = chunk.withUnsafeBytes { got in
                        s.current.withUnsafeBytes { want in
                            memcmp(got.baseAddress! + offset, want.baseAddress! + s.position, count) == 0
                        }
                    }
                    if !equal {
                        var index = 0
                        while chunk[offset + index] == s.current[s.position + index] { index += 1 }
                        s.firstDifference = s.received + offset + index
                    }
                }
                offset += count
                s.position += count
            }
            s.received += chunk.count
        }
    }

    func ended() {
        state.withLockedValue { $0.ended = true }
    }

    /// Renders whatever expected content was not reached, and compares.
    func result() -> Result {
        state.withLockedValue { s in
            while s.nextPiece < s.pieces.count {
                var rendered: [UInt8] = []
                s.pieces[s.nextPiece].render(into: &rendered)
                s.nextPiece += 1
                s.expectedHash.update(data: rendered)
                s.expectedRendered += rendered.count
            }
            s.current = []
            s.pieces = []
            let expectedDigest = hex(s.expectedHash.finalize())
            let receivedDigest = hex(s.receivedHash.finalize())
            if s.firstDifference == nil, s.received < s.expectedRendered { s.firstDifference = s.received }
            return Result(
                name: name, received: s.received, expected: s.expectedRendered, receivedDigest: receivedDigest,
                expectedDigest: expectedDigest, firstDifference: s.firstDifference, ended: s.ended)
        }
    }
}

func hex(_ digest: some Sequence<UInt8>) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    for byte in digest {
        out.append(digits[Int(byte >> 4)])
        out.append(digits[Int(byte & 0xF)])
    }
    return String(decoding: out, as: UTF8.self)
}
