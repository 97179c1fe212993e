import HoldfastProtocol

/// One stream end of an adopt, as checked: where it dials (parsed), and for a resumable stream
/// the token and secret its hellos use.
public struct ValidatedEndpoint: Sendable, Equatable {
    public let address: SocketAddress
    /// The text the request named it by (names the stream in logs and status).
    public let addressText: String
    public let token: [UInt8]?
    public let secret: StreamSecret?
    /// The slot of the shared checkpoint area the stream keeps its progress in (resumable
    /// streams from the supervisor), if any.
    public let checkpoint: Int?
}

/// One stream of an adopt, as checked: its description, the fd index, and its ends.
public struct ValidatedStream: Sendable, Equatable {
    public let description: StreamDescription
    /// Stdout, stderr, a tty's output (to the host); stdin's only end (from the host).
    public let primary: ValidatedEndpoint
    /// A tty's input (from the host), if the tty has one.
    public let ttyInput: ValidatedEndpoint?
}

/// An adopt request that passed `AdoptCheck.validate`: only that function makes one, so code
/// that takes it (the broker's `adopt`) never checks again or parses an address twice.
public struct ValidatedAdoption: Sendable, Equatable {
    public let request: AdoptRequest
    public let streams: [ValidatedStream]
    public var process: String { request.process }
    /// The resumable identities its streams will use at the host (each must be unused).
    public var identities: Set<ResumableIdentity> { Set(ResumableIdentity.all(in: request.streams)) }
    /// It takes over streams a crashed broker held (`resume`).
    public var resumes: Bool { request.streams.contains { $0.resume == true } }
    /// It names checkpoint slots, resumes or hands over an ending input: only the supervisor, which owns the slots, may.
    public var needsTheSupervisor: Bool {
        resumes || request.handoffOwner != nil || request.endingInput != nil || request.releasing != nil || request.orphanedOutput != nil || request.streams.contains { $0.ended != nil } || streams.contains { $0.primary.checkpoint != nil || $0.ttyInput?.checkpoint != nil }
    }
}

