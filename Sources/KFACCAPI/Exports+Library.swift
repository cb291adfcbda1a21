// Version and status strings: the functions that need no handle and cannot fail.

import KFAC
import _KFACHeader

#if canImport(Glibc)
import Glibc
#endif

/// "MAJOR.MINOR.PATCH", the header's macro as a C string made once (global lets are initialised
/// once, thread-safely) and kept for the life of the process.
private let versionString: UnsafePointer<CChar> = UnsafePointer(strdup(KFAC_VERSION_STRING)!)

@c @implementation
public func kfac_version_number() -> UInt32 {
    UInt32(KFAC_VERSION_MAJOR * 10000 + KFAC_VERSION_MINOR * 100 + KFAC_VERSION_PATCH)
}

@c @implementation
public func kfac_version_string() -> UnsafePointer<CChar>! { versionString }

@c @implementation
public func kfac_status_string(_ status: Int32) -> UnsafePointer<CChar>! {
    cString(KFACStatus(rawValue: status)?.staticDescription ?? "unknown status code")
}
