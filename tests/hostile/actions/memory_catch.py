"""Exhausts memory, catches the MemoryError and returns normally as if nothing happened."""


def on_execute(event, api):
    hog = []
    try:
        while True:
            hog.append(bytearray(1 << 20))
    except MemoryError:
        pass
    del hog
    api.state.set("survived", True)
