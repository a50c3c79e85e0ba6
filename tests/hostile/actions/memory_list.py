"""Grows a list until the address-space limit refuses more."""


def on_execute(event, api):
    hog = []
    while True:
        hog.append([0] * 100_000)
