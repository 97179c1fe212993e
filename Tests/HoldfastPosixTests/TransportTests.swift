import CHoldfastShims
import HoldfastCore
import HoldfastTestSupport
import Testing

@testable import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

@Suite("Transports: dial and listen on loopback", .timeLimit(.minutes(5)))
struct TransportTests {
    @Test func unixSocketRoundTrip() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let address = try SocketAddress(parsing: "unix:" + directory.file("s.sock"))
        let listener = try Listener(binding: address)
        defer { listener.close() }
        async let accepted = listener.accept()
        let client = try await Dialer.connect(to: address, timeout: .seconds(30))
        let server = try await accepted
        try await send(client, bytes("ping"))
        #expect(try await readExactly(server, 4) == bytes("ping"))
        try await send(server, bytes("pong"))
        #expect(try await readExactly(client, 4) == bytes("pong"))
        client.close()
        #expect(try await readAll(server).isEmpty, "the peer sees end-of-file after close")
        server.close()
    }

    @Test func tcpLoopbackRoundTrip() async throws {
        let listener = try Listener(binding: .tcp(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let address = listener.boundAddress
        guard case .tcp(_, let port) = address else { Issue.record("not tcp"); return }
        #expect(port != 0)
        async let accepted = listener.accept()
        let client = try await Dialer.connect(to: address, timeout: .seconds(30))
        let server = try await accepted
        try await send(client, bytes("over tcp"))
        #expect(try await readExactly(server, 8) == bytes("over tcp"))
        client.close()
        server.close()
    }

    /// A TCP dial from a reserved port (root may bind one): the accepted end sees a source port
    /// below 1024 and counts its peer privileged; an ordinary dial's ephemeral port is not, nor
    /// is a Unix socket's peer.
    @Test(.enabled(if: geteuid() == 0, "needs root: binding a port below 1024"))
    func aDialFromAReservedPortIsToldApart() async throws {
        let listener = try Listener(binding: .tcp(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        for reserved in [true, false] {
            async let accepted = listener.accept()
            let client = try await Dialer.connect(to: listener.boundAddress, timeout: .seconds(30), fromReservedPort: reserved)
            let server = try await accepted
            var storage = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(client.fd, $0, &length) } }
            let port = UInt32(UInt16(bigEndian: storage.sin_port))
            #expect(ReservedPorts.range.contains(port) == reserved, "source port \(port)")
            #expect(ReservedPorts.peerIsPrivileged(server) == reserved)
            client.close()
            server.close()
        }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let unix = try Listener(binding: .unix(path: directory.file("s.sock")))
        defer { unix.close() }
        async let accepted = unix.accept()
        let client = try await Dialer.connect(to: .unix(path: directory.file("s.sock")), timeout: .seconds(30), fromReservedPort: true)
        let server = try await accepted
        #expect(!ReservedPorts.peerIsPrivileged(server), "root's, but over a Unix socket: a VMM may be the peer of every connection")
        client.close()
        server.close()
    }

    @Test func refusedDialNamesTheAddress() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let address = SocketAddress.unix(path: directory.file("nobody.sock"))
        do {
            _ = try await Dialer.connect(to: address, timeout: .seconds(1))
            Issue.record("dial succeeded")
        } catch let error as SystemError {
            #expect(error.description.contains("nobody.sock"))
            #expect(error.errno == .noSuchFileOrDirectory)
        }
    }

    @Test func connectTimeoutIsEnforced() async throws {
        // A TCP listener that never accepts, with its backlog full: the next SYN is dropped, so
        // a connect hangs until our timeout ends it.
        let listener = try Listener(binding: .tcp(host: "127.0.0.1", port: 0), backlog: 0)
        defer { listener.close() }
        let address = listener.boundAddress
        var fillers: [AsyncFD] = []
        defer { for filler in fillers { filler.close() } }
        var timedOut = false
        for _ in 0..<16 {
            let started = ContinuousClock.now
            do {
                fillers.append(try await Dialer.connect(to: address, timeout: .milliseconds(200)))
            } catch is ConnectTimedOut {
                let elapsed = ContinuousClock.now - started
                // Not before the timeout; the upper bound only catches a connect that ignores it
                // (a starved machine can be seconds late).
                #expect(elapsed >= .milliseconds(150) && elapsed < .seconds(30))
                timedOut = true
                break
            }
        }
        #expect(timedOut, "a connect to a full backlog must time out")
    }

    /// Whether this kernel has AF_VSOCK (a socket can be made; nothing is dialed).
    static var vsockAvailable: Bool {
        let probe = socket(hf_af_vsock(), Int32(SOCK_STREAM.rawValue), 0)
        guard probe >= 0 else { return false }
        close(probe)
        return true
    }

    @Test(.enabled(if: vsockAvailable, "AF_VSOCK is not available on this kernel; vsock is covered by address parsing"))
    func vsockListenerBindsLocally() throws {
        // Never dial vsock here: the machine's CID 2 is not ours. Binding a listener is the most
        // this test does.
        let listener = try Listener(binding: .vsock(cid: SocketAddress.vsockAnyCID, port: 0xFFFF_FFFF))
        defer { listener.close() }
        guard case .vsock(_, let port) = listener.boundAddress else {
            Issue.record("bound address is not vsock")
            return
        }
        #expect(port != 0xFFFF_FFFF, "the kernel picked a port")
    }

    @Test func listenerAcceptsAnyNumberOfConnections() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let address = SocketAddress.unix(path: directory.file("many.sock"))
        let listener = try Listener(binding: address)
        defer { listener.close() }
        for round in 0..<50 {
            async let accepted = listener.accept()
            let client = try await Dialer.connect(to: address)
            let server = try await accepted
            try await send(client, [UInt8(round)])
            #expect(try await readExactly(server, 1) == [UInt8(round)])
            client.close()
            server.close()
        }
    }

    @Test func closingAListenerUnlinksOnlyItsOwnSocketFile() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let address = SocketAddress.unix(path: directory.file("s.sock"))
        let first = try Listener(binding: address)
        unlink(directory.file("s.sock"))  // someone removed it: a successor binds the path again
        let second = try Listener(binding: address)
        first.close()
        #expect(access(directory.file("s.sock"), F_OK) == 0, "the successor's socket file survives")
        second.close()
        #expect(access(directory.file("s.sock"), F_OK) != 0)
    }

    @Test func bindingReplacesOnlyAStaleSocketOfOurOwn() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.file("s.sock")
        // A live listener's path is not taken over: bind fails, the listener keeps its file.
        let live = try Listener(binding: .unix(path: path))
        var before = stat()
        lstat(path, &before)
        #expect(throws: SystemError.self) { try Listener(binding: .unix(path: path)) }
        var after = stat()
        #expect(lstat(path, &after) == 0 && after.st_ino == before.st_ino, "the live listener's socket file is untouched")
        live.close()
        // A socket file whose process died (bound, never unlinked): stale, ours, replaced.
        makeStaleSocket(path)
        #expect(UnixSocketFile.state(path) == .stale)
        let replacing = try Listener(binding: .unix(path: path))
        #expect(UnixSocketFile.state(path) == .live)
        replacing.close()
        // Another user's socket file is never removed.
        makeStaleSocket(path)
        chown(path, 65534, 65534)
        lstat(path, &before)
        #expect(UnixSocketFile.state(path) == .foreign(owner: 65534))
        #expect(throws: SystemError.self) { try Listener(binding: .unix(path: path)) }
        #expect(lstat(path, &after) == 0 && after.st_ino == before.st_ino && after.st_uid == 65534, "not unlinked")
    }

    /// Whether a process listens on a socket file cannot be told when the probe gets no socket
    /// (fds or memory short): said as such, and a start refused for it exits 1, which the unit
    /// restarts. Taken for "another process listens on it", a start during a shortage (after a
    /// crash it may have caused) was refused for good: exit 2, never restarted.
    @Test func aShortageWhileProbingASocketFileIsNotTakenForALiveOne() async throws {
        guard try await isolated("aShortageWhileProbingASocketFileIsNotTakenForALiveOne") else { return }
        let directory = try TemporaryDirectory("holdfast-probe")
        defer { directory.remove() }
        let path = directory.file("s.sock")
        makeStaleSocket(path)
        #expect(UnixSocketFile.state(path) == .stale)
        // The lowest free fd number as the limit: no new fd can be had.
        var saved = rlimit()
        #expect(getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved) == 0)
        let lowestFree = fcntl(0, F_DUPFD, 0)
        #expect(lowestFree >= 0)
        close(lowestFree)
        var short = saved
        short.rlim_cur = rlim_t(lowestFree)
        #expect(setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &short) == 0)
        let state = UnixSocketFile.state(path)
        var refusal: RunDirectory.Refusal?
        do { try RunDirectory.prepareSocket(path, runDirectory: directory.path) } catch { refusal = error }
        #expect(setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved) == 0)
        #expect(state == .unknown(errno: EMFILE))
        #expect(refusal?.transient == true && refusal?.description.contains("cannot tell whether another process listens") == true, "\(String(describing: refusal))")
        #expect(access(path, F_OK) == 0, "not removed: it may be live")
        #expect(UnixSocketFile.state(path) == .stale, "told once fds are back")
    }
}

