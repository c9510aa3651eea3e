fn main() {
    let x = 2;
    if x > 1 {
        println!("{x}");
    }
}
