import CHoldfastShims

#if canImport(Glibc)
import Glibc
#endif

/// Replacing this process's image while keeping its pid, its children and chosen fds: what a
/// live upgrade does (systemd's daemon-reexec). The fds to keep lose `FD_CLOEXEC` just before
/// the exec; every other fd this process opened is close-on-exec and goes.
public enum ProcessImage {
    /// stdout's stdio buffer flushed at each line, into a pipe too (`print` of a CLI whose
    /// lines a script reads as they come).
    public static func lineBufferStandardOutput() { hf_line_buffer_stdout() }

    /// Execs the file open at `executable` (`fexecve`: the very file that was checked, not
    /// whatever its path names by now) with `arguments` and this process's environment, keeping
    /// `keep` open and `blocked` blocked (a SIGTERM arriving before the new image has handlers
    /// waits, pending, instead of killing it with the default action). Returns only if the exec
    /// failed, with every flag and the signal mask as they were.
    ///
    /// The exec is made on the spawn thread (`SpawnThread`: the main thread in `holdfast`), the
    /// parent and tracer of every child. An exec from another thread ends that one with the rest,
    /// and the kernel lets go of its tracees with their pending signal unchanged: a process that
    /// had made the supervisor its tracer and stopped just then (the reaper is frozen during an
    /// upgrade) would get the exec's SIGTRAP, which kills it. Made there, the thread goes on as
    /// the new image's main thread, tracer of the same tracees, and the new reaper lets them go.
    public static func replace(executable: Int32, arguments: [String], keep: [Int32], blocked: [Int32]) -> SystemError {
        SpawnThread.perform { replaceHere(executable: executable, arguments: arguments, keep: keep, blocked: blocked) }
    }

