import Dispatch
import HoldfastBridge
import HoldfastBroker
import HoldfastConfig
import HoldfastCore
import HoldfastProtocol
import HoldfastSupervisor

/// The fuzz targets (`make fuzz`, README "Fuzzing"): each feeds arbitrary bytes to a parser that
/// reads what a peer or an operator sends. Any input must end in a value or an error; a trap, a
/// sanitizer report or a hang is a bug. The same functions replay the committed corpus and every
/// crash found in the normal test suite (Tests/HoldfastFuzzTests).
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// Bridge frames from the host: ControlFrameIO over a byte stream, then the bridge worker's
    /// checks (BridgeWorker.classify) and the supervisor's check of a create's ProcessSpec. The
    /// first byte picks the form of the rest: even, the bytes on the wire; odd, one frame without
    /// its length field (type u32, id u64, body), which the harness fills in, so that mutations
    /// of a JSON body that change its length still make a well-framed frame. The whole input is
    /// also fed to both ends of the authentication handshake (`bridgeHandshake`).
    case bridge
    /// Broker control messages: one datagram, ControlFrame.decode, then BrokerRequest.parse
    /// (JSON and the adopt checks). The first input byte is not part of the datagram: its low 3
    /// bits are the number of attached fds, bit 3 says whether the supervisor sent it, bit 4
    /// that the datagram comes without its length field (as for the bridge).
    case broker
    /// Resumable stream frames: prefixes, HELLO, ERROR, and the handshake's reads; and, when the
    /// first byte has its high bit set, a whole session through a real `ResumableStream`: the
    /// peer's hello (signed by the harness, which the fuzzer cannot do) and then whatever the
    /// peer sends — DATA, ACK, END, ERROR, garbage — against a host or guest end that sends or
    /// receives. No peer input may reach a precondition.
    case stream
    /// The configuration loader: the input is written to a temporary file and loaded, as JSON
    /// if its first non-blank byte is `{`, as YAML otherwise.
    case config

    public func run(_ bytes: [UInt8]) async {
        switch self {
        case .bridge: await Self.bridge(bytes)
        case .broker: Self.broker(bytes)
        case .stream: await Self.stream(bytes)
        case .config: await Self.config(bytes)
        }
    }

    /// For libFuzzer's synchronous callback (never from a task: it blocks its thread).
    public func runBlocking(_ bytes: [UInt8]) {
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            await run(bytes)
            done.signal()
        }
        done.wait()
    }

    // MARK: Bridge

    static func bridge(_ input: [UInt8]) async {
        guard let mode = input.first else { return }
        await bridgeHandshake(input)
        let rest = Array(input.dropFirst())
        let bytes = mode & 1 == 0 ? rest : withLengthField(rest)
        // As the bridge worker reads them: a byte stream, frames back to back, in odd-sized reads.
        let connection = ScriptedConnection(bytes)
        while true {
            let frame: ControlFrame
            do {
                frame = try await ControlFrameIO.read(from: connection, maxBody: BridgeProtocol.maxBody)
            } catch {
                if let error = error as? ControlFrameIO.ReadError, case .oversized(_, _, let id) = error {
                    _ = errorReply(id: id, HoldfastError(.frameTooLarge, error.description))
                }
                return
            }
            precondition(frame.body.count <= BridgeProtocol.maxBody, "a frame over the limit was read")
            // As the worker's RPC server takes it: id 0 is a notification (refused), a reply is
            // stray, anything else is decoded once into a typed request or refused.
            if frame.id == 0 || RPCFrameType.isReply(frame.type) { continue }
            let request: BridgeRequest
            do {
                request = try BridgeRequest.decode(type: frame.type, body: frame.body, descriptorCount: 0)
            } catch {
                _ = errorReply(id: frame.id, error)
                continue
            }
            precondition(BridgeMessageType.requests.contains(BridgeMessageType(rawValue: request.frameType)!), "an invalid request was forwarded")
            // What the supervisor does next with a create: check it.
            if case .create(let spec) = request {
                do {
                    try Supervisor.validate(spec)
                } catch {
                    _ = errorReply(id: frame.id, error)
                    continue
                }
                // The supervisor starts the process, then hands its streams to the broker, which
                // checks them again: what it would refuse must be refused up front.
                let streams = Supervisor.streamDescriptions(for: spec)
                if !streams.isEmpty {
                    do {
                        try AdoptCheck.validate(AdoptRequest(process: spec.id, streams: streams), descriptorCount: streams.count)
                    } catch {
                        preconditionFailure("the broker refuses the streams of a create the supervisor accepted: \(error)")
                    }
                }
            }
        }
    }

    /// The authentication handshake's reads, at both ends, on the whole input as what the peer
    /// sent: a challenge read by the host, an answer and a verdict read by the guest. Any input
    /// must end in a failure (no input holds a proof for the harness's key): a success means
    /// a proof was accepted that was never made with the key. Fixed nonces keep a run
    /// deterministic, as libFuzzer wants.
    static func bridgeHandshake(_ input: [UInt8]) async {
        let key = fuzzingKey
        let nonce = [UInt8](repeating: 0, count: BridgeHandshakeWire.nonceSize)
        do {
            try await BridgeHandshake.authenticateGuest(on: ScriptedConnection(input), key: key, hostNonce: nonce)
            preconditionFailure("the host accepted a guest proof made without the key")
        } catch {}
        do {
            try await BridgeHandshake.authenticateHost(on: ScriptedConnection(input), key: key, guestNonce: nonce)
            preconditionFailure("the guest accepted a host proof made without the key")
        } catch {}
    }

    static let fuzzingKey = try! BridgeKey(bytes: Array(repeating: 0x5A, count: BridgeKey.minimumBytes))

    /// A control frame from type (4 bytes), id (8 bytes) and body: the length field inserted.
    static func withLengthField(_ bytes: [UInt8]) -> [UInt8] {
        guard bytes.count >= 12 else { return bytes }
        let length = UInt32(truncatingIfNeeded: bytes.count - 12)
        return Array(bytes[..<4]) + [UInt8(length >> 24), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF)]
            + Array(bytes[4...])
    }

    /// The error frame a refusal becomes; encoding it must not fail either.
    static func errorReply(id: UInt64, _ error: HoldfastError) -> [UInt8] {
        let frame = ControlFrame(type: BridgeMessageType.error.rawValue, id: id, body: ControlJSON.encode(error))
        let bytes = frame.encoded
        precondition((try? ControlFrame.decode(datagram: bytes, maxBody: Int.max)) == frame, "an error frame does not round-trip")
        return bytes
    }

    // MARK: Broker

    static func broker(_ bytes: [UInt8]) {
        guard let selector = bytes.first else { return }
        let descriptorCount = Int(selector & 0x07)
        let fromSupervisor = selector & 0x08 != 0
        let datagram = selector & 0x10 == 0 ? Array(bytes.dropFirst()) : withLengthField(Array(bytes.dropFirst()))
        let frame: ControlFrame
        do {
            frame = try ControlFrame.decode(datagram: datagram)
        } catch {
            _ = error.description
            return
        }
        precondition(frame.encoded == datagram, "a control frame does not round-trip")
        let request: BrokerRequest
        do {
            request = try BrokerRequest.parse(frame, descriptorCount: descriptorCount, fromSupervisor: fromSupervisor)
        } catch {
            _ = ControlJSON.encode(error)
            return
        }
        // What the broker relies on once a request passed: Broker.adopt indexes the fds by
        // `fd`, and StreamTransport.make parses every address with `try!`.
        switch request {
        case .adopt(let adopt):
            for stream in adopt.streams {
                precondition(stream.fd >= 0 && stream.fd < descriptorCount, "an fd index out of range passed")
                for address in [stream.address, stream.inputAddress].compactMap({ $0 }) {
                    precondition((try? SocketAddress(parsing: address)) != nil, "an address that does not parse passed")
                }
                if stream.mode == .resumable {
                    // The guest says hello with these tokens on every connect: the host must be
                    // able to read that hello.
                    precondition(helloIsReadable(token: stream.token ?? ""), "a resumable stream whose hello the host refuses passed")
                    if stream.inputAddress != nil {
                        precondition(helloIsReadable(token: stream.inputToken ?? ""), "a tty input whose hello the host refuses passed")
                    }
                }
            }
        case .disconnectAll, .bridgeUp:
            precondition(fromSupervisor, "a bridge event from a handoff peer passed")
        default:
            precondition(descriptorCount == 0, "fds passed with a request other than adopt")
        }
    }

    /// Whether the hello a guest stream sends with `token` decodes at the host.
    static func helloIsReadable(token: String) -> Bool {
        let bytes = StreamHello(role: .guest, token: Array(token.utf8), receivedOffset: 0, attempt: 1).encoded
        guard let prefix = try? bytes.withUnsafeBytes({ try StreamFramePrefix.decode($0) }) else { return false }
        guard let hello = try? StreamHello.decode(prefix: prefix, body: Array(bytes[StreamFramePrefix.size...])) else { return false }
        return !hello.token.isEmpty && hello.token == Array(token.utf8)
    }

    // MARK: Stream

    static func stream(_ bytes: [UInt8]) async {
        if let mode = bytes.first, mode & 0x80 != 0 {
            await StreamSessionFuzz.run(mode: mode, Array(bytes.dropFirst()))
            return
        }
        // Frame by frame with the pure decoders.
        var rest = bytes[...]
        while rest.count >= StreamFramePrefix.size {
            let header = Array(rest.prefix(StreamFramePrefix.size))
            let prefix: StreamFramePrefix
            do {
                prefix = try header.withUnsafeBytes { try StreamFramePrefix.decode($0) }
            } catch {
                _ = "\(error)"
                break
            }
            rest = rest.dropFirst(StreamFramePrefix.size)
            guard rest.count >= prefix.bodyLength else { break }
            let body = Array(rest.prefix(prefix.bodyLength))
            rest = rest.dropFirst(prefix.bodyLength)
            precondition(prefix.encoded == header, "a stream frame prefix does not round-trip")
            switch prefix.type {
            case .hello:
                do {
                    let hello = try StreamHello.decode(prefix: prefix, body: body)
                    precondition(hello.encoded == header + body, "a hello does not round-trip")
                } catch {
                    _ = error.description
                }
            case .error:
                let refusal = StreamRefusal.decode(prefix: prefix, body: body)
                _ = StreamProtocolError.refusedByPeer(refusal).description
                precondition(refusal.encoded.count <= StreamFramePrefix.size + StreamFramePrefix.maxErrorBody)
            case .data, .ack, .end, .gap:
                break
            }
        }
        // As the handshake reads them: the accepting side reads a hello; the dialing side sends
        // its own, then reads and checks the answer (a wrong token is refused with an ERROR).
        _ = try? await Handshake.readHello(from: ScriptedConnection(bytes))
        let ours = StreamHello(role: .guest, token: Array("fuzz".utf8), receivedOffset: 0, attempt: 1)
        let connection = ScriptedConnection(bytes)
        _ = try? await Handshake.initiate(on: connection, hello: ours) { peer in
            peer.token == ours.token ? nil : .wrongToken
        }
    }

    // MARK: Config

    static func config(_ bytes: [UInt8]) async {
        let json = bytes.first { ![0x20, 0x09, 0x0A, 0x0D].contains($0) } == UInt8(ascii: "{")
        guard let path = TemporaryFile.write(bytes, suffix: json ? ".json" : ".yaml") else { return }
        defer { TemporaryFile.remove(path) }
        do throws(ConfigurationError) {
            _ = try await ConfigurationLoader.load(path: path, environment: [:])
        } catch {
            _ = error.description
        }
    }
}
