/// The request/reply convention every control protocol shares (docs/PROTOCOL.md, "Control
/// frames"): a request frame carries a non-zero id; its reply has the same id and type `ok`
/// (the reply's JSON) or `error` (a `HoldfastError`); frames with id 0 are notifications.
///
/// Each protocol declares its requests as one enum conforming to `RPCRequest`: decoded once, at
/// the boundary, into a typed value that the server's handler switches on exhaustively — a
/// request nobody handles does not compile.
public enum RPCFrameType {
    public static let ok: UInt32 = 0x0001
    public static let error: UInt32 = 0x0002

    /// Whether `type` is a reply (which a server never takes as a request).
    public static func isReply(_ type: UInt32) -> Bool { type == ok || type == error }
}

public protocol RPCRequest: Sendable {
    /// Decodes a request frame; an unknown type is `unknownType`, a body that does not decode is
    /// `badRequest` naming the key. `descriptorCount` fds came with it: a request that takes
    /// none refuses them (`badRequest`) and the server closes them.
    static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> Self

    /// The frame type and body that say this request.
    var frameType: UInt32 { get }
    var body: [UInt8] { get }
}

extension RPCRequest {
    /// The frame that carries this request under `id`.
    public func frame(id: UInt64) -> ControlFrame { ControlFrame(type: frameType, id: id, body: body) }
}

/// Decoding helpers for `RPCRequest.decode`.
public enum RPCBody {
    /// `T` from a request body, or `badRequest` with the key and the reason.
    public static func decode<T: Decodable>(_: T.Type, _ body: [UInt8], type: UInt32) throws(HoldfastError) -> T {
        do {
            return try ControlJSON.decode(T.self, from: body, frameType: type)
        } catch {
            throw HoldfastError(.badRequest, error.description)
        }
    }

    /// Refuses fds on a request that takes none.
    public static func noDescriptors(_ count: Int, type: UInt32) throws(HoldfastError) {
        guard count == 0 else { throw HoldfastError(.badRequest, "only adopt carries fds (request type 0x\(String(type, radix: 16)))") }
    }

    public static func unknown(_ type: UInt32) -> HoldfastError {
        HoldfastError(.unknownType, "unknown request type 0x\(String(type, radix: 16))")
    }

    /// `{}`: the body of a request or reply that says nothing more.
    public static let empty = ControlJSON.encode([String: String]())
}

/// What a handler answers: the `ok` frame's body and any fds to send with it (the server
/// closes its copies once they are sent).
public struct RPCReply: Sendable {
    /// Called once the reply was written (`delivered`) or could not be (the peer is gone).
    public typealias AfterSent = @Sendable (_ delivered: Bool) async -> Void

    public var body: [UInt8]
    public var descriptors: [Int32]
    /// Given: runs after the write, and the fds are its own to close or keep — a reply whose
    /// fds never reached the peer (a `release` whose asker left) need not lose them.
    /// Absent: the server closes them (the peer has its copies).
    public var afterSent: AfterSent?

    public init(body: [UInt8], descriptors: [Int32] = [], afterSent: AfterSent? = nil) {
        self.body = body
        self.descriptors = descriptors
        self.afterSent = afterSent
    }

    public init(_ value: some Encodable, descriptors: [Int32] = [], afterSent: AfterSent? = nil) {
        self.init(body: ControlJSON.encode(value), descriptors: descriptors, afterSent: afterSent)
    }

    public static let empty = RPCReply(body: RPCBody.empty)
}
