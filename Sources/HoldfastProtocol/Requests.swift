/// Every control protocol's requests, one enum each (docs/PROTOCOL.md): decoded once at the
/// boundary, handled by an exhaustive switch. Adding a request is a case here, its frame type,
/// its decode line, and a case in the one handler that serves it (docs/ARCHITECTURE.md).

// MARK: Bridge (host → guest)

/// What the host asks of the guest over the bridge. The bridge worker decodes it (and answers a
/// bad one itself); it reaches the supervisor, forwarded, as `WorkerRequest.host`.
public enum BridgeRequest: RPCRequest, Equatable {
    case create(ProcessSpec)
    case signal(SignalRequest)
    case resize(ProcessResizeRequest)
    case closeStdin(ProcessIDRequest)
    case list(BridgeListRequest = BridgeListRequest())
    case stats
    case acknowledgeExit(AcknowledgeExitRequest)

    public static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> BridgeRequest {
        try RPCBody.noDescriptors(descriptorCount, type: type)
        switch BridgeMessageType(rawValue: type) {
        case .create: return .create(try RPCBody.decode(ProcessSpec.self, body, type: type))
        case .signal: return .signal(try RPCBody.decode(SignalRequest.self, body, type: type))
        case .resize: return .resize(try RPCBody.decode(ProcessResizeRequest.self, body, type: type))
        case .closeStdin: return .closeStdin(try RPCBody.decode(ProcessIDRequest.self, body, type: type))
        case .list: return .list(body.isEmpty ? BridgeListRequest() : try RPCBody.decode(BridgeListRequest.self, body, type: type))
        case .stats: return .stats
        case .acknowledgeExit: return .acknowledgeExit(try RPCBody.decode(AcknowledgeExitRequest.self, body, type: type))
        case .hello, .exit, .ok, .error, nil: throw RPCBody.unknown(type)
        }
    }

    public var frameType: UInt32 {
        switch self {
        case .create: return BridgeMessageType.create.rawValue
        case .signal: return BridgeMessageType.signal.rawValue
        case .resize: return BridgeMessageType.resize.rawValue
        case .closeStdin: return BridgeMessageType.closeStdin.rawValue
        case .list: return BridgeMessageType.list.rawValue
        case .stats: return BridgeMessageType.stats.rawValue
        case .acknowledgeExit: return BridgeMessageType.acknowledgeExit.rawValue
        }
    }

    public var body: [UInt8] {
        switch self {
        case .create(let spec): return ControlJSON.encode(spec)
        case .signal(let request): return ControlJSON.encode(request)
        case .resize(let request): return ControlJSON.encode(request)
        case .closeStdin(let request): return ControlJSON.encode(request)
        case .list(let request): return ControlJSON.encode(request)
        case .stats: return RPCBody.empty
        case .acknowledgeExit(let request): return ControlJSON.encode(request)
        }
    }
}

// MARK: Bridge worker → supervisor

/// What the bridge worker asks of the supervisor on their socketpair: the hello for a new
/// bridge connection, or a host request it decoded and forwards. (The worker's notifications,
/// bridge up and down, have id 0; the supervisor pushes exits to it the same way.)
public enum WorkerRequest: RPCRequest, Equatable {
    case hello
    case host(BridgeRequest)

    public static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> WorkerRequest {
        if type == SupervisorMessageType.bridgeHello.rawValue {
            try RPCBody.noDescriptors(descriptorCount, type: type)
            return .hello
        }
        return .host(try BridgeRequest.decode(type: type, body: body, descriptorCount: descriptorCount))
    }

    public var frameType: UInt32 {
        switch self {
        case .hello: return SupervisorMessageType.bridgeHello.rawValue
        case .host(let request): return request.frameType
        }
    }

    public var body: [UInt8] {
        switch self {
        case .hello: return RPCBody.empty
        case .host(let request): return request.body
        }
    }
}

// MARK: Supervisor control socket

/// `holdfast status` and local tools on the supervisor's control socket (root only).
public enum SupervisorRequest: RPCRequest, Equatable {
    case status
    case launch(ProcessSpec)
    case signal(SignalRequest)
    case wait(WaitRequest)
    /// `holdfast upgrade`: re-execute the binary now at the daemon's path (docs/PROTOCOL.md).
    case upgrade