    private static func replaceHere(executable: Int32, arguments: [String], keep: [Int32], blocked: [Int32]) -> SystemError {
        let previous = keep.map { fcntl($0, F_GETFD) }
        for fd in keep { _ = fcntl(fd, F_SETFD, 0) }
        var mask = sigset_t()
        var old = sigset_t()
        sigemptyset(&mask)
        for signal in blocked { sigaddset(&mask, signal) }
        pthread_sigmask(SIG_BLOCK, &mask, &old)
        var pointers: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) }
        pointers.append(nil)
        fexecve(executable, &pointers, environ)
        let error = SystemError.last("fexecve")
        for pointer in pointers { free(pointer) }
        pthread_sigmask(SIG_SETMASK, &old, nil)
        for (fd, flags) in zip(keep, previous) where flags >= 0 { _ = fcntl(fd, F_SETFD, flags) }
        return error
    }

    /// Until `keepCrashesFatal`, a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGFPE,
    /// SIGABRT, SIGSYS) makes this process execute `executable` (an fd) with `arguments`, the
    /// fds in `keep` passed and `blocked` blocked, after writing why into `reasonFD`: what
    /// `replace` does, from a signal handler (everything it needs is copied now; it calls only
    /// what is safe there). If that exec fails, the process dies of the signal as before.
    public static func replaceOnCrash(executable: Int32, arguments: [String], keep: [Int32], reasonFD: Int32, blocked: [Int32]) throws(SystemError) {
        let argv = arguments.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        let result = argv.withUnsafeBufferPointer { argvBuffer in
            keep.withUnsafeBufferPointer { keepBuffer in
                blocked.withUnsafeBufferPointer { blockedBuffer in
                    hf_fallback_arm(
                        executable, argvBuffer.baseAddress, keepBuffer.baseAddress, Int32(keep.count), reasonFD, blockedBuffer.baseAddress,
                        Int32(blocked.count))
                }
            }
        }
        guard result == 0 else { throw .last("sigaction") }
    }

    /// Puts back the handlers `replaceOnCrash` replaced.
    public static func keepCrashesFatal() {
        hf_fallback_disarm()
    }

    /// Blocks `signals` in the calling thread: on the thread that takes the process's signals,
    /// they stay pending (across an exec too) until unblocked.
    public static func block(_ signals: [Int32]) {
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in signals { sigaddset(&mask, signal) }
        pthread_sigmask(SIG_BLOCK, &mask, nil)
    }

    /// Unblocks `signals` in the calling thread (the new image, once its handlers are in place).
    public static func unblock(_ signals: [Int32]) {
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in signals { sigaddset(&mask, signal) }
        pthread_sigmask(SIG_UNBLOCK, &mask, nil)
    }

    /// Unblocks every signal but `kept` (left as they are) in the calling thread: the main
    /// thread, which takes the process's signals (the concurrency pool's threads block them, but
    /// for the first, which it starts with its own mask). Its mask is whatever the thread that
    /// started or exec'd this image had: after a live upgrade, the previous image's main thread,
    /// with `replace`'s `blocked` added.
    public static func unblockAll(except kept: [Int32]) {
        var mask = sigset_t()
        sigfillset(&mask)
        for signal in kept { sigdelset(&mask, signal) }
        pthread_sigmask(SIG_UNBLOCK, &mask, nil)
    }

    /// Opens /dev/null onto whichever of fds 0, 1 and 2 the process was started without (an
    /// init that starts the daemon with its stdio closed). Left closed, the first file the
    /// daemon opened took that number: with fd 2 the checkpoint area, every log line was written
    /// over the streams' checkpoints; with fd 1 or 0, a socket or a pipe end got bytes it was
    /// never meant to. Returns the fds it opened.
    @discardableResult
    public static func fillClosedStandardDescriptors() -> [Int32] {
        var filled: [Int32] = []
        for fd: Int32 in 0...2 where fcntl(fd, F_GETFD) == -1 && errno == EBADF {
            // The lowest free number: this one, as 0...fd-1 are open by now.
            let opened = open("/dev/null", O_RDWR)
            if opened == fd {
                filled.append(fd)
            } else if opened >= 0 {
                close(opened)
            }
        }
        return filled
    }

    /// Marks inherited fds close-on-exec again: nothing the new image starts gets them.
    public static func closeOnExec(_ fds: [Int32]) {
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    }

    /// Closes every fd from 3 up that is not close-on-exec and not in `keep`: what an earlier
    /// image left open by mistake must not pile up over upgrades. Returns the fds closed.
    @discardableResult
    public static func closeStrayDescriptors(keeping keep: Set<Int32>) -> [Int32] {
        guard let directory = opendir("/proc/self/fd") else { return [] }
        var found: [Int32] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let fd = Int32(name), fd > 2 { found.append(fd) }
        }
        let own = dirfd(directory)
        closedir(directory)
        var closed: [Int32] = []
        for fd in found where fd != own && !keep.contains(fd) {
            let flags = fcntl(fd, F_GETFD)
            guard flags >= 0, flags & FD_CLOEXEC == 0 else { continue }
            close(fd)
            closed.append(fd)
        }
        return closed
    }

    /// A new memfd holding `bytes` (close-on-exec until handed over), its offset at 0.
    public static func memoryFile(_ name: String, _ bytes: [UInt8]) throws(SystemError) -> Int32 {
        let fd = hf_memfd_create(name)
        guard fd >= 0 else { throw .last("memfd_create(\(name))") }
        var offset = 0
        while offset < bytes.count {
            let count = bytes[offset...].withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else {
                let error = SystemError.last("write(memfd)")
                close(fd)
                throw error
            }
            offset += count
        }
        return fd
    }

    /// Everything in the file open at `fd`, read from offset 0 (at most `limit` bytes).
    public static func readAll(_ fd: Int32, limit: Int = 1 << 30) throws(SystemError) -> [UInt8] {
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while result.count < limit {
            let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(result.count)) }
            if count < 0 {
                if errno == EINTR { continue }
                throw .last("read(\(fd))")
            }
            if count == 0 { break }
            result += buffer[..<count]
        }
        return result
    }

    /// The path this process's executable was started from (`/proc/self/exe`), without the
    /// kernel's " (deleted)" suffix once a package upgrade replaced the file.
    public static func executablePath() -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else { return nil }
        var path = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if path.hasSuffix(" (deleted)") { path.removeLast(" (deleted)".count) }
        return path
    }
}
