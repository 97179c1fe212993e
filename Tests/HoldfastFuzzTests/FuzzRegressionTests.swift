import HoldfastBridge
import HoldfastBroker
import HoldfastCore
import HoldfastFuzzing
import HoldfastProtocol
import HoldfastSupervisor
import Testing

/// The fuzz targets' inputs, replayed in the normal test suite: the seed corpus (so the
/// harnesses themselves stay sound) and every crash the fuzzer found (fuzz/crashes/<target>/),
/// each fixed and kept here as a regression test. A regression traps this test process.
@Suite("Fuzz regressions", .timeLimit(.minutes(5)))
struct FuzzRegressionTests {
    static let fuzzDirectory: String = {
        // Tests/HoldfastFuzzTests/FuzzRegressionTests.swift → the package root.
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/") + "/fuzz"
    }()

    @Test(arguments: FuzzTarget.allCases)
    func seedCorpusRunsClean(target: FuzzTarget) async {
        let inputs = FuzzInputs.load("\(Self.fuzzDirectory)/corpus/\(target.rawValue)")
        #expect(inputs.count >= 5, "the seed corpus of \(target) is missing (fuzz/make-seeds.py writes it)")
        for input in inputs { await target.run(input.bytes) }
    }

    @Test(arguments: FuzzTarget.allCases)
    func everyCrashFoundRunsClean(target: FuzzTarget) async {
        for input in FuzzInputs.load("\(Self.fuzzDirectory)/crashes/\(target.rawValue)") { await target.run(input.bytes) }
    }

    // MARK: The extracted checks behave as the I/O code did

    static func frame(_ type: UInt32, id: UInt64, _ json: String) -> ControlFrame {
        ControlFrame(type: type, id: id, body: Array(json.utf8))
    }

    @Test func bridgeRequestsDecodeOnceAndJunkIsRefused() throws {
        func decode(_ frame: ControlFrame) -> Result<BridgeRequest, HoldfastError> {
            Result { () throws(HoldfastError) in try BridgeRequest.decode(type: frame.type, body: frame.body, descriptorCount: 0) }
        }
        #expect(try decode(Self.frame(BridgeMessageType.list.rawValue, id: 3, "{}")).get() == .list())
        #expect(try decode(Self.frame(BridgeMessageType.signal.rawValue, id: 3, #"{"id":"p","signal":15}"#)).get() == .signal(SignalRequest(id: "p", signal: 15)))
        #expect(RPCFrameType.isReply(BridgeMessageType.ok.rawValue), "a reply is never taken as a request")
        guard case .failure(let unknown) = decode(Self.frame(0x4242, id: 3, "{}")) else {
            Issue.record("an unknown type was not refused")
            return
        }
        #expect(unknown.code == .unknownType)
        guard case .failure(let badBody) = decode(Self.frame(BridgeMessageType.signal.rawValue, id: 4, #"{"id":"p"}"#)) else {
            Issue.record("a signal without a signal number was not refused")
            return
        }
        #expect(badBody.code == .badRequest && badBody.message.contains("signal"))
    }

    @Test func brokerParsesAndChecksRequests() throws {
        let adopt = #"{"process":"p","streams":[{"kind":"stdout","fd":0,"address":"tcp://127.0.0.1:1","mode":"raw"}]}"#
        let parsed = try BrokerRequest.parse(Self.frame(BrokerMessageType.adopt.rawValue, id: 1, adopt), descriptorCount: 1, fromSupervisor: false)
        guard case .adopt(let request) = parsed else {
            Issue.record("not an adopt: \(parsed)")
            return
        }
        #expect(request.process == "p" && request.streams.count == 1)

        func code(_ frame: ControlFrame, fds: Int = 0, supervisor: Bool = true) -> String? {
            do {
                _ = try BrokerRequest.parse(frame, descriptorCount: fds, fromSupervisor: supervisor)
                return nil
            } catch {
                return error.code.rawValue
            }
        }
        #expect(code(Self.frame(BrokerMessageType.adopt.rawValue, id: 1, adopt)) == "bad-request")  // fd 0 of 0
        #expect(code(Self.frame(BrokerMessageType.list.rawValue, id: 1, "{}"), fds: 1) == "bad-request")
        #expect(code(Self.frame(BrokerMessageType.bridgeUp.rawValue, id: 1, "{}"), supervisor: false) == "permission-denied")
        #expect(code(Self.frame(BrokerMessageType.bridgeUp.rawValue, id: 1, "{}")) == nil)
        #expect(code(Self.frame(BrokerMessageType.drained.rawValue, id: 1, "{}")) == "unknown-type")
        #expect(code(Self.frame(0x0999, id: 1, "{}")) == "unknown-type")
        let badAddress = adopt.replacingOccurrences(of: "tcp://127.0.0.1:1", with: "tcp://:1")
        #expect(code(Self.frame(BrokerMessageType.adopt.rawValue, id: 1, badAddress), fds: 1) == "bad-address")
    }
}

// MARK: What the fuzz oracles found (fuzz/crashes/), fixed

@Suite("Fuzz findings", .timeLimit(.minutes(5)))
struct FuzzFindingTests {
    static let longToken = String(repeating: "a", count: 300)

