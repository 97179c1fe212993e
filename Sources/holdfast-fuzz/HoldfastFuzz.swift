import HoldfastFuzzing

#if canImport(Glibc)
import Glibc
#endif
#if HOLDFAST_FUZZING
import CFuzzerDriver
#endif

// One executable, two builds (README "Fuzzing"):
// - `make fuzz` builds it with -sanitize=fuzzer,address and HOLDFAST_FUZZING: main hands over
//   to libFuzzer's driver, which runs inputs through the target named by HOLDFAST_FUZZ_TARGET
//   (libFuzzer's own flags and corpus directories are the arguments);
// - the normal build makes it a replayer: `holdfast-fuzz TARGET FILE|DIR...` runs inputs (a
//   crash artifact, a corpus) through a target without the fuzzing toolchain.

/// A line on stderr.
private func complain(_ message: String) {
    let line = Array("holdfast-fuzz: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

private let targetNames = FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ")

#if HOLDFAST_FUZZING
private let selectedTarget: FuzzTarget = {
    guard let name = getenv("HOLDFAST_FUZZ_TARGET").map({ String(cString: $0) }), let target = FuzzTarget(rawValue: name) else {
        complain("set HOLDFAST_FUZZ_TARGET to one of: \(targetNames)")
        exit(2)
    }
    return target
}()

/// One input through the selected target. Exported under libFuzzer's name too: the fuzzer
/// runtime's own main (linked in with it) refers to it.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    selectedTarget.runBlocking(bytes)
    return 0
}

@main
enum Fuzz {
    static func main() {
        _ = selectedTarget
        var argc = CommandLine.argc
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) })
    }
}
#else
@main
enum Replay {
    static func main() async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        guard let name = arguments.first, let target = FuzzTarget(rawValue: name), arguments.count > 1 else {
            complain("usage: holdfast-fuzz TARGET FILE|DIR...   (TARGET: \(targetNames))")
            exit(2)
        }
        var count = 0
        for path in arguments.dropFirst() {
            let inputs = FuzzInputs.load(path)
            if inputs.isEmpty { complain("no input at \(path)") }
            for input in inputs {
                await target.run(input.bytes)
                count += 1
            }
        }
        print("\(count) inputs ran clean through the \(target) target")
    }
}
#endif
