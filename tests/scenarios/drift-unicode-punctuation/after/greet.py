print("all good")
other = 1
