import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// SplitMix64: the same seed gives the same workload (every process's argv, input and expected
/// output), so a failing run can be replayed with `--seed`.
struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A piece of a stream's expected content, and (for process output) the shell command that
/// prints exactly it, so the harness can compute every byte it should receive.
enum Piece: Sendable {
    /// `seq A B`: "A\n" ... "B\n".
    case seq(Int, Int)
    /// `yes WORD | head -n K`: K lines "WORD\n".
    case repeated(String, Int)
    /// `head -c N /dev/zero`: N zero bytes.
    case zeros(Int)
    /// awk printing "WORD-<i*M>\n" for i in 1...K.
    case awk(String, Int, Int)
    /// Bytes as they are: a line the shell echoes, or input the host feeds.
    case text([UInt8])

    var command: String {
        switch self {
        case .seq(let first, let last): return "seq \(first) \(last)"
        case .repeated(let word, let count): return "yes \(word) | head -n \(count)"
        case .zeros(let count): return "head -c \(count) /dev/zero"
        case .awk(let word, let count, let step):
            return "awk 'BEGIN{for(i=1;i<=\(count);i++)printf \"\(word)-%d\\n\",i*\(step)}'"
        case .text: preconditionFailure("text is fed or echoed, not printed by a command")
        }
    }

    /// Appends the piece's bytes.
    func render(into out: inout [UInt8]) {
        switch self {
        case .seq(let first, let last):
            for value in first...last {
                appendDecimal(value, to: &out)
                out.append(10)
            }
        case .repeated(let word, let count):
            let line = Array(word.utf8) + [10]
            out.reserveCapacity(out.count + line.count * count)
            for _ in 0..<count { out += line }
        case .zeros(let count):
            out += repeatElement(0, count: count)
        case .awk(let word, let count, let step):
            let prefix = Array(word.utf8) + [UInt8(ascii: "-")]
            for index in 1...count {
                out += prefix
                appendDecimal(index * step, to: &out)
                out.append(10)
            }
        case .text(let bytes):
            out += bytes
        }
    }
}

func appendDecimal(_ value: Int, to out: inout [UInt8]) {
    var remaining = value
    let start = out.count
    repeat {
        out.append(UInt8(48 + remaining % 10))
        remaining /= 10
    } while remaining > 0
    out[start...].reverse()
}

/// What kind of traffic a process makes.
enum Kind: String, CaseIterable, Sendable {
    /// Bursts of stdout (seq, yes|head, head -c /dev/zero, awk), a line on stderr after each.
    case burst
    /// A steady line on stderr every 250–500 ms, one line on stdout at the end.
    case ticker
    /// `cat`: the host feeds stdin in chunks and closes it; stdout echoes every byte.
    case echo
    /// A raw-mode terminal: `head -c N` echoes what the host types.
    case tty
    /// Prints a line, then sleeps until the host signals it over the bridge.
    case signalled
    /// Prints a line, starts a child, then ends its own process group with `kill -TERM 0` (the
    /// `trap 'kill 0' EXIT` idiom): only its own group may go, never the daemon or another.
    case killsItsGroup = "kills-its-group"
    /// An echo that first holds its stdin pipe's lock inside the kernel for a while (a read into
    /// a userfaultfd page: `pipeHolder`), so the broker's write of the next chunk waits for the
    /// lock and its reactor's watchdog takes over (README, "Security"). Plain `cat` where
    /// userfaultfd is not allowed.
    case holdsItsPipe = "holds-its-pipe"
    /// Prints a line and exits, leaving a child in a session of its own (`setsid`) that holds
    /// stdout and prints its own line later: the exit is reported once that output drained, and
    /// the process's cgroup goes once the child ended too.
    case leavesAChild = "leaves-a-child"
    /// A burst's command started by the soak as a container runtime would, its stdout and
    /// stderr on pipes handed to the broker over the public handoff socket (`adopt`, settled
    /// across a broker that dies inside it), its exit told with `process-exited`: the handoff
    /// path under the same kills, stops and upgrades (`HandOver`).
    case handedOver = "handed-over"
    /// Prints a line, moves itself into the soak's memory cgroup (`MemoryLimitedCgroup`) and
    /// grows until the kernel's OOM killer ends it: its exit must say `oomKilled`, and no other
    /// process's may. Run only where the soak could make that cgroup.
    case outOfMemory = "out-of-memory"
}

