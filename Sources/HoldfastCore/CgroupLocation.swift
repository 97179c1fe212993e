/// Where a process's cgroup v2 directory is, read from what the kernel says: `/proc/self/cgroup`
/// names the cgroup (`0::/system.slice/holdfast.service`), `/proc/self/mountinfo` where the
/// unified hierarchy is mounted (`/sys/fs/cgroup` on a cgroup v2 system, `/sys/fs/cgroup/unified`
/// on a hybrid one). Pure: the callers read the two files.
public enum CgroupLocation {
    /// A cgroup2 mount: where it is, and which cgroup it shows as its top (`/` unless the mount
    /// is a bind of a subtree or was made in another cgroup namespace).
    public struct Mount: Equatable, Sendable {
        public var mountPoint: String
        public var root: String

        public init(mountPoint: String, root: String) {
            self.mountPoint = mountPoint
            self.root = root
        }
    }

    /// Every cgroup2 mount in a mountinfo text, in its order.
    public static func unifiedMounts(mountinfo: String) -> [Mount] {
        mounts(mountinfo: mountinfo) { type, _ in type == "cgroup2" }
    }

    /// The mounts in a mountinfo text whose file system type and super options `accept` takes.
    static func mounts(mountinfo: String, accept: (Substring, Substring?) -> Bool) -> [Mount] {
        mountinfo.split(separator: "\n").compactMap { line in
            // "36 25 0:31 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw": the optional
            // fields before " - " vary in number, so the file system type is found after it.
            guard let separator = line.range(of: " - ") else { return nil }
            let before = line[..<separator.lowerBound].split(separator: " ")
            let after = line[separator.upperBound...].split(separator: " ")
            guard before.count >= 5, let type = after.first, accept(type, after.count >= 3 ? after[2] : nil) else { return nil }
            return Mount(mountPoint: unescape(before[4]), root: unescape(before[3]))
        }
    }

    /// The cgroup v2 path in a `/proc/PID/cgroup` text (its `0::` line), nil without one.
    public static func unifiedPath(procCgroup: String) -> String? {
        for line in procCgroup.split(separator: "\n") where line.hasPrefix("0::") {
            let path = String(line.dropFirst(3))
            return path.hasPrefix("/") ? path : nil
        }
        return nil
    }

    /// The directory of the cgroup `/proc/self/cgroup` names, under the first cgroup2 mount
    /// that shows it; nil when there is no such mount.
    public static func directory(mountinfo: String, procCgroup: String) -> String? {
        guard let path = unifiedPath(procCgroup: procCgroup) else { return nil }
        for mount in unifiedMounts(mountinfo: mountinfo) {
            let root = mount.root == "/" ? "" : mount.root
            guard path == root || path.hasPrefix(root + "/") || root.isEmpty else { continue }
            let inside = String(path.dropFirst(root.count))
            return join(mount.mountPoint, inside)
        }
        return nil
    }

    static func join(_ base: String, _ path: String) -> String {
        let trimmed = path.drop(while: { $0 == "/" })
        if trimmed.isEmpty { return base }
        return base.hasSuffix("/") ? base + trimmed : base + "/" + trimmed
    }

    /// mountinfo writes a space, tab, newline and backslash in a path as octal escapes.
    static func unescape(_ field: Substring) -> String {
        guard field.contains("\\") else { return String(field) }
        var bytes: [UInt8] = []
        let utf8 = Array(field.utf8)
        var index = 0
        while index < utf8.count {
            if utf8[index] == UInt8(ascii: "\\"), index + 3 < utf8.count {
                let digits = utf8[(index + 1)...(index + 3)]
                if digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "7") }) {
                    let value = digits.reduce(0) { $0 * 8 + Int($1 - UInt8(ascii: "0")) }
                    if value < 256 {
                        bytes.append(UInt8(value))
                        index += 4
                        continue
                    }
                }
            }
            bytes.append(utf8[index])
            index += 1
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
