import sys


def greet(name):
    print(f"Hello, {name}!")


def main():
    for name in sys.argv[1:]:
        greet(name)
