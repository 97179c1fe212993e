import ArgumentParser
import Histogram
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Reconnect latency: from the end of a blackout (the host accepting again and telling every
/// guest stream to dial, as bridge-up does) to the first byte of each stream at the host. The
/// producers keep writing during the blackout, so the first byte is a replay from the ring.
struct Reconnect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Reconnect latency after a blackout: end of blackout → first byte at the host, per stream.")

    @Option(help: "Resumable streams (guest → host).") var streams = 1
    @Option(help: "Blackouts to measure.") var rounds = 20
    @Option(help: "Blackout length, milliseconds.") var blackout = 200
    @Option(help: "Each producer writes 16 bytes this often, milliseconds.") var every = 50

    func run() async throws {
        raiseDescriptorLimit()
        var template = Array("/tmp/holdfast-bench.XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) != nil }) else { throw ValidationError("mkdtemp failed") }
        let directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(directory + "/s.sock"); rmdir(directory) }
        let server = try StreamServer(listeningOn: .unix(path: directory + "/s.sock"))
        server.start()
        defer { server.close() }

        let waiting = NIOLockedValueBox<[Int: ContinuousClock.Instant]>([:])
        let samples = NIOLockedValueBox<[Duration]>([])
        var guests: [ResumableStream<AsyncFD>] = []
        var tasks: [Task<Void, Never>] = []
        let policy = RedialPolicy(attempts: 1_000_000, interval: .seconds(10), connectTimeout: .seconds(5))
        for index in 0..<streams {
            let token = Array("s\(index)".utf8)
            let host = try server.open(token: token, direction: .receive)
            tasks.append(Task {
                for await _ in host.chunks() {
                    let now = ContinuousClock.now
                    if let since = waiting.withLockedValue({ $0.removeValue(forKey: index) }) {
                        samples.withLockedValue { $0.append(now - since) }
                    }
                }
            })
            let guest = GuestStreams.resumable(to: server.address, token: token, secret: host.secret, direction: .send, policy: policy)
            guest.redialNow()
            guests.append(guest)
            tasks.append(Task { [every] in
                let chunk = [UInt8](repeating: 0x2A, count: 16)
                while !Task.isCancelled {
                    try? await guest.send(chunk)
                    try? await Task.sleep(for: .milliseconds(every))
                }
            })
        }
        try await Task.sleep(for: .seconds(1))
        print("\(streams) streams connected: \(server.statistics.streams) open at the host; \(rounds) blackouts of \(blackout) ms")
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        var allFlowing: [Duration] = []
        for _ in 0..<rounds {
            server.setRefusing(true)
            server.dropAllConnections()
            try await Task.sleep(for: .milliseconds(blackout))
            samples.withLockedValue { $0.removeAll() }
            let end = ContinuousClock.now
            waiting.withLockedValue { w in for index in 0..<streams { w[index] = end } }
            server.setRefusing(false)
            for guest in guests { guest.redialNow() }  // bridge-up
            let deadline = end + .seconds(30)
            while samples.withLockedValue({ $0.count }) < streams, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(1))
            }
            let round = samples.withLockedValue { $0 }
            for sample in round { _ = histogram.record(UInt64(max(0, microseconds(sample)))) }
            allFlowing.append(round.max() ?? .seconds(30))
            if round.count < streams { print("warning: \(streams - round.count) streams did not resume within 30 s") }
            try await Task.sleep(for: .milliseconds(300))
        }
        for task in tasks { task.cancel() }
        for guest in guests { guest.close() }
        func ms(_ value: UInt64) -> String { format(Double(value) / 1000) }
        print("end of blackout → first byte at the host, per stream (\(histogram.totalCount) samples):")
        print("  p50 \(ms(histogram.valueAtPercentile(50))) ms  p90 \(ms(histogram.valueAtPercentile(90))) ms  p99 \(ms(histogram.valueAtPercentile(99))) ms  max \(ms(histogram.max)) ms")
        let sorted = allFlowing.sorted()
        print("all \(streams) streams flowing again: median \(format(Double(microseconds(sorted[sorted.count / 2])) / 1000)) ms, worst \(format(Double(microseconds(sorted.last!)) / 1000)) ms")
    }
}

func microseconds(_ duration: Duration) -> Int64 {
    duration.components.seconds * 1_000_000 + duration.components.attoseconds / 1_000_000_000_000
}
