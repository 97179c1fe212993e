import HoldfastCore
import HoldfastPosix

/// Writes every byte of `bytes` to a connection.
public func send(_ connection: AsyncFD, _ bytes: [UInt8]) async throws {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 1)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    try await connection.write(UnsafeRawBufferPointer(rebasing: buffer[..<bytes.count]))
}

/// Reads until end-of-file (bounded by `limit` bytes).
public func readAll(_ connection: some ByteReader, limit: Int = 1 << 30) async throws -> [UInt8] {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 1)
    defer { buffer.deallocate() }
    var result: [UInt8] = []
    while result.count < limit {
        let count = try await connection.read(into: buffer)
        if count == 0 { break }
        result += buffer[..<count]
    }
    return result
}

/// Reads `count` bytes, or fewer if the connection ends first.
public func readExactly(_ connection: some ByteReader, _ count: Int) async throws -> [UInt8] {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 1)
    defer { buffer.deallocate() }
    var result: [UInt8] = []
    while result.count < count {
        let got = try await connection.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<(count - result.count)]))
        if got == 0 { break }
        result += buffer[..<got]
    }
    return result
}
