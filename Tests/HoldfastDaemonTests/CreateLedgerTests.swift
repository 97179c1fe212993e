import HoldfastProtocol
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import HoldfastSupervisor

@Suite("Repeating a create: reservations and remembered keys (CreateLedger)", .timeLimit(.minutes(5)))
struct CreateLedgerTests {
    func reserved(_ decision: CreateLedger.Decision) -> CreateLedger.PendingStart? {
        if case .start(let pending) = decision { return pending }
        return nil
    }

    @Test func theIdIsReservedTheMomentACreateIsAccepted() {
        var ledger = CreateLedger()
        #expect(reserved(ledger.decide(id: "a", key: nil, live: nil)) != nil)
        // A second create for the id while the first is still starting: refused, with or
        // without a key, unless it is the same keyed create.
        guard case .exists = ledger.decide(id: "a", key: nil, live: nil) else {
            Issue.record("a second unkeyed create for a starting id was not refused")
            return
        }
        guard case .exists = ledger.decide(id: "a", key: "k", live: nil) else {
            Issue.record("a keyed create for an id an unkeyed create is starting was not refused")
            return
        }
        #expect(ledger.starting.keys.sorted() == ["a"])
        ledger.release(id: "a")
        #expect(ledger.starting.isEmpty)
        #expect(reserved(ledger.decide(id: "a", key: nil, live: nil)) != nil, "a failed create leaves the id free")
    }

    @Test func aRepeatWhileTheFirstStartsJoinsIt() async {
        var ledger = CreateLedger()
        let first = try! #require(reserved(ledger.decide(id: "a", key: "k1", live: nil)))
        guard case .join(let joined) = ledger.decide(id: "a", key: "k1", live: nil) else {
            Issue.record("a repeat of a starting create did not join it")
            return
        }
        #expect(joined === first)
        guard case .exists = ledger.decide(id: "a", key: "k2", live: nil) else {
            Issue.record("another key for a starting id was not refused")
            return
        }
        let waiter = Task { await joined.wait() }
        first.resolve(.success(4242))
        #expect(try! await waiter.value.get() == 4242)
        // The outcome stays for anyone who asks later.
        #expect(try! await first.wait().get() == 4242)
    }

    @Test func aLiveProcessAnswersItsOwnKeyAndRefusesOthers() {
        var ledger = CreateLedger()
        guard case .repeated(let pid) = ledger.decide(id: "a", key: "k1", live: ("k1", 77)) else {
            Issue.record("a repeat of a running create was not answered with its pid")
            return
        }
        #expect(pid == 77)
        guard case .exists = ledger.decide(id: "a", key: "k2", live: ("k1", 77)) else {
            Issue.record("another key for a live id was not refused")
            return
        }
        guard case .exists = ledger.decide(id: "a", key: nil, live: (nil, 77)) else {
            Issue.record("an unkeyed create for a live id was not refused")
            return
        }
        guard case .exists = ledger.decide(id: "a", key: "k1", live: (nil, 77)) else {
            Issue.record("a key matched a process created without one")
            return
        }
    }

    @Test func aForgottenProcessIsRememberedByKeyAndItsIdCanBeReused() {
        var ledger = CreateLedger()
        ledger.forgotten(id: "a", key: "k1", pid: 10)
        ledger.forgotten(id: "b", key: nil, pid: 11)  // unkeyed: nothing to remember
        #expect(ledger.rememberedCount == 1)
        guard case .repeated(let pid) = ledger.decide(id: "a", key: "k1", live: nil) else {
            Issue.record("a late repeat of a finished create ran again")
            return
        }
        #expect(pid == 10)
        // A new create (new key) reuses the id; the old key is forgotten with it.
        #expect(reserved(ledger.decide(id: "a", key: "k2", live: nil)) != nil)
        #expect(ledger.rememberedCount == 0)
        #expect(reserved(ledger.decide(id: "b", key: nil, live: nil)) != nil)
    }

    @Test func rememberedKeysAreBoundedOldestFirst() {
        var ledger = CreateLedger(capacity: 100)
        for n in 0..<250 { ledger.forgotten(id: "p\(n)", key: "k\(n)", pid: pid_t(n)) }
        #expect(ledger.rememberedCount == 100)
        if case .repeated = ledger.decide(id: "p149", key: "k149", live: nil) {
            Issue.record("p149 should have been evicted (the 100 newest are p150...p249)")
        }
        ledger.release(id: "p149")
        guard case .repeated(let pid) = ledger.decide(id: "p150", key: "k150", live: nil) else {
            Issue.record("the oldest kept entry was evicted")
            return
        }
        #expect(pid == 150)
        // One id reused over and over leaves stale order entries: they stay bounded.
        for n in 0..<10_000 { ledger.forgotten(id: "same", key: "k\(n)", pid: 1) }
        #expect(ledger.rememberedCount <= 100)
        #expect(ledger.orderLength <= 2 * 100 + 1)
    }
}

@Suite("A process spec with a NUL byte is refused, not cut short", .timeLimit(.minutes(5)))
struct NULByteTests {
    @Test func everyStringThatBecomesACStringIsChecked() {
        let stream = StreamSpec(address: "unix:/tmp/s.sock", mode: .resumable, token: "t", secret: .random())
        let good = ProcessSpec(id: "p", argv: ["sh", "-c", "true"], env: ["A=b"], cwd: "/", user: "root", stdout: stream)
        #expect(throws: Never.self) { try Supervisor.validate(good) }
        var cases: [(String, ProcessSpec)] = []
        var spec = good
        spec.id = "p\0q"
        cases.append(("id", spec))
        spec = good
        spec.argv[2] = "true\0; rm -rf /"
        cases.append(("argv[2]", spec))
        spec = good
        spec.env = ["A=b\0c"]
        cases.append(("env[0]", spec))
        spec = good
        spec.user = "root\0x"
        cases.append(("user", spec))
        spec = good
        spec.cwd = "/\0tmp"
        cases.append(("cwd", spec))
        spec = good
        spec.stdout?.token = "t\0"
        cases.append(("stdout.token", spec))
        spec = good
        spec.idempotencyKey = "k\0"
        cases.append(("idempotencyKey", spec))
        for (field, spec) in cases {
            do {
                try Supervisor.validate(spec)
                Issue.record("\(field) with a NUL byte passed")
            } catch {
                #expect(error.code == .badRequest && error.message == "\(field) contains a NUL byte", "\(error)")
            }
        }
    }
}
