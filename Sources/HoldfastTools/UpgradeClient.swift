import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast upgrade`: asks the daemon to re-execute the binary now at its path (a live
/// upgrade), then waits until the new image serves: the same pid, one upgrade more, both roles
/// running.
public enum UpgradeClient {
    public struct Outcome: Sendable {
        public var before: StatusReport
        public var after: StatusReport
        /// From the request to the new image serving with both roles.
        public var took: Duration
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        public init(_ description: String) { self.description = description }
    }

    public static func upgrade(socket: String, timeout: Duration) async throws(Failure) -> Outcome {
        let started = ContinuousClock.now
        let before: StatusReport
        do {
            before = try await StatusPrinter.fetch(socket: socket)
        } catch {
            throw Failure("cannot reach the daemon at \(socket): \(error)\(StatusPrinter.connectAdvice(error))")
        }
        let client: RPCClient
        do {
            client = try await ControlClient.connect(to: socket)
        } catch {
            throw Failure("cannot reach the daemon at \(socket): \(error)\(StatusPrinter.connectAdvice(error))")
        }
        defer { client.close() }
        do {
            _ = try await client.call(SupervisorRequest.upgrade, reply: [String: String].self)
            throw Failure("the daemon answered without upgrading (an older daemon?)")
        } catch let error as Failure {
            throw error
        } catch let error as HoldfastError where error.code == .channelClosed {
            // The image was replaced: the connection went with it.
        } catch let error as HoldfastError where error.code == .shuttingDown {
            throw Failure(
                "the upgrade did not happen: the daemon (pid \(before.pid)) is stopping (\(error.message): a stop came first, systemctl stop or SIGTERM); the next start runs the binary now at its path")
        } catch let error as HoldfastError where error.code == .unknownType {
            throw Failure("this daemon (holdfast \(before.version)) cannot upgrade live: \(error.message)")
        } catch let error as HoldfastError {
            throw Failure("the upgrade did not happen; holdfast \(before.version) still runs (pid \(before.pid)): \(error.message)")
        } catch {
            throw Failure("the upgrade did not happen: \(error)")
        }
        // The new image accepts on the same control socket (connections wait in its backlog
        // meanwhile); it is done once its roles run.
        let deadline = ContinuousClock.now + timeout
        var last = "no answer yet"
        // The listener is passed across the exec: connections wait in its backlog meanwhile,
        // never refused. Refused for seconds means no process holds it any more.
        var refusedSince: ContinuousClock.Instant?
        while ContinuousClock.now < deadline {
            let fetch = Task { try await StatusPrinter.fetch(socket: socket) }
            let result = await fetch.result(within: .seconds(5))
            // No answer and no daemon process any more: said at once. Before, a daemon that
            // stopped during the upgrade (its socket's file removed, so never "refused") was
            // waited for until the timeout.
            if case .failure? = result, processIsGone(before.pid) {
                throw Failure(
                    "the daemon (pid \(before.pid)) is gone: it exited during the upgrade — a stop came meanwhile (systemctl stop, SIGTERM), or the new binary failed to start with no way back to the previous one; its log says which (journalctl -u holdfast). Its containers ended with it")
            }
            if case .failure(let error)? = result, StatusPrinter.isRefused(error) {
                let since = refusedSince ?? ContinuousClock.now
                refusedSince = since
                if ContinuousClock.now - since >= .seconds(3) {
                    throw Failure(
                        "the daemon (pid \(before.pid)) is gone: its control socket refuses connections since the upgrade began (the new binary failed to start, and no way back to the previous one: see its log, journalctl -u holdfast); its containers ended with it")
                }
            } else {
                refusedSince = nil
            }
            switch result {
            case .success(let report)?:
                guard report.pid == before.pid else {
                    throw Failure("the daemon restarted instead of upgrading (pid \(before.pid) -> \(report.pid)): its containers are gone")
                }
                if (report.upgradesFellBack ?? 0) > (before.upgradesFellBack ?? 0) {
                    throw Failure(
                        "the new binary started but could not take over: \(report.lastUpgradeFailure ?? "(it did not say why)"); holdfast \(report.version) took over again (pid \(report.pid)): every process and stream kept")
                }
                if (report.upgrades ?? 0) > (before.upgrades ?? 0), report.roles.count == 2, report.roles.allSatisfy({ $0.pid != nil }) {
                    return Outcome(before: before, after: report, took: ContinuousClock.now - started)
                }
                // Taken over (the count moved): the new binary runs, whatever its roles do — a
                // timeout said so would read as the old version kept.
                if (report.upgrades ?? 0) > (before.upgrades ?? 0) {
                    let waiting = report.roles.filter { $0.pid == nil }.map(\.name)
                    last = "holdfast \(report.version) took over (pid \(report.pid)), but its \(waiting.joined(separator: " and ")) is not running yet"
                } else {
                    last = "the new image is starting its roles"
                }
            case .failure(let error)?:
                last = "\(error)"
            case nil:
                fetch.cancel()
                last = "no answer within 5 s"
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        throw Failure("the daemon did not come back from the upgrade within \(timeout) (\(last)); see its log (journalctl -u holdfast)")
    }
}

/// `pid` has exited: no such process, or a zombie (its parent has not reaped it yet).
private func processIsGone(_ pid: pid_t) -> Bool {
    switch ProcessRunState.of(pid) {
    case .gone, .dying: return true
    case .running, .stopped, .traced: return false
    }
}

extension Task where Failure == any Error {
    /// The task's result, or nil if it is not done within `timeout`.
    fileprivate func result(within timeout: Duration) async -> Result<Success, any Error>? {
        let outcome = Task<Result<Success, any Error>, Never> { await self.result }
        return await outcome.value(within: timeout)
    }
}
