import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// One line on stderr.
private func printError(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

/// `holdfast daemon --config FILE`.
public enum DaemonCommand {
    /// Loads the configuration (a bad one stops here: file, key, reason on stderr, exit 2) and
    /// runs the supervisor until SIGTERM/SIGINT. Returns the exit code.
    ///
    /// `resumeFrom`: a live upgrade (Supervisor+Upgrade.swift): the previous binary of this very
    /// process left its state in that memfd, and this image takes over from it. `checkOnly`: the
    /// previous binary asks whether this one can (`--check-resume-snapshot FD`): the
    /// configuration loads, the bridge key is there and the state reads; prints what it found,
    /// exit 0, or why not, exit 3 — and starts nothing.
    ///
    /// A resumed image that fails before it serves executes the previous binary again on the
    /// same state (`Resumption.fallBack`); that one is started with `fellBackFrom`, a memfd
    /// holding why.
    public static func run(
        configPath: String, resumeFrom: Int32? = nil, checkOnly: Int32? = nil, fellBackFrom: Int32? = nil, logger: Logger
    ) async -> Int32 {
        var resumption: Resumption?
        if let fd = resumeFrom {
            do {
                resumption = try Resumption.read(fd)
            } catch {
                logger.critical("cannot take over from the previous binary: \(error)")
                return 1
            }
            if let fd = fellBackFrom { resumption!.readFallBackReason(fd) }
            // What the old image left open by mistake goes; what it passed is ours, and no
            // process we start inherits it.
            let kept = resumption!.keptDescriptors
            let stray = ProcessImage.closeStrayDescriptors(keeping: Set(kept))
            if !stray.isEmpty { logger.warning("closed fds the previous binary left open", metadata: ["fds": "\(stray)"]) }
            ProcessImage.closeOnExec(kept)
            // From here until it serves, a crash of this image hands everything back too.
            resumption!.armFallBackOnCrash(logger: logger)
        }
        // The supervisor keeps about six fds per process (README, "Open files"): a service
        // manager's soft limit of 1,024 would stop it at about 170 processes, and then a broker
        // restart could not even create its socketpair. Its children get the soft limit back.
        ResourceLimits.raiseOpenFileLimit(childrenKeep: resumption?.state.childOpenFileLimit)
        // Children get the scheduling the first image started with, not this image's (an
        // operator's renice of the daemon is this thread's, which exec'd it).
        resumption?.state.childScheduling?.adopt()
        // The OOM killer must choose a container before the process whose death ends them all
        // (README, "Memory"); the containers get the adjustment the daemon found.
        // Not for a live upgrade's check, which serves nothing: where the daemon lacks
        // CAP_SYS_RESOURCE its warning was the first line of every refused upgrade's reason.
        if checkOnly == nil {
            do {
                try OOMScore.protect(OOMScore.supervisor, childrenKeep: resumption?.state.childOOMScoreAdjustment)
            } catch {
                // Lowering it takes CAP_SYS_RESOURCE, which a daemon run in a container may lack.
                logger.warning("cannot protect the supervisor from the OOM killer (it needs CAP_SYS_RESOURCE)", metadata: ["error": "\(error)"])
            }
        }
        let environment = ConfigurationLoader.currentEnvironment()
        let notifier = ServiceNotifier(environment: environment, logger: logger)
        func failWithoutFallBack(_ code: Int32, _ message: String) async -> Int32 {
            logger.critical("\(message)")
            notifier.status("Failed: \(message)")
            await notifier.finish()
            return code
        }
        /// After a live upgrade's exec, nothing of this image serving yet: the previous binary
        /// takes over again rather than the daemon exit with every container.
        func fail(_ code: Int32, _ message: String) async -> Int32 {
            if let resumption, checkOnly == nil {
                // Returns only if there is no way back.
                let why = resumption.fallBack(reason: message, logger: logger)
                logger.critical("live upgrade: no fallback", metadata: ["why": "\(why)"])
            }
            return await failWithoutFallBack(code, message)
        }
        let configuration: DaemonConfiguration
        do {
            configuration = try await ConfigurationLoader.load(path: configPath, environment: environment)
        } catch {
            // Fallen back to after an upgrade whose new image could not take over (likely for
            // this very reason): exiting now would end every container, so this image goes on
            // with the configuration it ran with.
            guard resumption?.fellBack != nil, let running = resumption?.state.configuration else {
                return await fail(2, "bad configuration: \(error)")
            }
            logger.error("the configuration file does not load: going on with the configuration this daemon ran with before the upgrade it fell back from (fix the file: the next start or upgrade reads it)", metadata: [
                "error": "\(error)",
            ])
            configuration = running
        }
        switch configuration.bridge.authentication {
        case .hmacSHA256:
            // Checked here so a daemon without a usable key does not start at all; the bridge
            // worker reads the file again before every dial.
            do {
                _ = try BridgeKeyFile.load(configuration.bridge.keyFile)
            } catch {
                let hint = error.kind == .missing ? " (provision the VM's bridge key there: README \"Security\"; or set bridge.authentication: none)" : ""
                let problem = ConfigurationError(file: configPath, key: "bridge.key_file", reason: "\(error)\(hint)")
                // Fallen back to: the containers run on, the bridge worker retries its dials
                // (it reads the key before each) until the key is back. A key not there yet is
                // waited for the same way: one provisioned after boot (a host agent writing it,
                // a configuration disk mounted late) left the daemon down for good before
                // (exit 2, which systemd does not restart). An unsafe or malformed one is the
                // operator's to fix: the daemon does not start.
                guard resumption?.fellBack != nil || error.kind == .missing else { return await fail(2, "bad configuration: \(problem)") }
                logger.error("no usable bridge key: the bridge stays down until there is one (the bridge worker looks before each dial); every container runs on", metadata: ["error": "\(problem)"])
            }
        case .none:
            logger.warning(
                "bridge.authentication is none: the bridge is not authenticated; any process in the guest that can dial \(configuration.bridge.address) can pose as this daemon to the host")
        }
        // Loaded (a file that loaded before must not stop a start), but said.
        for (key, warning) in [
            ("shutdown.signal", ValueParsers.shutdownSignalWarning(configuration.shutdown.signal)), ("shutdown.timeout", configuration.shutdown.timeoutWarning),
        ] {
            if let warning { logger.warning("\(key): \(warning)") }
        }
        // The roles are this binary, re-executed through /proc/self/exe: the very file this
        // process runs, even after an upgrade replaced /usr/bin/holdfast (a role restarted later
        // must speak this supervisor's protocol).
        if let fd = checkOnly {
            do {
                print(try Resumption.check(fd, configuration: configuration, logger: logger))
                return 0
            } catch {
                printError("holdfast \(HoldfastVersion.string) cannot take over: \(error.message)")
                return 3
            }
        }
        let executable = "/proc/self/exe"
        guard access(executable, X_OK) == 0 else { return await fail(1, "cannot find my own executable (/proc/self/exe)") }
        let supervisor = Supervisor(
            configuration: configuration, logger: logger, executable: executable, notifier: notifier, configPath: configPath, resuming: resumption)
        // After the start's checks something runs: a failure then is no longer a failed takeover.
        func failRunning(_ code: Int32, _ message: String) async -> Int32 {
            // Alive until the fallback's exec: its memory areas' fds (and their mappings) close
            // with it, and the previous image takes them over.
            defer { withExtendedLifetime(supervisor) {} }
            return supervisor.tookOver.withLockedValue { $0 } ? await failWithoutFallBack(code, message) : await fail(code, message)
        }
        do {
            return try await supervisor.run()
        } catch let refused as StartRefused {
            return await failRunning(refused.transient ? 1 : 2, "refusing to start: \(refused)")
        } catch {
            return await failRunning(1, "daemon failed: \(error)")
        }
    }
}
