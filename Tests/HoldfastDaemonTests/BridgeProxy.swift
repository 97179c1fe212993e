import HoldfastCore
import HoldfastPosix
import HoldfastTestSupport
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Sits where the guest's bridge worker dials: forwards each connection to the real host
/// (BridgeServer) and records the first bytes each way, as an eavesdropper on the wire would;
/// or, switched to an impostor, answers the guest itself.
final class BridgeProxy: Sendable {
    /// What an impostor host does with a guest's connection (the proxy closes it afterwards).
    typealias Impostor = @Sendable (AsyncFD) async -> Void

    struct Recording: Sendable {
        var guestToHost: [UInt8] = []
        var hostToGuest: [UInt8] = []
    }

    static let recordLimit = 64 * 1024

    private let listener: Listener
    private let target: String
    private let state = NIOLockedValueBox<(impostor: Impostor?, recordings: [Recording], live: [AsyncFD])>((nil, [], []))

    init(listeningOn path: String, forwardingTo target: String) throws {
        listener = try Listener(binding: .unix(path: path), unixMode: 0o666)
        self.target = target
        Task { [self] in
            while let guest = try? await listener.accept() {
                Task { await handle(guest) }
            }
        }
    }

    /// The recordings of forwarded connections, oldest first.
    var recordings: [Recording] { state.withLockedValue { $0.recordings } }

    /// nil forwards again. Connections already open are left as they are (see `dropAll`).
    func impersonate(_ impostor: Impostor?) { state.withLockedValue { $0.impostor = impostor } }

    /// Closes every connection open through the proxy (the guest redials).
    func dropAll() {
        for connection in state.withLockedValue({ s -> [AsyncFD] in defer { s.live.removeAll() }; return s.live }) { connection.close() }
    }

    func close() {
        listener.close()
        dropAll()
    }

    private func handle(_ guest: AsyncFD) async {
        if let impostor = state.withLockedValue({ $0.impostor }) {
            state.withLockedValue { $0.live.append(guest) }
            await impostor(guest)
            guest.close()
            return
        }
        guard let host = try? await Dialer.connect(to: .unix(path: target)) else {
            guest.close()
            return
        }
        let index = state.withLockedValue { s -> Int in
            s.live += [guest, host]
            s.recordings.append(Recording())
            return s.recordings.count - 1
        }
        async let up: Void = copy(from: guest, to: host, index: index, upstream: true)
        async let down: Void = copy(from: host, to: guest, index: index, upstream: false)
        _ = await (up, down)
    }

    private func copy(from source: AsyncFD, to destination: AsyncFD, index: Int, upstream: Bool) async {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 1)
        defer {
            buffer.deallocate()
            source.close()
            destination.close()
        }
        while let count = try? await source.read(into: buffer), count > 0 {
            let chunk = Array(buffer[..<count])
            state.withLockedValue { s in
                if upstream, s.recordings[index].guestToHost.count < Self.recordLimit { s.recordings[index].guestToHost += chunk }
                if !upstream, s.recordings[index].hostToGuest.count < Self.recordLimit { s.recordings[index].hostToGuest += chunk }
            }
            do {
                try await send(destination, chunk)
            } catch {
                return
            }
        }
    }
}
