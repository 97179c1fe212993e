/// Which failed dials of one stream are worth a log line: each *cause* once between two
/// connections, and a line when it connects again saying how many dials had failed.
///
/// A cause is the failure's text with its numbers taken out: "read(fd 590): Connection reset
/// by peer" and "read(fd 563): …" are one cause. Compared as they came, every failed dial was a
/// new reason — the fd differs each time — and a loaded soak logged 37,744 such warnings in five
/// minutes, one per dial. A stream whose dials alternate between a few causes (a host refusing
/// while it is away: reset, broken pipe, timeout) says each once; past `causesTold` it says no
/// more until it connects (`holdfast status` and the metrics still count every dial).
public struct DialFailureReport: Sendable, Equatable {
    /// Most causes told between two connections.
    public static let causesTold = 4

    private var told: [String] = []
    /// Dials that failed since the last connection.
    public private(set) var failuresSinceConnected = 0

    public init() {}

    /// A dial failed with `reason`: true when its cause is new since the last connection and
    /// should be logged.
    public mutating func failed(_ reason: String) -> Bool {
        failuresSinceConnected += 1
        let cause = Self.cause(of: reason)
        guard told.count < Self.causesTold, !told.contains(cause) else { return false }
        told.append(cause)
        return true
    }

    /// The stream connected: the failed dials since the last connection, when any failure was
    /// told (a connection after silent failures needs no line). Starts over.
    public mutating func connected() -> Int? {
        defer {
            told.removeAll()
            failuresSinceConnected = 0
        }
        return told.isEmpty ? nil : failuresSinceConnected
    }

    /// Whether any failure was told since the last connection.
    public var hasTold: Bool { !told.isEmpty }

    /// `reason` with every run of digits as one "#": the fd, the byte count, the errno's number.
    static func cause(of reason: String) -> String {
        var cause = ""
        var inDigits = false
        for character in reason {
            if character.isASCII, character.isNumber {
                if !inDigits { cause.append("#") }
                inDigits = true
            } else {
                cause.append(character)
                inDigits = false
            }
        }
        return cause
    }
}
