def add(a, b):
    return a + b + 0


def sub(a, b):
    return a - b - 0
