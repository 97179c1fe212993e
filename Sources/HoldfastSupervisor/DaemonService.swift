import ServiceLifecycle

/// One moving part of the daemon (a role, the control socket, the metrics endpoint, the
/// watchdog) as a swift-service-lifecycle `Service`: it runs until the group shuts down, and
/// `stop` ends it (closes its listener, stops its role) when its turn comes — the group stops
/// services in the reverse order of their start, each after the one after it has returned.
struct DaemonService: Service, CustomStringConvertible {
    let description: String
    private let body: @Sendable () async -> Void
    private let stop: @Sendable () -> Void

    init(_ name: String, stop: @escaping @Sendable () -> Void = {}, body: @escaping @Sendable () async -> Void) {
        description = name
        self.body = body
        self.stop = stop
    }

    func run() async throws {
        let running = Task { await body() }
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                await running.value
            } onGracefulShutdown: {
                stop()
                running.cancel()
            }
        } onCancel: {
            stop()
            running.cancel()
        }
        // A body that ended on its own (a listener that failed) waits for the shutdown: the group
        // takes a service returning while another shuts down for a failure of the whole group.
        try? await gracefulShutdown()
    }
}

/// The first part of every stop: waits for the shutdown, then runs `stop` to its end (it is
/// not cancelled by the shutdown it serves). Listed last, so the group runs it first, while the
/// roles, the bridge and the control socket still serve.
struct ShutdownSequence: Service, CustomStringConvertible {
    let description: String
    let stop: @Sendable () async -> Void

    func run() async throws {
        // Cancelled instead of shut down (a failing group): the processes still get stopped.
        try? await gracefulShutdown()
        await stop()
    }
}
