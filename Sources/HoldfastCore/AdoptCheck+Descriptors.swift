import HoldfastProtocol

/// What the broker learns of a fd a runtime hands over, before it relays a stream on it: the
/// kind of file (fstat), whether it is open for reading and for writing (its open flags), and
/// a socket's state. Gathered by `DescriptorFacts.of` (HoldfastPosix) with calls that never wait.
public struct DescriptorFacts: Sendable, Equatable {
    public enum FileType: Sendable, Equatable {
        case pipe
        case socket(listening: Bool, connected: Bool)
        /// A terminal's master end (/dev/ptmx, character device 5:2).
        case ptyMaster
        /// A terminal's slave end (/dev/pts/N): the process's side.
        case ptySlave
        case characterDevice
        case blockDevice
        case regularFile
        case directory
        /// No file type: an eventfd, epoll, signalfd, timerfd, pidfd or other anonymous inode.
        case anonymous
        /// Opened with O_PATH: it names a file but cannot read or write it.
        case pathOnly
    }

    public var type: FileType
    public var readable: Bool
    public var writable: Bool
    /// The file, for one whose bytes a read takes away (a pipe, a socket, a pty master): a
    /// second stream reading it would split them with the first.
    public var file: FileIdentity?
    /// A socket that keeps message boundaries (SOCK_SEQPACKET, SOCK_DGRAM): a read shorter than
    /// a message drops the rest of it.
    public var keepsMessages: Bool

    public init(type: FileType, readable: Bool, writable: Bool, file: FileIdentity? = nil, keepsMessages: Bool = false) {
        self.type = type
        self.readable = readable
        self.writable = writable
        self.file = file
        self.keepsMessages = keepsMessages
    }

    /// What the file is called in a refusal.
    var fileName: String {
        switch type {
        case .pipe: return "pipe"
        case .socket: return "socket"
        case .ptyMaster: return "pty master"
        default: return "file"
        }
    }

    /// The file type from `st_mode`, a character device's `st_rdev` major and minor, and a
    /// socket's state (read only for a socket).
    public static func fileType(
        mode: UInt32, deviceMajor: UInt32, deviceMinor: UInt32, socketListening: Bool, socketConnected: Bool
    ) -> FileType {
        switch mode & 0o170000 {
        case 0o010000: return .pipe
        case 0o140000: return .socket(listening: socketListening, connected: socketConnected)
        case 0o020000:
            // /dev/ptmx (and devpts's own ptmx) is 5:2; the slaves are majors 136 to 143
            // (UNIX98_PTY_SLAVE_MAJOR and the seven after it).
            if deviceMajor == 5, deviceMinor == 2 { return .ptyMaster }
            if (136...143).contains(deviceMajor) { return .ptySlave }
            return .characterDevice
        case 0o060000: return .blockDevice
        case 0o100000: return .regularFile
        case 0o040000: return .directory
        default: return .anonymous
        }
    }
}

/// A file as the kernel names it: its device and inode (`st_dev`, `st_ino`).
public struct FileIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64

    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }
}

/// A stream the broker relays, as the check for shared files sees it.
public struct HeldStream: Sendable, Equatable {
    /// Its process, or nil when the asking peer may not see it (another owner's).
    public var process: String?
    public var kind: StreamKind
    public var file: FileIdentity

    public init(process: String?, kind: StreamKind, file: FileIdentity) {
        self.process = process
        self.kind = kind
        self.file = file
    }
}

extension StreamKind {
    /// Its relay reads its fd: stdout, stderr, a tty's output.
    var readsItsFile: Bool { self != .stdin }
    /// Its relay writes its fd: stdin, a tty's input.
    var writesItsFile: Bool { self == .stdin || self == .tty }
}

