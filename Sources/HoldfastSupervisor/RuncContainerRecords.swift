import HoldfastCore
import HoldfastPosix

#if canImport(Glibc)
import Glibc
#endif

/// The runc containers this daemon made and has not deleted yet, one file each in a directory of
/// the run directory (root only; it outlives a crash, not a reboot): what a sweep may delete.
/// runc's state directory alone cannot say it — `runc.root` may be set to one other tools use
/// (`/run/runc`, podman's and runc's own default), whose containers are not Holdfast's to end.
/// A file is named by the sha256 of the id (ids may be longer than a file name, or `..`) and
/// holds the id.
struct RuncContainerRecords: Sendable {
    let directory: String

    func make() throws(SystemError) {
        if mkdir(directory, 0o700) != 0, errno != EEXIST { throw .last("mkdir(\(directory))") }
    }

    /// Written before `runc create`: a crash from then on leaves the record for the next start.
    func record(_ id: String) throws(SystemError) {
        let path = file(id)
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw .last("open(\(path))") }
        defer { close(fd) }
        let bytes = Array(id.utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else { throw .last("write(\(path))") }
    }

    /// Once runc has deleted it (or says it does not exist).
    func forget(_ id: String) {
        unlink(file(id))
    }

    /// The ids recorded.
    func recorded() -> [String] {
        (DirectoryListing.names(directory) ?? []).compactMap { name in
            guard let bytes = WholeFile.read("\(directory)/\(name)"), !bytes.isEmpty else { return nil }
            let id = String(decoding: bytes, as: UTF8.self)
            // Only what `record` wrote: the name is the content's digest.
            return file(id) == "\(directory)/\(name)" ? id : nil
        }
    }

    private func file(_ id: String) -> String {
        var hasher = StreamingSHA256()
        Array(id.utf8).withUnsafeBytes { hasher.update($0) }
        return "\(directory)/\(hasher.hex())"
    }
}
