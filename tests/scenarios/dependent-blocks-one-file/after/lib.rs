fn helper2() {
    println!("hi");
}

fn main() {
    helper();
}
