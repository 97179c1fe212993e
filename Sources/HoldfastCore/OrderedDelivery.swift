/// Messages handed to one sender, one at a time, in the order they were given, whether the
/// caller waits for its message to go out (`send`) or not (`post`).
///
/// Why: the broker told the supervisor of a stdin's end from a task of its own, so a later
/// notification (a process's `drained`) could go out first. The supervisor then released the
/// process without keeping its ended stdin for the END echo, which a broker crash at that moment
/// would have cost the host a drain timeout. One queue per channel keeps the order of events.
public final class OrderedDelivery<Message: Sendable>: Sendable {
    private struct Item: Sendable {
        let message: Message
        let sent: CheckedContinuation<Void, Never>?
    }

    private let queue: AsyncStream<Item>.Continuation

    /// `deliver` is called for one message at a time, in order, on a task of this queue's.
    public init(_ deliver: @escaping @Sendable (Message) async -> Void) {
        let (stream, queue) = AsyncStream.makeStream(of: Item.self)
        self.queue = queue
        Task {
            for await item in stream {
                await deliver(item.message)
                item.sent?.resume()
            }
        }
    }

    deinit { queue.finish() }

    /// Queues `message` and returns at once.
    public func post(_ message: Message) {
        queue.yield(Item(message: message, sent: nil))
    }

    /// Queues `message` and returns once it was delivered (after everything queued before it).
    public func send(_ message: Message) async {
        await withCheckedContinuation { sent in
            if case .terminated = queue.yield(Item(message: message, sent: sent)) { sent.resume() }
        }
    }
}
