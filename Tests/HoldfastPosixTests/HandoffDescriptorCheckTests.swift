import CHoldfastShims
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What the broker checks of each fd a runtime hands over (`DescriptorFacts.of`, then
/// `AdoptCheck.descriptorRefusal`), on real fds of every kind a runtime could send by mistake.
/// Before, every one of them but an O_PATH fd was adopted `ok`: a pipe's write end as a stdout
/// was a stream `connected` for ever with nothing on it, a pipe's read end as a stdin `parked`
/// with no error, a directory a stream `closed` at once — with nothing said anywhere.
@Suite("The fds a runtime hands over are checked against their streams")
struct HandoffDescriptorCheckTests {
    /// Opens the fds, runs `body` with them, closes them.
    private func withDescriptors(_ body: ([String: Int32]) throws -> Void) throws {
        var fds: [String: Int32] = [:]
        defer { for fd in fds.values where fd >= 0 { close(fd) } }
        let pipe = try PipeEnds.make()
        fds["pipe read"] = pipe.read
        fds["pipe write"] = pipe.write
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        fds["socketpair"] = pair[0]
        fds["socketpair other"] = pair[1]
        var packets: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &packets) == 0)
        fds["seqpacket"] = packets[0]
        fds["seqpacket other"] = packets[1]
        var datagrams: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &datagrams) == 0)
        fds["datagram"] = datagrams[0]
        fds["datagram other"] = datagrams[1]
        fds["unconnected socket"] = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let listening = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        fds["listening socket"] = listening
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)  // abstract and autobound: an empty path
        #expect(withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listening, $0, socklen_t(MemoryLayout<sa_family_t>.size)) }
        } == 0)
        #expect(listen(listening, 1) == 0)
        var (master, slave): (Int32, Int32) = (-1, -1)
        #expect(openpty(&master, &slave, nil, nil, nil) == 0)
        fds["pty master"] = master
        fds["pty slave"] = slave
        fds["directory"] = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        fds["O_PATH"] = open("/etc/hostname", 0o10000000 | O_CLOEXEC)
        fds["eventfd"] = hf_eventfd()
        fds["file read-only"] = open("/etc/hostname", O_RDONLY | O_CLOEXEC)
        fds["null write-only"] = open("/dev/null", O_WRONLY | O_CLOEXEC)
        fds["null read-write"] = open("/dev/null", O_RDWR | O_CLOEXEC)
        for (name, fd) in fds { #expect(fd >= 0, "\(name): errno \(errno)") }
        try body(fds)
    }

    @Test func theFactsOfEachKindOfFdAreReadWithoutWaiting() throws {
        try withDescriptors { fds in
            /// The facts without the file's identity (checked below).
            func facts(_ name: String) -> DescriptorFacts? {
                guard var facts = try? DescriptorFacts.of(fds[name]!) else { return nil }
                facts.file = nil
                return facts
            }
            func file(_ name: String) -> FileIdentity? { (try? DescriptorFacts.of(fds[name]!))?.file }
            #expect(facts("pipe read") == DescriptorFacts(type: .pipe, readable: true, writable: false))
            #expect(facts("pipe write") == DescriptorFacts(type: .pipe, readable: false, writable: true))
            #expect(facts("socketpair") == DescriptorFacts(type: .socket(listening: false, connected: true), readable: true, writable: true))
            #expect(facts("unconnected socket")?.type == .socket(listening: false, connected: false))
            #expect(facts("listening socket")?.type == .socket(listening: true, connected: false))
            #expect(facts("pty master") == DescriptorFacts(type: .ptyMaster, readable: true, writable: true))
            #expect(facts("pty slave")?.type == .ptySlave)
            #expect(facts("directory")?.type == .directory)
            #expect(facts("O_PATH")?.type == .pathOnly)
            #expect(facts("eventfd")?.type == .anonymous)
            #expect(facts("file read-only") == DescriptorFacts(type: .regularFile, readable: true, writable: false))
            #expect(facts("null write-only") == DescriptorFacts(type: .characterDevice, readable: false, writable: true))
            // A file whose bytes a read takes away is named (a pipe's two ends are one file);
            // one any number of readers may read is not.
            #expect(file("pipe read") != nil && file("pipe read") == file("pipe write"))
            #expect(file("socketpair") != nil && file("socketpair") != file("socketpair other"))
            #expect(file("pty master") != nil && file("pty slave") == nil)
            for name in ["file read-only", "null read-write", "directory", "eventfd"] { #expect(file(name) == nil, "\(name)") }
        }
        #expect(throws: SystemError.self) { try DescriptorFacts.of(-1) }
    }

    @Test func eachStreamTakesTheEndItCanUseAndIsToldWhatToHandOverOtherwise() throws {
        try withDescriptors { fds in
            func refusal(_ kind: StreamKind, _ name: String) -> String? {
                guard let facts = try? DescriptorFacts.of(fds[name]!) else { return "no facts" }
                return AdoptCheck.descriptorRefusal(kind: kind, facts: facts)
            }
            // What a runtime should hand over: taken.
            for (kind, name) in [
                (StreamKind.stdout, "pipe read"), (.stderr, "pipe read"), (.stdin, "pipe write"), (.tty, "pty master"),
                (.stdout, "socketpair"), (.stdin, "socketpair"), (.stdout, "file read-only"), (.stdin, "null write-only"),
                (.stdout, "null read-write"), (.stdout, "pty master"),
            ] {
                #expect(refusal(kind, name) == nil, "\(kind) on \(name)")
            }
            // The wrong end, said so with what to hand over instead.
            #expect(refusal(.stdout, "pipe write") == "a pipe's write end: hand over its read end (the process writes into the write end)")
            #expect(refusal(.stderr, "pipe write")?.hasPrefix("a pipe's write end") == true)
            #expect(refusal(.stdin, "pipe read") == "a pipe's read end: hand over its write end (the process reads from the read end)")
            #expect(refusal(.tty, "pty slave") == "a pty's slave end (the process's terminal): hand over the master")
            #expect(refusal(.stdout, "null write-only") == "open for writing only: the broker reads a stdout from its fd")
            #expect(refusal(.stdin, "file read-only") == "open for reading only: the broker writes the host's stdin into its fd")
            // Not a terminal's master for a tty: resizes and both directions need one.
            for name in ["pipe read", "socketpair", "file read-only", "null read-write"] {
                #expect(refusal(.tty, name)?.hasPrefix("not a pty master") == true, "\(name)")
            }
            // Nothing a stream of any kind can use.
            for kind in StreamKind.allCases {
                #expect(refusal(kind, "directory") == "a directory")
                #expect(refusal(kind, "O_PATH") == "an O_PATH fd, which cannot be read or written")
                #expect(refusal(kind, "eventfd")?.hasPrefix("not a pipe, socket, terminal or file") == true)
                #expect(refusal(kind, "listening socket") == "a listening socket: hand over a connected one")
                #expect(refusal(kind, "unconnected socket") == "a socket that is not connected")
                // A read shorter than a message drops its rest: bytes would go without a word.
                for name in ["seqpacket", "datagram"] {
                    #expect(refusal(kind, name)?.hasPrefix("a SOCK_SEQPACKET or SOCK_DGRAM socket") == true, "\(kind) on \(name)")
                }
            }
        }
        // A pty master open one way only (as fstat-free facts: a runtime could open /dev/ptmx so).
        #expect(AdoptCheck.descriptorRefusal(kind: .tty, facts: DescriptorFacts(type: .ptyMaster, readable: true, writable: false))
            == "a pty master open only for reading: a tty is relayed both ways")
    }

    @Test func twoStreamsOnOneFdIndexAreRefused() throws {
        let shared = AdoptRequest(process: "p", streams: [
            StreamDescription(kind: .stdin, fd: 0, address: "unix:/h", mode: .raw),
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/h", mode: .raw),
        ])
        #expect(throws: HoldfastError(.badRequest, "streams[1]: fd index 0 is streams[0]'s too: each stream needs an fd of its own (attach it twice, or a dup)")) {
            try AdoptCheck.validate(shared, descriptorCount: 1)
        }
        var apart = shared
        apart.streams[1].fd = 1
        #expect(throws: Never.self) { try AdoptCheck.validate(apart, descriptorCount: 2) }
    }

    /// An id reaches logs, the journal and operators' terminals: one holding a control
    /// character (a newline that would forge a journal entry, an escape sequence) is refused
    /// (at a create, and at a runtime's adopt: `HandoffExampleTests`).
    @Test func anIdWithAControlCharacterIsRefused() {
        for id in ["x\n<2>holdfast.supervisor: upgrade failed", "a\u{1b}]52;c;AAAA\u{07}", "del\u{7f}", "c1\u{9b}"] {
            #expect(ProcessIdentifier.controlCharacterRefusal(id)?.contains("holds a control character") == true, "\(id.debugDescription)")
        }
        #expect(ProcessIdentifier.controlCharacterRefusal("web-1.exec2 ünïcode") == nil)
    }

    @Test func aFileIsReadByOneStreamAndWrittenByOne() {
        let pipe = FileIdentity(device: 14, inode: 100)
        let socket = FileIdentity(device: 8, inode: 200)
        func facts(_ type: DescriptorFacts.FileType, _ file: FileIdentity) -> DescriptorFacts {
            DescriptorFacts(type: type, readable: true, writable: true, file: file)
        }
        let pipeStdout = HeldStream(process: "first", kind: .stdout, file: pipe)
        // A second reader of a held pipe, named when the peer may see it, not otherwise.
        #expect(AdoptCheck.sharingRefusal([(.stderr, facts(.pipe, pipe))], held: [pipeStdout])?.reason
            == "the pipe process 'first''s stdout already reads: two readers would split its bytes")
        #expect(AdoptCheck.sharingRefusal([(.stdout, facts(.pipe, pipe))], held: [HeldStream(process: nil, kind: .tty, file: pipe)])?.reason
            == "the pipe another process's tty already reads: two readers would split its bytes")
        // Two writers; two readers within one request (the second is the one refused).
        #expect(AdoptCheck.sharingRefusal([(.stdin, facts(.pipe, pipe))], held: [HeldStream(process: "first", kind: .stdin, file: pipe)])?.reason
            == "the pipe process 'first''s stdin already writes: two writers would interleave their input")
        let twice = AdoptCheck.sharingRefusal([(.stdout, facts(.socket(listening: false, connected: true), socket)), (.stderr, facts(.socket(listening: false, connected: true), socket))], held: [])
        #expect(twice?.index == 1 && twice?.reason == "the socket this request's stdout reads too: two readers would split its bytes")
        // One reader and one writer: a socket carrying stdin and stdout, a pipe between two processes.
        #expect(AdoptCheck.sharingRefusal([(.stdout, facts(.pipe, socket)), (.stdin, facts(.pipe, socket))], held: []) == nil)
        #expect(AdoptCheck.sharingRefusal([(.stdin, facts(.pipe, pipe))], held: [pipeStdout]) == nil)
        // A tty reads and writes: a second tty on one master clashes; files nobody consumes never do.
        #expect(AdoptCheck.sharingRefusal([(.tty, facts(.ptyMaster, socket))], held: [HeldStream(process: "t", kind: .tty, file: socket)]) != nil)
        #expect(AdoptCheck.sharingRefusal([(.stdout, DescriptorFacts(type: .regularFile, readable: true, writable: false))], held: [pipeStdout]) == nil)
    }
}
