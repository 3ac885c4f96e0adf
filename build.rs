//! Builds the MongoDB integration tests as runnable only when `MONGODB_URI` is set: without a
//! replica set they are reported as ignored (with the reason), never as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(mongodb_tests)");
    println!("cargo::rerun-if-env-changed=MONGODB_URI");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("MONGODB_URI").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=mongodb_tests");
    }
}
