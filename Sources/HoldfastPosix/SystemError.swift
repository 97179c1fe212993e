import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A failed syscall: which operation, on what, and the errno it returned.
public struct SystemError: Error, Sendable, Equatable, CustomStringConvertible {
    public var operation: String
    public var errno: Errno

    public init(_ operation: String, errno: Errno) {
        self.operation = operation
        self.errno = errno
    }

    /// Captures the calling thread's errno.
    public static func last(_ operation: String) -> SystemError {
        SystemError(operation, errno: Errno(rawValue: Glibc.errno))
    }

    public var description: String { "\(operation): \(errno) (errno \(errno.rawValue))" }

    /// The errno as a number (ENOENT, EACCES...), for callers that say what to check.
    public var number: Int32 { errno.rawValue }
}

/// The fd was closed (by its owner, or because the stream it belongs to ended) while an
/// operation was waiting on it.
public struct DescriptorClosed: Error, Sendable, CustomStringConvertible {
    public init() {}
    public var description: String { "descriptor closed" }
}

/// Runs a syscall, retrying on EINTR. Returns the result or throws with the operation's name.
@inline(__always)
func retryingInterrupts<T: BinaryInteger>(_ operation: @autoclosure () -> String, _ call: () -> T) throws(SystemError) -> T {
    while true {
        let result = call()
        if result >= 0 { return result }
        let error = Glibc.errno
        if error == EINTR { continue }
        throw SystemError(operation(), errno: Errno(rawValue: error))
    }
}
