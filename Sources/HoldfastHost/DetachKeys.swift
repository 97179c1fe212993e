/// The key sequence that detaches a `host run`/`exec`/`attach` client from its process (the
/// process runs on; `host attach ID` takes it up again), in docker's and podman's notation: keys
/// separated by commas, each a single character or `ctrl-X` (X one of a-z, @, [, \, ], ^, _).
/// Default `ctrl-p,ctrl-q`; an empty string turns detaching off.
public struct DetachKeys: Sendable, Equatable, CustomStringConvertible {
    public let bytes: [UInt8]
    public let description: String

    public static let defaultNotation = "ctrl-p,ctrl-q"
    public static let `default` = try! DetachKeys(parsing: defaultNotation)

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    public init(parsing notation: String) throws(Invalid) {
        description = notation
        guard !notation.isEmpty else {
            bytes = []
            return
        }
        var bytes: [UInt8] = []
        for key in notation.split(separator: ",", omittingEmptySubsequences: false) {
            let lowered = key.lowercased()
            if lowered.hasPrefix("ctrl-"), key.count == 6 {
                let character = Array(lowered.utf8)[5]
                switch character {
                case UInt8(ascii: "a")...UInt8(ascii: "z"): bytes.append(character - UInt8(ascii: "a") + 1)
                case UInt8(ascii: "@"): bytes.append(0)
                case UInt8(ascii: "["), UInt8(ascii: "\\"), UInt8(ascii: "]"), UInt8(ascii: "^"), UInt8(ascii: "_"):
                    bytes.append(character - UInt8(ascii: "@"))
                default:
                    throw Invalid(description: "'\(key)': ctrl- takes a letter or one of @ [ \\ ] ^ _")
                }
            } else if key.utf8.count == 1, let byte = key.utf8.first, byte >= 0x20, byte < 0x7F {
                bytes.append(byte)
            } else {
                throw Invalid(description: "'\(key)': a key is one printable character or ctrl-X (e.g. ctrl-p,ctrl-q)")
            }
        }
        self.bytes = bytes
    }
}

/// Watches a client's keyboard input for the detach keys. Bytes that could begin the sequence
/// are held back until the next key shows whether it completes; a sequence that does not
/// complete is passed on whole, so nothing typed is lost or reordered.
public struct DetachKeyMatcher: Sendable {
    public let keys: [UInt8]
    /// How many of `keys` the input has matched so far (held back).
    private var matched = 0

    public init(_ keys: DetachKeys) {
        self.keys = keys.bytes
    }

    /// The bytes to send on for `input`, and whether the sequence completed (then whatever came
    /// after it in `input` is dropped: the client is leaving).
    public mutating func feed(_ input: some Collection<UInt8>) -> (forward: [UInt8], detach: Bool) {
        guard !keys.isEmpty else { return (Array(input), false) }
        var forward: [UInt8] = []
        var pending = Array(input)[...]
        while let byte = pending.popFirst() {
            if byte == keys[matched] {
                matched += 1
                if matched == keys.count { return (forward, true) }
                continue
            }
            guard matched > 0 else {
                forward.append(byte)
                continue
            }
            // The held bytes were not the sequence after all: the first goes on, and the rest
            // (with this byte) are looked at again, as they may begin the sequence themselves.
            let held = keys[..<matched]
            matched = 0
            forward.append(held.first!)
            pending = (Array(held.dropFirst()) + [byte] + Array(pending))[...]
        }
        return (forward, false)
    }
}
