public enum HoldfastVersion {
    /// The release version; packaging/ reads it from here.
    public static let string = "0.1.0"
}
