import HoldfastProtocol
import Testing

@Suite("sd_notify: messages, NOTIFY_SOCKET, the watchdog interval", .timeLimit(.minutes(5)))
struct ServiceNotifyTests {
    @Test func messagesAreNewlineSeparatedAssignments() {
        #expect(ServiceNotify.message([.ready]) == Array("READY=1".utf8))
        #expect(
            String(decoding: ServiceNotify.message([.ready, .status("Ready: broker up")]), as: UTF8.self)
                == "READY=1\nSTATUS=Ready: broker up")
        #expect(ServiceNotify.message([.stopping, .watchdog, .mainPID(42)]) == Array("STOPPING=1\nWATCHDOG=1\nMAINPID=42".utf8))
    }

    @Test func aStatusCannotSmuggleAnotherAssignment() {
        let message = String(decoding: ServiceNotify.message([.status("line one\nREADY=1\r\nend")]), as: UTF8.self)
        #expect(message == "STATUS=line one READY=1 end")
        #expect(!message.contains("\n"))
    }

    @Test func notifySocketAddresses() throws {
        #expect(try ServiceNotify.Address.parse(nil).get() == nil)
        #expect(try ServiceNotify.Address.parse("").get() == nil)
        #expect(try ServiceNotify.Address.parse("/run/systemd/notify").get() == .path("/run/systemd/notify"))
        #expect(try ServiceNotify.Address.parse("@holdfast/notify").get() == .abstract("holdfast/notify"))
        #expect(ServiceNotify.Address.abstract("x").description == "@x")
        for bad in ["@", "relative/path", "vsock:2:1234", "/" + String(repeating: "a", count: 107)] {
            #expect(throws: ServiceNotify.Problem.self, "\(bad)") { try ServiceNotify.Address.parse(bad).get() }
        }
        #expect(try ServiceNotify.Address.parse("/" + String(repeating: "a", count: 106)).get() != nil, "107 bytes fit")
    }

    @Test func watchdogIntervalIsHalfOfWatchdogSecForThisProcessOnly() {
        let pid: Int32 = 4242
        #expect(ServiceNotify.watchdogInterval(environment: [:], pid: pid) == nil)
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000"], pid: pid) == .seconds(15))
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"], pid: pid) == .seconds(15))
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"], pid: pid) == nil,
            "the watchdog is another process's")
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"], pid: pid) == nil)
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "0"], pid: pid) == nil)
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "-5"], pid: pid) == nil)
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "soon"], pid: pid) == nil)
        #expect(ServiceNotify.watchdogInterval(environment: ["WATCHDOG_USEC": "3"], pid: pid) == .microseconds(1))
    }
}
