import HoldfastCore
import HoldfastProtocol

/// The stream settings in the broker's own types.
extension BrokerSettings {
    public var redialPolicy: RedialPolicy {
        RedialPolicy(
            attempts: redialAttempts, interval: .milliseconds(redialIntervalMilliseconds),
            connectTimeout: .milliseconds(connectTimeoutMilliseconds))
    }

    public var drainTimeout: Duration { .milliseconds(drainTimeoutMilliseconds) }

    public var resumable: ResumableConfiguration {
        ResumableConfiguration(ringCapacity: ringCapacity, drainTimeout: drainTimeout)
    }
}