    public static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> SupervisorRequest {
        try RPCBody.noDescriptors(descriptorCount, type: type)
        switch SupervisorMessageType(rawValue: type) {
        case .status: return .status
        case .launch: return .launch(try RPCBody.decode(ProcessSpec.self, body, type: type))
        case .signal: return .signal(try RPCBody.decode(SignalRequest.self, body, type: type))
        case .wait: return .wait(try RPCBody.decode(WaitRequest.self, body, type: type))
        case .upgrade: return .upgrade
        case .bridgeUp, .bridgeDown, .bridgeHello, .bridgeFinish, .bridgeFinished, .ok, .error, nil: throw RPCBody.unknown(type)
        }
    }

    public var frameType: UInt32 {
        switch self {
        case .status: return SupervisorMessageType.status.rawValue
        case .launch: return SupervisorMessageType.launch.rawValue
        case .signal: return SupervisorMessageType.signal.rawValue
        case .wait: return SupervisorMessageType.wait.rawValue
        case .upgrade: return SupervisorMessageType.upgrade.rawValue
        }
    }

    public var body: [UInt8] {
        switch self {
        case .status, .upgrade: return RPCBody.empty
        case .launch(let spec): return ControlJSON.encode(spec)
        case .signal(let request): return ControlJSON.encode(request)
        case .wait(let request): return ControlJSON.encode(request)
        }
    }
}

// MARK: Broker control (the supervisor's socketpair and the handoff socket)

/// The broker's requests. Decoding checks only the shape; an adopt's streams are checked by the
/// broker (`AdoptCheck`) before it keeps anything, and who may ask what (handoff peers manage
/// only what their uid handed over; bridge events come from the supervisor only) by its handler.
public enum BrokerRequest: RPCRequest, Equatable {
    case adopt(AdoptRequest)
    case release(process: String)
    /// A page of streams (an empty body asks for the first).
    case list(ListRequest)
    case stats
    case metrics
    case disconnectAll
    case bridgeUp
    case processExited(ProcessExitedRequest)
    case closeStdin(process: String)
    case resize(ResizeRequest)
    /// A live upgrade: settle every stream and exit (supervisor only; the reply may not come).
    case quiesce
    /// Every process is handed over: serve the handoff socket (supervisor only).
    case openHandoff
    /// Whether the supervisor keeps a deposit (supervisor only).
    case handoffKept(HandoffKept)

    public static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> BrokerRequest {
        guard let known = BrokerMessageType(rawValue: type) else { throw RPCBody.unknown(type) }
        if known != .adopt { try RPCBody.noDescriptors(descriptorCount, type: type) }
        switch known {
        case .adopt: return .adopt(try RPCBody.decode(AdoptRequest.self, body, type: type))
        case .release: return .release(process: try RPCBody.decode(ProcessRequest.self, body, type: type).process)
        case .list: return .list(body.isEmpty ? ListRequest() : try RPCBody.decode(ListRequest.self, body, type: type))
        case .stats: return .stats
        case .metrics: return .metrics
        case .disconnectAll: return .disconnectAll
        case .bridgeUp: return .bridgeUp
        case .processExited: return .processExited(try RPCBody.decode(ProcessExitedRequest.self, body, type: type))
        case .closeStdin: return .closeStdin(process: try RPCBody.decode(ProcessRequest.self, body, type: type).process)
        case .resize: return .resize(try RPCBody.decode(ResizeRequest.self, body, type: type))
        case .quiesce: return .quiesce
        case .openHandoff: return .openHandoff
        case .handoffKept: return .handoffKept(try RPCBody.decode(HandoffKept.self, body, type: type))
        case .ok, .error, .drained, .inputEnded, .inputSettled, .outputSettled, .handoffDeposited, .handoffEnded, .handoffReleasing, .handoffExited: throw HoldfastError(.unknownType, "\(known) is not a request")
        }
    }

    public var frameType: UInt32 {
        switch self {
        case .adopt: return BrokerMessageType.adopt.rawValue
        case .release: return BrokerMessageType.release.rawValue
        case .list: return BrokerMessageType.list.rawValue
        case .stats: return BrokerMessageType.stats.rawValue
        case .metrics: return BrokerMessageType.metrics.rawValue
        case .disconnectAll: return BrokerMessageType.disconnectAll.rawValue
        case .bridgeUp: return BrokerMessageType.bridgeUp.rawValue
        case .processExited: return BrokerMessageType.processExited.rawValue
        case .closeStdin: return BrokerMessageType.closeStdin.rawValue
        case .resize: return BrokerMessageType.resize.rawValue
        case .quiesce: return BrokerMessageType.quiesce.rawValue
        case .openHandoff: return BrokerMessageType.openHandoff.rawValue
        case .handoffKept: return BrokerMessageType.handoffKept.rawValue
        }
    }

