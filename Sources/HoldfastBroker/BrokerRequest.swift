import HoldfastCore
import HoldfastProtocol

extension BrokerRequest {
    /// A request as the broker takes it from a peer: decoded (`BrokerRequest.decode`), an
    /// adopt's streams checked (`AdoptCheck`), bridge events only from the supervisor. Pure: no
    /// fds are touched and no state is read, so a message from any peer can be fuzzed through
    /// it (`make fuzz`). The caller closes the message's fds when this throws.
    public static func parse(_ frame: ControlFrame, descriptorCount: Int, fromSupervisor: Bool) throws(HoldfastError) -> BrokerRequest {
        let request = try decode(type: frame.type, body: frame.body, descriptorCount: descriptorCount)
        switch request {
        case .adopt(let adopt):
            let adoption = try AdoptCheck.validate(adopt, descriptorCount: descriptorCount)
            guard fromSupervisor || !adoption.needsTheSupervisor else {
                throw HoldfastError(.permissionDenied, "only the supervisor names checkpoint slots or resumes streams")
            }
        case .disconnectAll, .bridgeUp:
            guard fromSupervisor else { throw HoldfastError(.permissionDenied, "only the supervisor sends bridge events") }
        case .quiesce:
            guard fromSupervisor else { throw HoldfastError(.permissionDenied, "only the supervisor stops the broker") }
        case .openHandoff:
            guard fromSupervisor else { throw HoldfastError(.permissionDenied, "only the supervisor opens the handoff socket") }
        case .handoffKept:
            guard fromSupervisor else { throw HoldfastError(.permissionDenied, "only the supervisor answers deposits") }
        case .release, .list, .stats, .metrics, .processExited, .closeStdin, .resize:
            break
        }
        return request
    }
}