/// The `outOfMemory` process's growth, in python: a MiB at a time, each one written (a page
/// never touched is never charged to the cgroup).
let memoryEater = "a = []\nwhile True:\n    a.append(b'x' * (1 << 20))\n"

/// The `holdsItsPipe` process: python, argv[1] the milliseconds to hold, argv[2] the exit code.
let pipeHolder = #"""
import ctypes, fcntl, mmap, os, platform, struct, sys, threading, time
hold, code = int(sys.argv[1]) / 1000.0, int(sys.argv[2])
def echo():
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            sys.exit(code)
        os.write(1, chunk)
libc = ctypes.CDLL(None, use_errno=True)
uffd = libc.syscall({"x86_64": 323, "aarch64": 282}.get(platform.machine(), -1), os.O_CLOEXEC)
try:
    fcntl.ioctl(uffd, 0xC018AA3F, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))
    page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fcntl.ioctl(uffd, 0xC020AA00, bytearray(struct.pack("QQQQ", address, 4096, 1, 0)))
except OSError:
    echo()
got = []
reader = threading.Thread(target=lambda: got.append(os.readv(0, [page])))
reader.start()
os.read(uffd, 32)
time.sleep(hold)
fcntl.ioctl(uffd, 0xC020AA04, bytearray(struct.pack("QQQQ", address, 4096, 0, 0)))
reader.join()
if got[0] == 0:
    sys.exit(code)
