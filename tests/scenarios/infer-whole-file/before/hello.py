import sys


def greet(name):
    print("Hello", name)


def main():
    greet(sys.argv[1])
