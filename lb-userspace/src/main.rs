fn main() {
    println!("lb: {} bytes of XDP object", lb::ebpf::object().len());
}
