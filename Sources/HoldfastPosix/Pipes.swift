import CHoldfastShims
import HoldfastCore

#if canImport(Glibc)
import Glibc
#endif

/// The two ends of a pipe, both close-on-exec (a child gets its end through dup2, nothing else).
public struct PipeEnds: Sendable {
    public var read: Int32
    public var write: Int32

    /// Creates a pipe. `capacity` asks the kernel for a bigger buffer (F_SETPIPE_SZ): fewer
    /// wake-ups per MiB. A refusal (over /proc/sys/fs/pipe-max-size) leaves the default.
    public static func make(capacity: Int? = nil) throws(SystemError) -> PipeEnds {
        var fds: [Int32] = [-1, -1]
        _ = try retryingInterrupts("pipe2") { hf_pipe_cloexec(&fds) }
        if let capacity { setCapacity(of: fds[0], to: capacity) }
        return PipeEnds(read: fds[0], write: fds[1])
    }

    /// F_SETPIPE_SZ on either end of an existing pipe; returns the capacity now in effect, or nil
    /// if the fd is not a pipe or the request was refused.
    @discardableResult
    public static func setCapacity(of fd: Int32, to capacity: Int) -> Int? {
        let result = hf_pipe_size(fd, Int32(capacity))
        return result > 0 ? Int(result) : nil
    }
}

/// A pseudo-terminal pair: the master stays with Holdfast, the slave becomes a process's
/// controlling terminal.
public struct PseudoTerminal: Sendable {
    public var master: Int32
    public var slave: Int32
    public var slavePath: String

    public static func open(size: WindowSize? = nil) throws(SystemError) -> PseudoTerminal {
        var master: Int32 = -1
        var slave: Int32 = -1
        var name = [CChar](repeating: 0, count: 128)
        var step: UnsafePointer<CChar>?
        guard hf_open_pty(&master, &slave, &name, name.count, &step) == 0 else {
            throw .last(step.map { String(cString: $0) } ?? "open pty")
        }
        let path = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let terminal = PseudoTerminal(master: master, slave: slave, slavePath: path)
        if let size {
            do {
                try terminal.resize(size)
            } catch {
                _ = Glibc.close(master)
                _ = Glibc.close(slave)
                throw error
            }
        }
        return terminal
    }

    public func resize(_ size: WindowSize) throws(SystemError) {
        try Terminal.resize(fd: master, to: size)
    }

    /// Opens the slave end anew from `master` (TIOCGPTPEER: no path, so also a master runc
    /// handed over). Held, it keeps the master from reading EIO — "no slave end open" — while
    /// the process has closed its own, meaning to open its terminal again (`exec >/dev/tty`,
    /// an init system that opens the console when it has something to say, getty): a relay
    /// takes that EIO for the end of the stream, and what came after was lost. Nil where the
    /// kernel cannot (before 4.13): then the relay ends there, as before.
    public static func openPeer(ofMaster master: Int32) -> Int32? {
        let fd = hf_open_pty_peer(master)
        return fd >= 0 ? fd : nil
    }
}

public enum Terminal {
    /// TIOCSWINSZ: the process on the slave side gets SIGWINCH.
    public static func resize(fd: Int32, to size: WindowSize) throws(SystemError) {
        guard hf_set_window_size(fd, size.rows, size.columns) == 0 else { throw .last("ioctl(TIOCSWINSZ, fd \(fd))") }
    }

    public static func size(of fd: Int32) throws(SystemError) -> WindowSize {
        var rows: UInt16 = 0
        var columns: UInt16 = 0
        guard hf_get_window_size(fd, &rows, &columns) == 0 else { throw .last("ioctl(TIOCGWINSZ, fd \(fd))") }
        return WindowSize(rows: rows, columns: columns)
    }
}

extension Terminal {
    /// cfmakeraw on a terminal: no echo, no line editing, no output processing — bytes pass
    /// unchanged (what `stty raw -echo` does).
    public static func makeRaw(fd: Int32) throws(SystemError) {
        var settings = termios()
        guard tcgetattr(fd, &settings) == 0 else { throw .last("tcgetattr(fd \(fd))") }
        cfmakeraw(&settings)
        guard tcsetattr(fd, TCSANOW, &settings) == 0 else { throw .last("tcsetattr(fd \(fd))") }
    }
}
