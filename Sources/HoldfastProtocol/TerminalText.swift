/// Text others chose, made safe to print: a process id a runtime named, a stream's address, an
/// error a guest sent. Written to a terminal as it came, an escape sequence in it could set the
/// window's title or the clipboard (OSC 0/52), clear or hide lines; written to a log, a newline
/// began a line of its own, forged at any priority.
public enum TerminalText {
    /// C0 (but tab), DEL and C1: what a terminal or a log reader acts on instead of showing.
    public static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        scalar.value < 0x20 && scalar != "\t" || scalar.value == 0x7F || (0x80...0x9F).contains(scalar.value)
    }

    /// `text` with its control characters written out (`\n`, `\r`, `\u{1b}`). With
    /// `keepingLineBreaks`, `\n` and a `\r` just before one stay (a message of ours laid out on
    /// several lines, a raw terminal's `\r\n`); a lone `\r`, which writes over a line, does not.
    public static func escaped(_ text: String, keepingLineBreaks: Bool = false) -> String {
        // Most text holds none: returned as it is, nothing allocated (every daemon log value).
        guard text.unicodeScalars.contains(where: isControl) else { return text }
        let scalars = Array(text.unicodeScalars)
        func escapes(_ index: Int) -> Bool {
            let scalar = scalars[index]
            guard isControl(scalar) else { return false }
            guard keepingLineBreaks else { return true }
            if scalar == "\n" { return false }
            return !(scalar == "\r" && index + 1 < scalars.count && scalars[index + 1] == "\n")
        }
        guard scalars.indices.contains(where: escapes) else { return text }
        var escaped = String.UnicodeScalarView()
        for (index, scalar) in scalars.enumerated() {
            guard escapes(index) else {
                escaped.append(scalar)
                continue
            }
            let spelled: String
            switch scalar {
            case "\n": spelled = "\\n"
            case "\r": spelled = "\\r"
            default: spelled = "\\u{" + String(scalar.value, radix: 16) + "}"
            }
            escaped.append(contentsOf: spelled.unicodeScalars)
        }
        return String(escaped)
    }

    /// Why `text` is refused for holding a control character, naming it and where; nil if it
    /// holds none. `what` names the kind of text ("ids", "addresses").
    public static func controlCharacterRefusal(_ text: String, _ what: String) -> String? {
        for (index, scalar) in text.unicodeScalars.enumerated() where scalar.value < 0x20 || scalar.value == 0x7F || (0x80...0x9F).contains(scalar.value) {
            let hex = String(scalar.value, radix: 16, uppercase: true)
            return "holds a control character (U+\(String(repeating: "0", count: max(0, 4 - hex.count)) + hex) at character \(index)): \(what) are printable text"
        }
        return nil
    }
}
