print("it's fine") - ok
other = 1
