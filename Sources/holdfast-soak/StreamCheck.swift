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
        /// Up to 16 bytes from the first difference on, as received and as expected (a run of
        /// zeros, another stream's bytes or a repeat each look different here).
        var differenceGot: [UInt8] = []
        var differenceWanted: [UInt8] = []
        var ended = false
        /// Offsets the stream reported lost (a broker crash's GAP). A GAP over a read the crash
        /// interrupted names more offsets than bytes (how many that read took is unknown), so
        /// from the first one on, what arrives is kept and checked at the end against the end of
        /// the expected content: the bytes before the gap exact in place, the bytes after it
        /// exact in place from the end, and at most `lost` bytes missing between.
        var lost = 0
        var receivedBeforeGap: Int?
        var afterGap: [UInt8] = []
        let allPieces: [Piece]

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
        var differenceGot: [UInt8]
        var differenceWanted: [UInt8]
        var ended: Bool
        var lost: Int
        /// With a gap: the bytes after it matched the end of the expected content, and no more
        /// were missing than the gap's offsets.
        var afterGapMatched: Bool?
        /// Every byte arrived once, in order, except ones the reported gaps cover.
        var passed: Bool {
            if let afterGapMatched { return ended && afterGapMatched && firstDifference == nil }
            return ended && received == expected && receivedDigest == expectedDigest
        }
    }

    init(name: String, expected: [Piece]) {
        self.name = name
        state = NIOLockedValueBox(State(pieces: expected, allPieces: expected))
    }

    var receivedBytes: Int { state.withLockedValue { $0.received } }

    func feed(_ chunk: [UInt8]) {
        state.withLockedValue { s in
            s.receivedHash.update(data: chunk)
            if s.receivedBeforeGap != nil {
                s.afterGap += chunk
                s.received += chunk.count
                return
            }
            var offset = 0
            while offset < chunk.count {
                if s.position == s.current.count {
                    guard s.startNextPiece() else {
                        // More than expected.
                        if s.firstDifference == nil {
                            s.firstDifference = s.received + offset
                            s.differenceGot = Array(chunk[offset..<min(chunk.count, offset + 16)])
                        }
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
                        let shown = min(16, count - index)
                        s.differenceGot = Array(chunk[(offset + index)..<(offset + index + shown)])
                        s.differenceWanted = Array(s.current[(s.position + index)..<(s.position + index + shown)])
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
            if s.receivedBeforeGap == nil { s.receivedBeforeGap = s.received }
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
            var afterGapMatched: Bool?
            if let before = s.receivedBeforeGap {
                var all: [UInt8] = []
                for piece in s.allPieces { piece.render(into: &all) }
                let missing = all.count - before - s.afterGap.count
                afterGapMatched = missing >= 0 && missing <= s.lost && all[(all.count - s.afterGap.count)...].elementsEqual(s.afterGap)
                if afterGapMatched == false, s.firstDifference == nil { s.firstDifference = before }
            } else if s.firstDifference == nil, s.received < s.expectedRendered {
                s.firstDifference = s.received
            }
            return Result(
                name: name, received: s.received, expected: s.expectedRendered, receivedDigest: receivedDigest,
                expectedDigest: expectedDigest, firstDifference: s.firstDifference, differenceGot: s.differenceGot,
                differenceWanted: s.differenceWanted, ended: s.ended, lost: s.lost,
                afterGapMatched: afterGapMatched)
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

/// Bytes for a failure message: printable ASCII as it is, anything else as \xNN.
func escaped(_ bytes: [UInt8]) -> String {
    var out = ""
    for byte in bytes {
        if byte >= 0x20 && byte < 0x7F && byte != UInt8(ascii: "\\") {
            out.unicodeScalars.append(Unicode.Scalar(byte))
        } else {
            out += "\\x" + hex([byte])
        }
    }
    return "\"" + out + "\""
}
