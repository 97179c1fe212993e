import HoldfastPosix
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A plain lock for the tools' small bits of shared state.
final class NIOLockedBox: Sendable {
    private let lock = NIOLock()
    func with<T>(_ body: () throws -> T) rethrows -> T { try lock.withLock(body) }
}

func makeTemporaryDirectory(_ prefix: String = "holdfast") throws -> String {
    let base = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
    var template = Array("\(base)/\(prefix).XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
    guard made else { throw SystemError.last("mkdtemp") }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
