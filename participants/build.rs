fn main() {
    for dir in ["inventory", "payment", "shipping", "messaging"] {
        println!("cargo:rerun-if-changed=../migrations/{dir}");
    }
}
