fn main() {
    println!("cargo:rerun-if-changed=../migrations/orchestrator");
    println!("cargo:rerun-if-changed=../migrations/messaging");
}
