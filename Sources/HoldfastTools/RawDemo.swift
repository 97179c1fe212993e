import HoldfastCore
import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// The raw-mode demo: a heartbeat process's stdout relayed through a ConnSlot to a local
/// listener that is killed and restarted three times. Prints what the host receives, marks each
/// kill, and ends with a verdict.
public enum RawDemo {
    public struct Verdict: Sendable {
        public var received: [Int]
        public var expected: Int
        public var duplicates: Int
        public var outOfOrder: Int
        public var lost: Int { expected - Set(received).count }
        public var passed: Bool { duplicates == 0 && outOfOrder == 0 && received.last == expected }
    }

    public static func run(beats: Int = 120, interval: Duration = .milliseconds(25), restarts: Int = 3,
                           print say: @escaping @Sendable (String) -> Void) async throws -> Verdict {
        let directory = try makeTemporaryDirectory()
        defer { FileTree.remove(directory) }
        let address = SocketAddress.unix(path: directory + "/host.sock")

        let pipe = try PipeEnds.make()
        let milliseconds = interval.components.attoseconds / 1_000_000_000_000_000 + interval.components.seconds * 1000
        var options = SpawnOptions(executable: "sh", arguments: [
            "sh", "-c",
            // The last beat waits for the demo's last listener restart, so it must arrive however
            // slow the machine is: raw mode may lose what a killed listener had accepted, never
            // what a live one gets.
            "i=0; while [ $i -lt \(beats - 1) ]; do i=$((i+1)); echo \"heartbeat $i\"; sleep \(Double(milliseconds) / 1000); done; "
                + "while [ ! -e \(directory)/restarted ]; do sleep 0.01; done; echo \"heartbeat \(beats)\"",
        ])
        options.stdout = pipe.write
        options.parentDeathSignal = SIGKILL
        let child = try Spawner.spawn(options)
        close(pipe.write)
        say("demo: heartbeat process \(child) prints a line every \(milliseconds) ms; the host listener at \(address) will be killed and restarted \(restarts) times")

        let slot = ConnSlot<AsyncFD>(
            name: "stdout", policy: RedialPolicy(attempts: 100, interval: .milliseconds(20)),
            dial: { try await Dialer.connect(to: address, timeout: .seconds(1)) })
        let host = DemoHost(address: address, say: say)
        try host.start()
        slot.disconnect()
        let source = try AsyncFD(adopting: pipe.read)
        let relay = Task { await Relay.output(from: source, to: slot) }

        let total = interval * beats
        for index in 1...restarts {
            try await Task.sleep(for: total / (restarts + 1))
            say("--- host listener killed (\(index)/\(restarts)) ---")
            host.kill()
            try await Task.sleep(for: .milliseconds(150))
            try host.start()
            say("--- host listener restarted ---")
        }
        try WholeFile.write(directory + "/restarted", [])
        let report = await relay.value
        let status = try await Spawner.waitForExit(child)
        // The host may still be reading the last line on a busy machine: give it a moment
        // (bounded), then kill it and judge.
        let deadline = ContinuousClock.now + .seconds(5)
        while host.numbers.last != beats, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        host.kill()
        let received = host.numbers
        var duplicates = 0
        var outOfOrder = 0
        var seen = Set<Int>()
        var last = 0
        for number in received {
            if !seen.insert(number).inserted { duplicates += 1 }
            if number < last { outOfOrder += 1 }
            last = max(last, number)
        }
        say("relay: \(report); heartbeat \(status); host connections: \(host.connections)")
        return Verdict(received: received, expected: beats, duplicates: duplicates, outOfOrder: outOfOrder)
    }
}

/// A listener on the host side that can be killed (listener and connection dropped at once,
/// unread bytes discarded, like a crashed host agent) and restarted.
final class DemoHost: @unchecked Sendable {
    private let address: SocketAddress
    private let say: @Sendable (String) -> Void
    private let lock = NIOLockedBox()
    private var listener: Listener?
    private var task: Task<Void, Never>?
    private var received: [Int] = []
    private var accepted = 0

    init(address: SocketAddress, say: @escaping @Sendable (String) -> Void) {
        self.address = address
        self.say = say
    }

    var numbers: [Int] { lock.with { received } }
    var connections: Int { lock.with { accepted } }

    func start() throws {
        let listener = try Listener(binding: address)
        let task = Task { [self] in
            while let connection = try? await listener.accept() {
                lock.with { accepted += 1 }
                await serve(connection)
            }
        }
        lock.with {
            self.listener = listener
            self.task = task
        }
    }

    func kill() {
        let (listener, task) = lock.with { (self.listener, self.task) }
        task?.cancel()
        listener?.close()
    }

    private func serve(_ connection: AsyncFD) async {
        defer { connection.close() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
        defer { buffer.deallocate() }
        var pending: [UInt8] = []
        while !Task.isCancelled {
            guard let count = try? await connection.read(into: buffer), count > 0 else { return }
            pending += buffer[..<count]
            while let newline = pending.firstIndex(of: 10) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeFirst(newline + 1)
                say("host <- \(line)")
                if let number = Int(line.split(separator: " ").last ?? "") {
                    lock.with { received.append(number) }
                }
            }
        }
    }
}