/// The checks an adopt passes before the broker keeps anything: pure (no fds, no state), so the
/// supervisor runs them before it starts a process (nothing the broker would refuse may start),
/// the broker runs them once at its boundary, and the fuzz targets run them on any input.
public enum AdoptCheck {
    /// Checks an adopt request against the fds that came with it: a process id, one stream per
    /// kind, fd indexes in range, addresses that parse, tokens for resumable streams. Returns it
    /// with its addresses parsed.
    @discardableResult
    public static func validate(_ request: AdoptRequest, descriptorCount: Int) throws(HoldfastError) -> ValidatedAdoption {
        guard !request.process.isEmpty, request.process.utf8.count <= 256 else {
            throw HoldfastError(.badRequest, "process id must be 1 to 256 bytes")
        }
        guard !request.streams.isEmpty else { throw HoldfastError(.badRequest, "no streams") }
        var kinds = Set<StreamKind>()
        var slots = Set<Int>()
        var windowEnds = Set<Int>()
        var streamOfFD: [Int: Int] = [:]
        var validated: [ValidatedStream] = []
        for (index, stream) in request.streams.enumerated() {
            let name = "streams[\(index)]"
            guard kinds.insert(stream.kind).inserted else {
                throw HoldfastError(.badRequest, "\(name): a second \(stream.kind.rawValue) stream")
            }
            guard stream.fd >= 0, stream.fd < descriptorCount else {
                throw HoldfastError(.badRequest, "\(name): fd index \(stream.fd) but \(descriptorCount) fds attached")
            }
            // Each stream owns its fd: it closes it when it ends (a stdin the host ended, a
            // release), which would cut the other stream off mid-read.
            if let other = streamOfFD.updateValue(index, forKey: stream.fd) {
                throw HoldfastError(.badRequest, "\(name): fd index \(stream.fd) is streams[\(other)]'s too: each stream needs an fd of its own (attach it twice, or a dup)")
            }
            var parsed: [SocketAddress] = []
            for (key, text) in [("address", stream.address), ("inputAddress", stream.inputAddress)] {
                guard let text else { continue }
                do {
                    parsed.append(try SocketAddress(parsing: text))
                } catch {
                    throw HoldfastError(.badAddress, "\(name).\(key): \(error)")
                }
            }
            if stream.mode == .resumable {
                guard let token = stream.token, !token.isEmpty, token.utf8.count <= StreamHello.maxTokenLength else {
                    throw HoldfastError(.badRequest, "\(name): resumable mode needs a token of 1 to 256 bytes")
                }
                guard stream.secret != nil else {
                    throw HoldfastError(.badRequest, "\(name): resumable mode needs the stream's secret (from the host)")
                }
                // The input stream says hello with inputToken: the host reads at most 256 bytes.
                if stream.inputAddress != nil {
                    guard let token = stream.inputToken, !token.isEmpty, token.utf8.count <= StreamHello.maxTokenLength else {
                        throw HoldfastError(.badRequest, "\(name): a resumable tty input needs an inputToken of 1 to 256 bytes")
                    }
                    guard stream.inputSecret != nil else {
                        throw HoldfastError(.badRequest, "\(name): a resumable tty input needs its inputSecret (from the host)")
                    }
                }
            }
            if stream.inputAddress != nil, stream.kind != .tty {
                throw HoldfastError(.badRequest, "\(name): inputAddress is only for a tty")
            }
            // A checkpoint records a resumable stream's offsets: a raw stream has none (its
            // splice moves nothing into the broker). Two streams in one slot would overwrite
            // each other's progress.
            for (key, slot) in [("checkpoint", stream.checkpoint), ("inputCheckpoint", stream.inputCheckpoint)] {
                guard let slot else { continue }
                guard stream.mode == .resumable else { throw HoldfastError(.badRequest, "\(name).\(key): only a resumable stream has one") }
                guard slot >= 0 else { throw HoldfastError(.badRequest, "\(name).\(key): slot \(slot) is negative") }
                guard slots.insert(slot).inserted else { throw HoldfastError(.badRequest, "\(name).\(key): slot \(slot) is named twice") }
            }
            if stream.inputCheckpoint != nil, stream.inputAddress == nil {
                throw HoldfastError(.badRequest, "\(name).inputCheckpoint: the stream has no input")
            }
            // A window serves a checkpointed stream (its level settles the checkpoint's pending
            // take), and its ends are fds of their own: no stream's fd, no other window's.
            for (key, window, slot) in [("window", stream.window, stream.checkpoint), ("inputWindow", stream.inputWindow, stream.inputCheckpoint)] {
                guard let window else { continue }
                guard slot != nil else { throw HoldfastError(.badRequest, "\(name).\(key): only a stream with a checkpoint has one") }
                for end in [window.read, window.write] {
                    guard end >= 0, end < descriptorCount else {
                        throw HoldfastError(.badRequest, "\(name).\(key): fd index \(end) but \(descriptorCount) fds attached")
                    }
                    guard windowEnds.insert(end).inserted else {
                        throw HoldfastError(.badRequest, "\(name).\(key): fd index \(end) is named twice")
                    }
                }
            }
            let resumable = stream.mode == .resumable
            let primary = ValidatedEndpoint(
                address: parsed[0], addressText: stream.address, token: resumable ? stream.token.map { Array($0.utf8) } : nil,
                secret: resumable ? stream.secret : nil, checkpoint: stream.checkpoint)
            let input = stream.inputAddress.map { text in
                ValidatedEndpoint(
                    address: parsed[1], addressText: text, token: resumable ? stream.inputToken.map { Array($0.utf8) } : nil,
                    secret: resumable ? stream.inputSecret : nil, checkpoint: stream.inputCheckpoint)
            }
            validated.append(ValidatedStream(description: stream, primary: primary, ttyInput: input))
        }
        // An orphan's outputs resume where the broker before left them, each into its slot
        // (the `output-settled` that frees it names the slot); nothing else is handed so.
        if request.orphanedOutput == true {
            guard request.handoffOwner == nil, request.endingInput == nil, request.releasing == nil else {
                throw HoldfastError(.badRequest, "orphanedOutput: an orphan's outputs come alone")
            }
            for (index, stream) in request.streams.enumerated()
            where stream.kind == .stdin || stream.mode != .resumable || stream.checkpoint == nil || stream.resume != true {
                throw HoldfastError(.badRequest, "streams[\(index)]: an orphan's output is resumed into its checkpoint (\(stream.kind.rawValue) \(stream.mode.rawValue))")
            }
        }
        if let shared = request.streams.first(where: { windowEnds.contains($0.fd) }) {
            throw HoldfastError(.badRequest, "fd index \(shared.fd) is both a \(shared.kind.rawValue) stream and a window")
        }
        // Two streams with one token would both dial one host stream: each would splice its
        // bytes onto the other's.
        var identities = Set<ResumableIdentity>()
        for identity in ResumableIdentity.all(in: request.streams) where !identities.insert(identity).inserted {
            throw HoldfastError(.tokenInUse, "token '\(identity.token)' names two streams of this request")
        }
        return ValidatedAdoption(request: request, streams: validated)
    }
}


/// Where a resumable stream dials and the token it says hello with: two live streams with the
/// same identity would take each other's place at the host.
public struct ResumableIdentity: Hashable, Sendable {
    public var address: String
    public var token: String

    /// The resumable identities of `streams` (a tty's input counts as its own stream).
    public static func all(in streams: [StreamDescription]) -> [ResumableIdentity] {
        streams.flatMap { stream -> [ResumableIdentity] in
            guard stream.mode == .resumable else { return [] }
            var identities: [ResumableIdentity] = []
            if let token = stream.token { identities.append(ResumableIdentity(address: stream.address, token: token)) }
            if let address = stream.inputAddress, let token = stream.inputToken {
                identities.append(ResumableIdentity(address: address, token: token))
            }
            return identities
        }
    }
}

/// What a process id may hold.
public enum ProcessIdentifier {
    /// Why `id` is refused for a control character (C0, DEL, C1), or nil. An id reaches logs,
    /// the journal and operators' terminals: a newline in one forged a journal entry, an escape
    /// sequence wrote to the terminal of whoever ran `holdfast status`.
    public static func controlCharacterRefusal(_ id: String) -> String? {
        TerminalText.controlCharacterRefusal(id, "ids")
    }
}