@Suite("AsyncFD", .timeLimit(.minutes(5)))
struct AsyncFDTests {
    @Test func pipeRoundTripAndEndOfFile() async throws {
        let pipe = try PipeEnds.make()
        let reader = try AsyncFD(adopting: pipe.read)
        let writer = try AsyncFD(adopting: pipe.write)
        try await send(writer, bytes("through the pipe"))
        writer.close()
        #expect(try await readAll(reader) == bytes("through the pipe"))
        reader.close()
    }

    @Test func closeWakesAParkedRead() async throws {
        let pipe = try PipeEnds.make()
        let reader = try AsyncFD(adopting: pipe.read)
        let writer = try AsyncFD(adopting: pipe.write)
        let parked = Task { () -> Bool in
            do {
                _ = try await readAll(reader)
                return false
            } catch is DescriptorClosed {
                return true
            } catch {
                return false
            }
        }
        try await Task.sleep(for: .milliseconds(20))
        reader.close()
        #expect(try await withTimeout("parked read") { await parked.value })
        writer.close()
    }

    @Test func writeToAPipeWithoutReaderFailsWithoutSignal() async throws {
        let pipe = try PipeEnds.make()
        close(pipe.read)
        let writer = try AsyncFD(adopting: pipe.write)
        do {
            try await send(writer, bytes("x"))
            Issue.record("write succeeded")
        } catch let failure as WriteFailure {
            #expect((failure.cause as? SystemError)?.errno == .brokenPipe)
        }
        writer.close()
    }

    @Test func descriptorsAreReleased() async throws {
        guard try await isolated("descriptorsAreReleased") else { return }
        _ = Reactor.shared  // its epoll fd is a one-time, process-wide cost
        let before = ownDescriptorCount()
        for _ in 0..<500 {
            let pipe = try PipeEnds.make()
            let reader = try AsyncFD(adopting: pipe.read)
            let writer = try AsyncFD(adopting: pipe.write)
            try await send(writer, [1])
            writer.close()
            _ = try await readAll(reader)
            reader.close()
        }
        await reactorClosesDone()  // a pipe's close runs on the reactor's thread
        #expect(ownDescriptorCount() == before, "fds now: \(descriptorTable())")
    }

    @Test func ptyResizeIsVisibleOnTheSlave() throws {
        let terminal = try PseudoTerminal.open(size: WindowSize(rows: 24, columns: 80))
        defer {
            close(terminal.master)
            close(terminal.slave)
        }
        #expect(try Terminal.size(of: terminal.slave) == WindowSize(rows: 24, columns: 80))
        try terminal.resize(WindowSize(rows: 50, columns: 132))
        #expect(try Terminal.size(of: terminal.slave) == WindowSize(rows: 50, columns: 132))
    }
}

