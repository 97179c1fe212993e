import Crypto

/// SHA-256 as lowercase hex: tests compare byte streams by digest.
public func sha256Hex(_ bytes: some Sequence<UInt8>) -> String {
    SHA256.hash(data: Array(bytes)).map { byte in
        let hex = String(byte, radix: 16)
        return byte < 16 ? "0" + hex : hex
    }.joined()
}

/// An incremental SHA-256 for streams too large to hold.
public struct StreamDigest {
    private var hasher = SHA256()
    public private(set) var count: UInt64 = 0

    public init() {}

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        hasher.update(bufferPointer: bytes)
        count += UInt64(bytes.count)
    }

    public mutating func update(_ bytes: [UInt8]) {
        hasher.update(data: bytes)
        count += UInt64(bytes.count)
    }

    public func hex() -> String {
        hasher.finalize().map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}
