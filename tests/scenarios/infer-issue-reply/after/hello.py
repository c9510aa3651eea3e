def greet(name):
    print(f"Hi, {name}!")


def farewell(name):
    print("Goodbye", name)