    static func refusal(_ spec: ProcessSpec) -> HoldfastError? {
        do {
            try Supervisor.validate(spec)
            return nil
        } catch {
            return error
        }
    }

    /// bridge/create-token-over-256-bytes: the supervisor took a 300-byte token, started the
    /// process, and only then did the broker refuse the stream (the process was killed after it
    /// had run). Now the create is refused before anything starts.
    @Test func aCreateWithATokenOver256BytesIsRefusedBeforeTheProcessStarts() {
        let spec = ProcessSpec(
            id: "p", argv: ["/bin/true"], stdout: StreamSpec(address: "tcp://127.0.0.1:1", mode: .resumable, token: Self.longToken, secret: .random()))
        let error = Self.refusal(spec)
        #expect(error?.code == .badRequest)
        #expect(error?.message.contains("stdout: resumable mode needs a token of 1 to 256 bytes") == true, "\(String(describing: error))")
        var fine = spec
        fine.stdout?.token = String(repeating: "a", count: 256)
        #expect(Self.refusal(fine) == nil)
    }

    /// bridge/create-tty-raw-stdin-without-token: a tty's input is relayed in its stdout's mode;
    /// a raw stdin without a token under a resumable stdout passed the supervisor's check and the
    /// broker refused it after the start.
    @Test func aResumableTtyWhoseStdinHasNoTokenIsRefusedBeforeTheProcessStarts() {
        let spec = ProcessSpec(
            id: "t", argv: ["/bin/sh"], tty: true, stdin: StreamSpec(address: "tcp://127.0.0.1:2", mode: .raw),
            stdout: StreamSpec(address: "tcp://127.0.0.1:1", mode: .resumable, token: "out", secret: .random()))
        let error = Self.refusal(spec)
        #expect(error?.code == .badRequest)
        #expect(error?.message.contains("stdin: a tty's input is resumable like its stdout") == true, "\(String(describing: error))")
        var raw = spec
        raw.stdout = StreamSpec(address: "tcp://127.0.0.1:1", mode: .raw)
        #expect(Self.refusal(raw) == nil)  // both raw: no tokens needed
        var withToken = spec
        withToken.stdin?.token = "in"
        #expect(Self.refusal(withToken)?.message.contains("stdin: a tty's input is resumable like its stdout and needs the stream's secret") == true)
        withToken.stdin?.secret = .random()
        #expect(Self.refusal(withToken) == nil)
    }

    /// broker/adopt-tty-input-token-over-256-bytes: the broker adopted a tty whose inputToken was
    /// longer than a hello carries; the input stream's every hello was refused by the host, so the
    /// terminal's input never connected.
    @Test func anAdoptedTtyInputTokenOver256BytesIsRefused() {
        let tty = StreamDescription(
            kind: .tty, fd: 0, address: "tcp://127.0.0.1:1", mode: .resumable, token: "out", secret: .random(),
            inputAddress: "tcp://127.0.0.1:2", inputToken: FuzzFindingTests.longToken, inputSecret: .random())
        #expect(throws: HoldfastError.self) {
            try AdoptCheck.validate(AdoptRequest(process: "t", streams: [tty]), descriptorCount: 1)
        }
        var fine = tty
        fine.inputToken = String(repeating: "b", count: 256)
        #expect(throws: Never.self) {
            try AdoptCheck.validate(AdoptRequest(process: "t", streams: [fine]), descriptorCount: 1)
        }
    }
}

extension String {
    fileprivate func replacingOccurrences(of target: String, with replacement: String) -> String {
        split(separator: target, omittingEmptySubsequences: false).joined(separator: replacement)
    }
}
