import HoldfastPosix
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A guest process's flood: a thread that dials a Unix socket as fast as the server takes its
/// connections and holds the newest `hold` of them, until stopped or `seconds` have passed
/// (bounded by itself: a backstop, well past the test's own bounds; a test ends its flood with
/// `stop()`, so the flood's end never races what the test waits for).
final class Flooder: @unchecked Sendable {
    private var thread = pthread_t()
    private let path: String
    private let hold: Int
    private let seconds: Int
    private let ahead: Int
    private let dealtWith: @Sendable () -> Int
    private let stopped = NIOLockedValueBox(false)
    private let made = NIOLockedValueBox(0)
    private var joined = false

    /// `dealtWith`: how many of its connections the server is done with; the flood stays at
    /// most `ahead` connections ahead of that.
    init(path: String, hold: Int, ahead: Int, seconds: Int, dealtWith: @escaping @Sendable () -> Int) {
        self.path = path
        self.ahead = ahead
        self.dealtWith = dealtWith
        self.hold = hold
        self.seconds = seconds
        let box = Unmanaged.passRetained(self)
        let created = pthread_create(&thread, nil, { argument in
            let flooder = Unmanaged<Flooder>.fromOpaque(argument!).takeRetainedValue()
            flooder.run()
            return nil
        }, box.toOpaque())
        if created != 0 {
            // No thread, no flood: nothing to join (the test then finds no flood under way).
            box.release()
            joined = true
        }
    }

    private func run() {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
        }
        var held: [Int32] = []
        var next = 0
        var count = 0
        let end = ContinuousClock.now + .seconds(seconds)
        while !stopped.withLockedValue({ $0 }) && ContinuousClock.now < end {
            if count - dealtWith() >= ahead {
                usleep(100)
                continue
            }
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { continue }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard connected == 0 else {
                close(fd)
                continue
            }
            count += 1
            if held.count < hold {
                held.append(fd)
            } else {
                close(held[next])
                held[next] = fd
                next = (next + 1) % hold
            }
        }
        for fd in held { close(fd) }
        made.withLockedValue { $0 = count }
    }

    /// Stops the flood and waits for its thread; how many connections it made.
    @discardableResult
    func stop() -> Int {
        stopped.withLockedValue { $0 = true }
        if !joined {
            joined = true
            pthread_join(thread, nil)
        }
        return made.withLockedValue { $0 }
    }
}

/// Connects to the Unix socket at `path` and sends `first` with no suspension between the two
/// (blocking calls, then the socket is handed to the reactor): the daemon's connection says its
/// first message as it connects, which a test task's `await` between them would not, on a
/// loaded machine, for as long as it waits to run again.
func connectSending(_ path: String, _ first: [UInt8]) throws -> AsyncFD {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw SystemError.last("socket") }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
    }
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard connected == 0, first.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == first.count else {
        let error = SystemError.last("connect and send to \(path)")
        close(fd)
        throw error
    }
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    return try AsyncFD(adopting: fd, reactor: .shared)
}

/// `connectSending`, dialled again (up to `attempts` times) when the server closed the connection
/// before `first` could even be written (EPIPE, ECONNRESET): the thread waited to run between its
/// connect and its write (a loaded machine), the server accepted the connection with nothing on
/// it and pushed it out under the flood, as it may any silent connection — the daemon's worker
/// redials then. A connection whose first message was written is never dialled again here: one
/// pushed out after that fails the caller's handshake, which is what the flood tests look for.
/// Returns the connection and how many dials it took.
func connectSendingRedialling(_ path: String, _ first: [UInt8], attempts: Int = 5) throws -> (AsyncFD, dials: Int) {
    var dials = 0
    while true {
        dials += 1
        do {
            return (try connectSending(path, first), dials)
        } catch let error as SystemError where dials < attempts && (error.errno == .brokenPipe || error.errno == .connectionReset) {
            print("pushed out before its first message was written (\(error)): dialling again")
        }
    }
}