extension AdoptCheck {
    /// The first stream of a request (index and why) whose file another stream already reads
    /// where it would read, or writes where it would write: two readers of a pipe, a socket or
    /// a pty master split its bytes between two host streams, two writers interleave two
    /// hosts' input — silently, each host stream a part of the whole. A socket carrying a
    /// process's stdin and stdout (one reader, one writer) is fine. `held`: the broker's
    /// streams whose fds are open; `streams`: the request's, in order.
    public static func sharingRefusal(
        _ streams: [(kind: StreamKind, facts: DescriptorFacts)], held: [HeldStream]
    ) -> (index: Int, reason: String)? {
        var earlier: [(kind: StreamKind, file: FileIdentity)] = []
        for (index, stream) in streams.enumerated() {
            guard let file = stream.facts.file else { continue }
            func clash(_ other: StreamKind) -> String? {
                if stream.kind.readsItsFile, other.readsItsFile { return "reads" }
                if stream.kind.writesItsFile, other.writesItsFile { return "writes" }
                return nil
            }
            func consequence(_ verb: String) -> String {
                verb == "reads" ? "two readers would split its bytes" : "two writers would interleave their input"
            }
            let name = stream.facts.fileName
            if let other = earlier.first(where: { $0.file == file && clash($0.kind) != nil }) {
                let verb = clash(other.kind)!
                return (index, "the \(name) this request's \(other.kind.rawValue) \(verb) too: \(consequence(verb))")
            }
            if let other = held.first(where: { $0.file == file && clash($0.kind) != nil }) {
                let verb = clash(other.kind)!
                let whose = other.process.map { "process '\($0)''s" } ?? "another process's"
                return (index, "the \(name) \(whose) \(other.kind.rawValue) already \(verb): \(consequence(verb))")
            }
            earlier.append((stream.kind, file))
        }
        return nil
    }

    /// Why a stream of `kind` cannot be relayed on a fd with these facts, or nil if it can.
    ///
    /// A runtime that hands over the wrong end (a pipe's write end for a stdout, the slave of a
    /// pty for a tty) or the wrong fd altogether would otherwise get `ok` and a stream that
    /// never carries a byte, with nothing said anywhere: caught here, the `adopt` is refused
    /// `bad-descriptor` with what was wrong and what to hand over instead.
    public static func descriptorRefusal(kind: StreamKind, facts: DescriptorFacts) -> String? {
        switch facts.type {
        case .pathOnly:
            return "an O_PATH fd, which cannot be read or written"
        case .directory:
            return "a directory"
        case .anonymous:
            return "not a pipe, socket, terminal or file (an eventfd, epoll, signalfd, timerfd, pidfd or other anonymous inode)"
        case .socket(let listening, _) where listening:
            return "a listening socket: hand over a connected one"
        case .socket(_, let connected) where !connected:
            return "a socket that is not connected"
        case .socket where facts.keepsMessages:
            // A message longer than the read that takes it loses its rest in the kernel: the
            // relay reads what its ring has room for, so bytes would go without a word.
            return "a SOCK_SEQPACKET or SOCK_DGRAM socket (a read shorter than a message drops the rest of it, so its bytes could not be relayed exactly): hand over a SOCK_STREAM socket or a pipe"
        default:
            break
        }
        switch kind {
        case .tty:
            switch facts.type {
            case .ptyMaster:
                return facts.readable && facts.writable ? nil : "a pty master open only for \(facts.readable ? "reading" : "writing"): a tty is relayed both ways"
            case .ptySlave:
                return "a pty's slave end (the process's terminal): hand over the master"
            default:
                return "not a pty master: a tty stream relays a pty's master end (a pipe or socket goes as stdin, stdout or stderr)"
            }
        case .stdout, .stderr:
            guard !facts.readable else { return nil }
            return facts.type == .pipe
                ? "a pipe's write end: hand over its read end (the process writes into the write end)"
                : "open for writing only: the broker reads a \(kind.rawValue) from its fd"
        case .stdin:
            guard !facts.writable else { return nil }
            return facts.type == .pipe
                ? "a pipe's read end: hand over its write end (the process reads from the read end)"
                : "open for reading only: the broker writes the host's stdin into its fd"
        }
    }
}
