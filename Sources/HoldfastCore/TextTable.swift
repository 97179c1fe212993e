/// Columns padded to their widest cell, as `holdfast status` and `holdfast host ps` print them;
/// ANSI colour sequences take no columns.
public enum TextTable {
    public static func lines(_ header: [String], _ rows: [[String]]) -> [String] {
        func visible(_ text: String) -> Int {
            // Escape sequences take no columns.
            var count = 0
            var inEscape = false
            for character in text {
                if character == "\u{1B}" { inEscape = true } else if inEscape { if character == "m" { inEscape = false } } else { count += 1 }
            }
            return count
        }
        let widths = header.indices.map { column in ([header] + rows).map { visible($0[column]) }.max() ?? 0 }
        return ([header] + rows).map { row in
            row.enumerated().map { column, text in
                column == row.count - 1 ? text : text + String(repeating: " ", count: widths[column] - visible(text) + 2)
            }.joined()
        }
    }
}
