fn helper() {}

fn main() {
    helper();
}
