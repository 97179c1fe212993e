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
        /// Bytes the stream reported lost (a broker crash's GAP): skipped in the expected content.
        var lost = 0

        /// The next expected piece becomes `current` (false: there is none). Expected bytes are
        /// hashed as they are consumed, so skipped ones never are.
        mutating func startNextPiece() -> Bool {
            guard nextPiece < pieces.count else { return false }
            var rendered: [UInt8] = []
            pieces[nextPiece].render(into: &rendered)
            nextPiece += 1
            expectedRendered += rendered.count
            current = rendered
            position = 0
            return true
        }
    }

    struct Result: Sendable {
        var name: String
        var received: Int
        var expected: Int
        var receivedDigest: String
        var expectedDigest: String
        var firstDifference: Int?
        var ended: Bool
        var lost: Int
        /// Every byte arrived once, in order, except exactly the ones reported lost.
        var passed: Bool { ended && received + lost == expected && receivedDigest == expectedDigest }
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
                    guard s.startNextPiece() else {
                        // More than expected.
                        if s.firstDifference == nil { s.firstDifference = s.received + offset }
                        break
                    }
                    continue
                }
                let count = min(chunk.count - offset, s.current.count - s.position)
                s.expectedHash.update(data: s.current[s.position..<s.position + count])
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

    /// The stream reported `count` bytes lost here, before the next chunk: the expected content
    /// skips them (unhashed), so every other byte must still match, in place.
    func skip(_ count: Int) {
        state.withLockedValue { s in
            var left = count
            while left > 0 {
                if s.position == s.current.count {
                    guard s.startNextPiece() else { break }
                    continue
                }
                let take = min(left, s.current.count - s.position)
                s.position += take
                left -= take
            }
            s.lost += count
        }
    }

    func ended() {
        state.withLockedValue { $0.ended = true }
    }

    /// Renders whatever expected content was not reached, and compares.
    func result() -> Result {
        state.withLockedValue { s in
            s.expectedHash.update(data: s.current[s.position...])
            while s.startNextPiece() { s.expectedHash.update(data: s.current) }
            s.current = []
            s.position = 0
            s.pieces = []
            s.nextPiece = 0
            let expectedDigest = hex(s.expectedHash.finalize())
            let receivedDigest = hex(s.receivedHash.finalize())
            if s.firstDifference == nil, s.received + s.lost < s.expectedRendered { s.firstDifference = s.received }
            return Result(
                name: name, received: s.received, expected: s.expectedRendered, receivedDigest: receivedDigest,
                expectedDigest: expectedDigest, firstDifference: s.firstDifference, ended: s.ended, lost: s.lost)
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