    public var body: [UInt8] {
        switch self {
        case .adopt(let request): return ControlJSON.encode(request)
        case .release(let process), .closeStdin(let process): return ControlJSON.encode(ProcessRequest(process: process))
        case .list(let request): return ControlJSON.encode(request)
        case .stats, .metrics, .disconnectAll, .bridgeUp, .quiesce, .openHandoff: return RPCBody.empty
        case .processExited(let request): return ControlJSON.encode(request)
        case .resize(let request): return ControlJSON.encode(request)
        case .handoffKept(let answer): return ControlJSON.encode(answer)
        }
    }
}

// MARK: host serve's control socket

/// What `holdfast host run/attach/wait/stop/logs/ps/kill/migrate` ask of `holdfast host serve`.
public enum HostRequest: RPCRequest, Equatable {
    case run(HostRunRequest)
    case attach(ProcessIDRequest)
    case wait(HostWaitRequest)
    case closeStdin(ProcessIDRequest)
    /// The client detached (its keys, Ctrl-C): the process's outputs stop waiting for one.
    case detach(ProcessIDRequest)
    case list
    case processes(HostProcessesRequest)
    case signal(SignalRequest)
    case stop(HostStopRequest)
    case logs(HostLogsRequest)
    case resize(ProcessResizeRequest)
    case migrate(MigrateRequest)
    case stats

    public static func decode(type: UInt32, body: [UInt8], descriptorCount: Int) throws(HoldfastError) -> HostRequest {
        try RPCBody.noDescriptors(descriptorCount, type: type)
        switch HostMessageType(rawValue: type) {
        case .run: return .run(try RPCBody.decode(HostRunRequest.self, body, type: type))
        case .attach: return .attach(try RPCBody.decode(ProcessIDRequest.self, body, type: type))
        case .wait: return .wait(try RPCBody.decode(HostWaitRequest.self, body, type: type))
        case .closeStdin: return .closeStdin(try RPCBody.decode(ProcessIDRequest.self, body, type: type))
        case .detach: return .detach(try RPCBody.decode(ProcessIDRequest.self, body, type: type))
        case .list: return .list
        case .processes: return .processes(try RPCBody.decode(HostProcessesRequest.self, body, type: type))
        case .signal: return .signal(try RPCBody.decode(SignalRequest.self, body, type: type))
        case .stop: return .stop(try RPCBody.decode(HostStopRequest.self, body, type: type))
        case .logs: return .logs(try RPCBody.decode(HostLogsRequest.self, body, type: type))
        case .resize: return .resize(try RPCBody.decode(ProcessResizeRequest.self, body, type: type))
        case .migrate: return .migrate(try RPCBody.decode(MigrateRequest.self, body, type: type))
        case .stats: return .stats
        case nil: throw RPCBody.unknown(type)
        }
    }

    public var frameType: UInt32 {
        switch self {
        case .run: return HostMessageType.run.rawValue
        case .attach: return HostMessageType.attach.rawValue
        case .wait: return HostMessageType.wait.rawValue
        case .closeStdin: return HostMessageType.closeStdin.rawValue
        case .detach: return HostMessageType.detach.rawValue
        case .list: return HostMessageType.list.rawValue
        case .processes: return HostMessageType.processes.rawValue
        case .signal: return HostMessageType.signal.rawValue
        case .stop: return HostMessageType.stop.rawValue
        case .logs: return HostMessageType.logs.rawValue
        case .resize: return HostMessageType.resize.rawValue
        case .migrate: return HostMessageType.migrate.rawValue
        case .stats: return HostMessageType.stats.rawValue
        }
    }

    public var body: [UInt8] {
        switch self {
        case .run(let request): return ControlJSON.encode(request)
        case .attach(let request), .closeStdin(let request), .detach(let request): return ControlJSON.encode(request)
        case .wait(let request): return ControlJSON.encode(request)
        case .list, .stats: return RPCBody.empty
        case .processes(let request): return ControlJSON.encode(request)
        case .signal(let request): return ControlJSON.encode(request)
        case .stop(let request): return ControlJSON.encode(request)
        case .logs(let request): return ControlJSON.encode(request)
        case .resize(let request): return ControlJSON.encode(request)
        case .migrate(let request): return ControlJSON.encode(request)
        }
    }
}
