// Checkpoints: kfac_state_* of include/kfac.h.

import KFAC
import _KFACHeader

@c @implementation
public func kfac_state_get_size(_ opt: OpaquePointer?, _ size: UnsafeMutablePointer<Int>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try required(size, "size").pointee = o.stateSize }
}

@c @implementation
public func kfac_state_save(_ opt: OpaquePointer?, _ buffer: UnsafeMutableRawPointer?, _ capacity: Int,
                            _ written: UnsafeMutablePointer<Int>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let base = try required(buffer, "buffer")
        let out = try required(written, "written")
        guard capacity >= 0 else { throw KFACError(.invalidSize, "capacity does not fit in a signed size") }
        out.pointee = try o.saveState(into: UnsafeMutableRawBufferPointer(start: base, count: capacity))
    }
}

@c @implementation
public func kfac_state_load(_ opt: OpaquePointer?, _ buffer: UnsafeRawPointer?, _ size: Int) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let base = try required(buffer, "buffer")
        guard size >= 0 else { throw KFACError(.invalidSize, "size does not fit in a signed size") }
        try o.loadState(from: UnsafeRawBufferPointer(start: base, count: size))
    }
}

@c @implementation
public func kfac_state_save_file(_ opt: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.saveState(toFilePath: try required(path, "path")) }
}

@c @implementation
public func kfac_state_load_file(_ opt: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.loadState(fromFilePath: try required(path, "path")) }
}
