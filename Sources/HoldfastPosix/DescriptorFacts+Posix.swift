import CHoldfastShims
import HoldfastCore

#if canImport(Glibc)
import Glibc
#endif

extension DescriptorFacts {
    /// The facts of `fd`: its open flags, fstat, and for a socket SO_ACCEPTCONN and
    /// getpeername. None of these waits (no ioctl: TIOCGWINSZ would wait for a terminal's size
    /// lock, which its process can hold), and each is in the broker's seccomp allow-list.
    public static func of(_ fd: Int32) throws(SystemError) -> DescriptorFacts {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0 else { throw .last("fcntl(F_GETFL, fd \(fd))") }
        let access = flags & O_ACCMODE
        let readable = access == O_RDONLY || access == O_RDWR
        let writable = access == O_WRONLY || access == O_RDWR
        // O_PATH (not exported by Glibc's module): 010000000.
        if flags & 0o10000000 != 0 { return DescriptorFacts(type: .pathOnly, readable: false, writable: false) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .last("fstat(fd \(fd))") }
        var listening = false
        var connected = true
        var keepsMessages = false
        if info.st_mode & S_IFMT == S_IFSOCK {
            var value: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            listening = getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &value, &size) == 0 && value != 0
            var socketType: Int32 = 0
            size = socklen_t(MemoryLayout<Int32>.size)
            keepsMessages = getsockopt(fd, SOL_SOCKET, SO_TYPE, &socketType, &size) == 0 && socketType != Int32(SOCK_STREAM.rawValue)
            var address = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            connected = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) == 0 }
            } || errno != ENOTCONN
        }
        let type = fileType(of: info, socketListening: listening, socketConnected: connected)
        return DescriptorFacts(type: type, readable: readable, writable: writable, file: consumedFile(info, type: type), keepsMessages: keepsMessages)
    }

    /// The type of the file `info` describes (a socket's state as given).
    static func fileType(of info: stat, socketListening: Bool = false, socketConnected: Bool = true) -> FileType {
        // Linux's dev_t: major in bits 8-19 and 32-43, minor in bits 0-7 and 20-31.
        let device = UInt64(info.st_rdev)
        let major = UInt32(truncatingIfNeeded: ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff)))
        let minor = UInt32(truncatingIfNeeded: (device & 0xff) | ((device >> 12) & ~UInt64(0xff)))
        return fileType(
            mode: UInt32(info.st_mode), deviceMajor: major, deviceMinor: minor, socketListening: socketListening,
            socketConnected: socketConnected)
    }

    /// The file of `info` if a read takes its bytes away (a pipe, a socket, a pty master):
    /// what two streams must not both read (or both write).
    static func consumedFile(_ info: stat, type: FileType? = nil) -> FileIdentity? {
        switch type ?? fileType(of: info) {
        case .pipe, .socket, .ptyMaster: return FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
        default: return nil
        }
    }
}
