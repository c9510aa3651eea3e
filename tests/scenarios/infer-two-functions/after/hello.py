import sys


def greet(name):
    print(f"Hello, {name}!")


def main():
    greet(sys.argv[-1])