os.write(1, page[:got[0]])
echo()
"""#

/// One process of the workload: what it runs, what it is fed, what must come back.
struct Plan: Sendable {
    var id: String
    var kind: Kind
    var argv: [String]
    /// Expected stdout (a tty's output for `.tty`).
    var stdout: [Piece] = []
    /// Expected stderr; nil when the process has no stderr stream.
    var stderr: [Piece]?
    /// stdin, in the chunks the host sends, with a pause after each.
    var feed: [[UInt8]] = []
    var pausesMilliseconds: [Int] = []
    /// How many output bytes must have arrived before feeding (tty) or signalling.
    var readyBytes = 0
    var exitCode: Int32
    /// The signal that ends it (sent by the host for `.signalled`, by itself for
    /// `.killsItsGroup`).
    var signal: Int32?
    /// It traps `signal` and exits by itself (its exit reports no signal).
    var trapsItsSignal = false
    /// The host sends `signal` the moment before the next migration drops the bridge, so that
    /// its reply is lost more often than not: the signal is sent again, and must arrive once.
    var signalAtABlackout = false
    var signalAfterMilliseconds = 0
    /// Roughly how long the process runs, unloaded.
    var expectedSeconds: Double
    /// `handed-over` only: the process stops itself (SIGSTOP) after this many steps of its
    /// burst, and the soak takes its stdio back (`release`) once the host has every byte so far,
    /// continues it and reads the rest itself, as a runtime taking its process back does.
    var releaseAfterStep: Int?

    var tty: Bool { kind == .tty }
    var hasStdin: Bool { kind == .echo || kind == .holdsItsPipe || kind == .tty }
    var feedBytes: Int { feed.reduce(0) { $0 + $1.count } }
}

enum Workload {
    /// The plan of process number `index`. `budgetSeconds` caps its length, so processes
    /// started near the end of a phase end with it.
    /// `outOfMemoryInto`: the soak's memory cgroup's `cgroup.procs`, where it has one.
    static func plan(index: Int, seed: UInt64, budgetSeconds: Double, outOfMemoryInto procs: String? = nil) -> Plan {
        var rng = SeededGenerator(seed: seed ^ (UInt64(index) &* 0xD129_0A2B_77C3_1F35))
        let id = "p\(index)"
        let roll = Int.random(in: 0..<100, using: &rng)
        let kind: Kind =
            roll < 46
            ? .burst
            : roll < 50
                ? .handedOver
            : roll < 65
                ? .ticker
                : roll < 84
                    ? .echo
                    : roll < 87
                        ? .holdsItsPipe
                        : roll < 92
                            ? .tty : roll < 95 ? .signalled : roll < 98 ? .killsItsGroup : roll == 98 && procs != nil ? .outOfMemory : .leavesAChild
        let budget = max(2, budgetSeconds)
        let exitCode = Int32.random(in: 0...9, using: &rng)
        switch kind {
        case .burst: return burst(id, exitCode, budget, &rng)
        case .handedOver:
            // Half of them are taken back midway (`release`).
            let released = Bool.random(using: &rng)
            var plan = burst(id, exitCode, budget, &rng, stopAfterARandomStep: released)
            plan.kind = .handedOver
            return plan
        case .ticker: return ticker(id, exitCode, budget, &rng)
        case .echo: return echo(id, exitCode, budget, &rng)
        case .holdsItsPipe:
            var plan = echo(id, exitCode, budget, &rng)
            let hold = Int.random(in: 300...3000, using: &rng)
            plan.kind = .holdsItsPipe
            plan.argv = ["python3", "-c", pipeHolder, "\(hold)", "\(exitCode)"]
            plan.expectedSeconds += Double(hold) / 1000
            return plan
        case .tty: return tty(id, exitCode, budget, &rng)
        case .signalled: return signalled(id, budget, &rng)
        case .killsItsGroup: return killsItsGroup(id, budget, &rng)
        case .leavesAChild: return leavesAChild(id, exitCode, budget, &rng)
        case .outOfMemory:
            let started = Array("\(id) started\n".utf8)
            return Plan(
                id: id, kind: .outOfMemory,
                argv: ["sh", "-c", "echo '\(id) started'; echo $$ > \(procs ?? "/dev/null") && exec python3 -c \"$0\"", memoryEater],
                stdout: [.text(started)], exitCode: 128 + SIGKILL, signal: SIGKILL, expectedSeconds: 1)
        }
    }

    /// `stopAfterARandomStep`: the script stops itself (`kill -STOP $$`) after a random step
    /// but the last (`releaseAfterStep`); a burst of one step does not.
    private static func burst(
        _ id: String, _ exitCode: Int32, _ budget: Double, _ rng: inout SeededGenerator, stopAfterARandomStep: Bool = false
    ) -> Plan {
        var steps = Int.random(in: 5...60, using: &rng)
        var sleeps = (0..<steps).map { _ in Int.random(in: 100...1000, using: &rng) }
        while steps > 1, Double(sleeps.reduce(0, +)) / 1000 > budget {
            steps -= 1
            sleeps.removeLast()
        }
        let stopAfter = stopAfterARandomStep && steps > 1 ? Int.random(in: 1..<steps, using: &rng) : nil
        var script = ""
        var stdout: [Piece] = []
        var stderr: [Piece] = []
        for step in 0..<steps {
            let piece = randomBurst(&rng)
            stdout.append(piece)
            let line = "\(id) e\(step + 1)"
            stderr.append(.text(Array((line + "\n").utf8)))
            script += "\(piece.command); echo '\(line)' >&2; sleep \(seconds(sleeps[step])); "
            if step + 1 == stopAfter { script += "kill -STOP $$; " }
        }
        script += "exit \(exitCode)"
        var plan = Plan(
            id: id, kind: .burst, argv: ["sh", "-c", script], stdout: stdout, stderr: stderr, exitCode: exitCode,
            expectedSeconds: Double(sleeps.reduce(0, +)) / 1000)
        plan.releaseAfterStep = stopAfter
        return plan
    }

    /// Mostly small bursts, some of tens of KiB, a few of up to 1 MiB.
    private static func randomBurst(_ rng: inout SeededGenerator) -> Piece {
        let roll = Int.random(in: 0..<100, using: &rng)
        let target =
            roll < 70
            ? Int.random(in: 200...4000, using: &rng)
            : roll < 97 ? Int.random(in: 8_000...100_000, using: &rng) : Int.random(in: 200_000...1_048_576, using: &rng)
        switch Int.random(in: 0..<4, using: &rng) {
        case 0:
            let first = Int.random(in: 1...900_000, using: &rng)
            return .seq(first, first + max(1, target / 7) - 1)
        case 1:
            let word = randomWord(1...30, &rng)
            return .repeated(word, max(1, target / (word.utf8.count + 1)))
        case 2:
            return .zeros(target)
        default:
            let word = randomWord(1...8, &rng)
            let count = max(1, target / (word.utf8.count + 8))
            let step = Int.random(in: 1...max(1, min(9999, 2_000_000_000 / count)), using: &rng)
            return .awk(word, count, step)
        }
    }

    private static func ticker(_ id: String, _ exitCode: Int32, _ budget: Double, _ rng: inout SeededGenerator) -> Plan {
        let interval = Int.random(in: 250...500, using: &rng)
        let ticks = min(Int.random(in: 20...150, using: &rng), max(1, Int(budget * 1000) / interval))
        let script =
            "i=0; while [ $i -lt \(ticks) ]; do i=$((i+1)); echo \"\(id) t$i\" >&2; sleep \(seconds(interval)); done; echo '\(id) done'; exit \(exitCode)"
        let lines = (1...ticks).map { Piece.text(Array("\(id) t\($0)\n".utf8)) }
        return Plan(
            id: id, kind: .ticker, argv: ["sh", "-c", script], stdout: [.text(Array("\(id) done\n".utf8))], stderr: lines,
            exitCode: exitCode, expectedSeconds: Double(ticks * interval) / 1000)
    }

    private static func echo(_ id: String, _ exitCode: Int32, _ budget: Double, _ rng: inout SeededGenerator) -> Plan {
        var chunks = Int.random(in: 10...80, using: &rng)
        var pauses = (0..<chunks).map { _ in Int.random(in: 50...600, using: &rng) }
        while chunks > 1, Double(pauses.reduce(0, +)) / 1000 > budget {
            chunks -= 1
            pauses.removeLast()
        }
        let feed = (0..<chunks).map { _ in
            randomText(Int.random(in: 0..<100, using: &rng) < 80 ? Int.random(in: 16...2000, using: &rng) : Int.random(in: 2000...32768, using: &rng), &rng)
        }
        return Plan(
            id: id, kind: .echo, argv: ["sh", "-c", "cat; exit \(exitCode)"], stdout: feed.map { .text($0) }, feed: feed,
            pausesMilliseconds: pauses, exitCode: exitCode, expectedSeconds: Double(pauses.reduce(0, +)) / 1000)
    }

    private static func tty(_ id: String, _ exitCode: Int32, _ budget: Double, _ rng: inout SeededGenerator) -> Plan {
        var chunks = Int.random(in: 5...40, using: &rng)
        var pauses = (0..<chunks).map { _ in Int.random(in: 50...500, using: &rng) }
        while chunks > 1, Double(pauses.reduce(0, +)) / 1000 > budget {
            chunks -= 1
            pauses.removeLast()
        }
        let feed = (0..<chunks).map { _ in randomText(Int.random(in: 16...4096, using: &rng), &rng) }
        let total = feed.reduce(0) { $0 + $1.count }
        // Raw mode, no echo: what comes back is exactly what head read. The host types only
        // after "ready", so nothing meets the terminal in cooked mode.
        let ready = Array("ready\n".utf8)
        return Plan(
            id: id, kind: .tty, argv: ["sh", "-c", "stty raw -echo; echo ready; head -c \(total); exit \(exitCode)"],
            stdout: [.text(ready)] + feed.map { .text($0) }, feed: feed, pausesMilliseconds: pauses, readyBytes: ready.count,
            exitCode: exitCode, expectedSeconds: Double(pauses.reduce(0, +)) / 1000)
    }

    private static func signalled(_ id: String, _ budget: Double, _ rng: inout SeededGenerator) -> Plan {
        let signal = [SIGTERM, SIGKILL, SIGINT, SIGHUP][Int.random(in: 0..<4, using: &rng)]
        let after = min(Int.random(in: 500...40_000, using: &rng), max(500, Int(budget * 1000)))
        let atABlackout = Bool.random(using: &rng)
        let started = Array("\(id) started\n".utf8)
        guard signal != SIGKILL else {
            return Plan(
                id: id, kind: .signalled, argv: ["sh", "-c", "echo '\(id) started'; exec sleep 3600"], stdout: [.text(started)],
                readyBytes: started.count, exitCode: 128 + signal, signal: signal, signalAtABlackout: atABlackout,
                signalAfterMilliseconds: after, expectedSeconds: Double(after) / 1000)
        }
        // Trapped: it says how many it got, and lives on 3 s after the first (past a blackout),
        // so a signal delivered twice — a repeat after a lost reply, sent again — shows in its
        // output as a second line.
        let name = String(signalName(signal).dropFirst(3))
        let script = "n=0; trap 'n=$((n+1)); echo \"\(id) got \(name) $n\"' \(name); echo '\(id) started'; "
            + "while [ $n -eq 0 ]; do sleep 0.05; done; sleep 3; exit \(128 + signal)"
        return Plan(
            id: id, kind: .signalled, argv: ["sh", "-c", script], stdout: [.text(started), .text(Array("\(id) got \(name) 1\n".utf8))],
            readyBytes: started.count, exitCode: 128 + signal, signal: signal, trapsItsSignal: true, signalAtABlackout: atABlackout,
            signalAfterMilliseconds: after, expectedSeconds: Double(after) / 1000 + 3)
    }

    private static func killsItsGroup(_ id: String, _ budget: Double, _ rng: inout SeededGenerator) -> Plan {
        let after = min(Int.random(in: 200...5_000, using: &rng), max(200, Int(budget * 1000)))
        let started = Array("\(id) started\n".utf8)
        return Plan(
            id: id, kind: .killsItsGroup, argv: ["sh", "-c", "sleep 3600 & echo '\(id) started'; sleep \(seconds(after)); kill -TERM 0; sleep 3600"],
            stdout: [.text(started)], exitCode: 128 + SIGTERM, signal: SIGTERM, expectedSeconds: Double(after) / 1000)
    }

    private static func leavesAChild(_ id: String, _ exitCode: Int32, _ budget: Double, _ rng: inout SeededGenerator) -> Plan {
        let after = min(Int.random(in: 200...3_000, using: &rng), max(200, Int(budget * 1000)))
        let script = "setsid sh -c 'sleep \(seconds(after)); echo \"\(id) late\"' & echo '\(id) started'; exit \(exitCode)"
        return Plan(
            id: id, kind: .leavesAChild, argv: ["sh", "-c", script], stdout: [.text(Array("\(id) started\n\(id) late\n".utf8))],
            exitCode: exitCode, expectedSeconds: Double(after) / 1000)
    }

    private static func randomWord(_ length: ClosedRange<Int>, _ rng: inout SeededGenerator) -> String {
        let letters = Array("abcdefghijklmnopqrstuvwxyz".utf8)
        return String(decoding: (0..<Int.random(in: length, using: &rng)).map { _ in letters.randomElement(using: &rng)! }, as: UTF8.self)
    }

    /// Printable ASCII in lines of up to 100 bytes, ending with a newline.
    /// Printable lines, `count` bytes ending in a newline. Written into a buffer with plain
    /// loops: the soak runs from the debug build, where the generic `stride` and appends this
    /// once used cost a third of the soak's own CPU — on a loaded 2-core machine enough to starve
    /// its in-process host for seconds (the plans are made on the tasks that serve the host).
    private static func randomText(_ count: Int, _ rng: inout SeededGenerator) -> [UInt8] {
        let lineLength = Int.random(in: 10...100, using: &rng)
        var bytes = [UInt8](repeating: 10, count: max(count, 1))  // the last byte stays a newline
        let body = count - 1
        var line = 0
        var index = 0
        bytes.withUnsafeMutableBufferPointer { out in
            while index < body {
                var value = rng.next()
                var taken = 0
                while taken < 8, index < body {
                    if line == lineLength {
                        out[index] = 10
                        line = 0
                    } else {
                        out[index] = 0x20 &+ UInt8(truncatingIfNeeded: value) % 95
                        line += 1
                    }
                    value >>= 8
                    taken += 1
                    index += 1
                }
            }
        }
        return bytes
    }

    static func seconds(_ milliseconds: Int) -> String {
        let fraction = String(milliseconds % 1000)
        return "\(milliseconds / 1000)." + String(repeating: "0", count: 3 - fraction.count) + fraction
    }
}
