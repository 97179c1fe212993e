extension Duration {
    /// The duration as a person writes it, in the configuration's syntax: "30s", "1.5s",
    /// "250ms", "2m", "1h30m" (never "29.999997352 seconds").
    public var spoken: String {
        let (seconds, attoseconds) = components
        let milliseconds = seconds * 1000 + (attoseconds + 500_000_000_000_000) / 1_000_000_000_000_000
        if milliseconds < 1000 { return "\(milliseconds)ms" }
        if milliseconds % 1000 != 0 || milliseconds < 60_000 {
            let tenths = (milliseconds + 50) / 100
            return tenths % 10 == 0 ? "\(tenths / 10)s" : "\(tenths / 10).\(tenths % 10)s"
        }
        let wholeSeconds = milliseconds / 1000
        let hours = wholeSeconds / 3600
        let minutes = (wholeSeconds % 3600) / 60
        let rest = wholeSeconds % 60
        var text = ""
        if hours > 0 { text += "\(hours)h" }
        if minutes > 0 { text += "\(minutes)m" }
        if rest > 0 { text += "\(rest)s" }
        return text
    }
}
