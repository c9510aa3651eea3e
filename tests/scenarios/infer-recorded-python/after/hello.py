def greet(name):
    print(f"Hello, {name}!")


def farewell(name):
    print("Goodbye", name)
