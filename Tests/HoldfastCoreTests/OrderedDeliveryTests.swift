import HoldfastCore
import NIOConcurrencyHelpers
import Testing

@Suite("OrderedDelivery: messages go out in the order they were given")
struct OrderedDeliveryTests {
    /// The first delivery is slow (a stopped supervisor's full channel); everything posted or
    /// sent after it still goes out after it, in order, and `send` returns only once its own
    /// message went out.
    @Test func postedAndSentMessagesGoOutInOrderBehindASlowOne() async throws {
        let delivered = NIOLockedValueBox<[Int]>([])
        let queue = OrderedDelivery<Int> { message in
            if message == 0 { try? await Task.sleep(for: .milliseconds(200)) }
            delivered.withLockedValue { $0.append(message) }
        }
        queue.post(0)
        for message in 1...50 {
            if message % 10 == 0 {
                await queue.send(message)
                #expect(delivered.withLockedValue { $0 }.last == message, "send returned once \(message) went out")
            } else {
                queue.post(message)
            }
        }
        await queue.send(51)
        #expect(delivered.withLockedValue { $0 } == Array(0...51), "every message once, in order")
    }

    /// Many tasks posting at once: each task's own messages keep their order, none is lost.
    @Test func concurrentPostersLoseNothingAndKeepEachOnesOrder() async throws {
        let delivered = NIOLockedValueBox<[Int]>([])
        let queue = OrderedDelivery<Int> { message in delivered.withLockedValue { $0.append(message) } }
        await withTaskGroup(of: Void.self) { group in
            for poster in 0..<8 {
                group.addTask { for index in 0..<500 { queue.post(poster * 1000 + index) } }
            }
        }
        await queue.send(-1)
        let all = delivered.withLockedValue { $0 }
        #expect(all.count == 8 * 500 + 1)
        for poster in 0..<8 {
            let own = all.filter { $0 >= poster * 1000 && $0 < poster * 1000 + 500 }
            #expect(own == Array(poster * 1000..<poster * 1000 + 500), "poster \(poster)'s messages in its order")
        }
    }
}
